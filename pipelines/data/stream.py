"""The training stream: a source's images (pipelines/data/reading.py) read, decoded and cropped by
Ray Data on the CPUs the training workers leave, as rows of uint8 HWC crops.

The encoded bytes never cross the object store: each read task reads its unit (image files,
a shard, or a run of a Parquet shard's row groups) and decodes + RandomResizedCrop + flips
`decode_batch_size` images at a time into one block, in one Ray Data operator (for training,
blocks of exactly `train.batch_size` rows: `training_stream`). Every
execution of the dataset (every epoch) reads the units in a new order and draws new crops.
Training reads its epochs from two such datasets in turn (pipelines/data/lanes.py), so that the
next epoch is decoding while this one ends: the decoders never wait on an epoch boundary.

An image that cannot be used (undecodable, over the pixel or byte limits, unreadable, lost
with a damaged shard) is logged and replaced, in its place in the batch, by a fresh crop of
another image of the batch, flagged in the row's `skipped` column, so batch sizes and the
epoch's length stay whole. Each read task adds its count to the job's skip counter
(pipelines/data/skips.py), which training reads as `skipped_images` in metrics.jsonl. Anything
else that fails in a read task is a DataError naming its unit: it ends the run once.
"""
from __future__ import annotations

import copy
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.data

from cluster import ray_compat
from mae.view import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, PRETRAIN, Augment
from pipelines.common.errors import one_line
from pipelines.data.lanes import Lanes, within
from pipelines.data.reading import (
    DataError,
    Retry,
    Source,
    count_shard,
    file_infos,
    imagefolder_samples,
    parquet_parts,
    parquet_row_groups,
    parquet_samples,
    part_rows,
    tar_samples,
)
from pipelines.data.skips import skip_counter
from pipelines.output.console import forward_to_driver

if TYPE_CHECKING:
    from pipelines.common.config import DataConfig

logger = logging.getLogger(__name__)
UNITS_PER_DECODER = 4  # read units per decode task allowed to run, at the least: a short tail


def image_stream(source: Source, data: DataConfig, input_size: int, seed: int, reserved_cpus: float = 0.0,
                 augment: Augment | None = PRETRAIN, console: bool = False) -> ray.data.Dataset:
    """Rows {image: uint8 [S, S, 3], label: int64, skipped: int8} of `source`, with the
    data.* settings; call after ray.init. `reserved_cpus`: the CPUs the training workers
    hold, which decoding leaves alone. `augment`: the random training view
    (mae/transforms.py), None for the evaluation view (resize + centre crop). `console`: the decode tasks' warnings
    go to the driver's console (pipelines/output/console.py), not only to their logs. Each
    execution reads the units in a new order; for training, `training_stream` gives epochs
    without a gap between them.

    At most `data.decode_concurrency` decode tasks run at once (default: the cluster's CPUs
    left by the training workers / `data.decode_cpus`), and decoded crops that the consumer
    has not taken yet (queued, prefetched, or being decoded) stay under
    `data.object_store_memory` (default: three blocks per decoder and two more, at most half
    the object store); see `DecodeAhead`."""
    return _lanes(source, data, View(input_size, seed, augment), reserved_cpus, console, 1).datasets[0]


def training_stream(source: Source, data: DataConfig, input_size: int, seed: int, reserved_cpus: float = 0.0,
                    console: bool = False, augment: Augment | None = PRETRAIN, batch_size: int | None = None) -> Lanes:
    """The training stream of `source` as two lanes (pipelines/data/lanes.py): two datasets over one
    datasource. Each lane may hold `image_stream`'s default of crops decoded ahead (at most a
    third of the object store); `data.object_store_memory` bounds both together. Each lane's
    blocks leave in the order of its read units (Ray Data's `preserve_order`), so that the
    rows each training worker gets, and in which batch, follow from the seed alone: the
    trainer keeps that order for its workers' splits (pipelines/driver/trainer.py).

    `batch_size` (an elastic run's train.batch_size: `Config.step_blocks`): every block but
    an epoch's last is exactly that many rows, in order (ImageFolder: read units and decoded
    batches cut at multiples of it; shards: re-cut by Ray Data's strict streaming
    repartition). The split deals equal blocks in turn, so worker w's micro-batch i is block
    i x workers + w, and the images of optimizer step k are the epoch's rows [k x E, (k+1) x E)
    (E: the effective batch) at any worker count: a resize changes which worker trains an
    image, not which step does. It costs ingest rate (more, smaller blocks: README), hence
    elastic runs only."""
    return _lanes(source, data, View(input_size, seed, augment), reserved_cpus, console, 2, ordered=True,
                  rows_per_block=batch_size)


@dataclass(frozen=True)
class View:
    """What each image of a stream becomes: a `size` crop made by `augment` (None: the
    evaluation view), its randomness drawn from `seed`."""
    size: int
    seed: int
    augment: Augment | None


def _lanes(source: Source, data: DataConfig, view: View, reserved_cpus: float, console: bool, lanes: int,
           ordered: bool = False, rows_per_block: int | None = None) -> Lanes:
    resources = ray.cluster_resources()
    concurrency = data.decode_concurrency
    if concurrency is None:
        concurrency = max(1, int((resources.get("CPU", 1) - reserved_cpus) // data.decode_cpus))
    datasource = ImageDatasource(source, data, view, skip_counter(), console, concurrency, rows_per_block)
    image_bytes = view.size * view.size * 3
    batch_bytes = datasource.batch_size * image_bytes  # what a decode task makes at a time
    if data.object_store_memory is not None:  # all lanes together
        ahead_bytes = data.object_store_memory // lanes
    else:  # each lane, while it is the one trained on, needs the whole default to keep its decoders busy
        store = resources.get("object_store_memory", float("inf"))
        ahead_bytes = int(min((3 * concurrency + 2) * batch_bytes, store / (lanes + 1)))
    num_tasks = datasource.num_tasks()
    datasets = []
    for lane in range(lanes):
        ds = ray.data.read_datasource(datasource.lane(lane), num_cpus=data.decode_cpus, concurrency=concurrency,
                                      override_num_blocks=num_tasks)  # blocks of batch_size, unsplit
        if rows_per_block is not None and not datasource.aligned:
            # shards: their read units hold any number of images, so the blocks are re-cut across
            # them (one more operator, a Ray task per block that copies it: README's ingest
            # figures). ImageFolder's units are cut at multiples of it: no copy.
            ds = ds.repartition(target_num_rows_per_block=rows_per_block, strict=True)
        # each decoded batch (or each block it is cut into) leaves its task as a block of its own,
        # at once: by default Ray Data merges blocks up to 128 MB, and a tar shard's crops reached
        # training in bursts
        ds.context.target_max_block_size = datasource.block_rows * image_bytes
        ray_compat.use_backpressure_policies(ds.context, [DecodeAhead])
        ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, IdleWait]
        ds.context.set_config(DecodeAhead.CONFIG_KEY, (max(ahead_bytes, batch_bytes), batch_bytes))
        ds.context.execution_options.preserve_order = ordered
        datasets.append(ds)
    return Lanes(tuple(datasets), datasource.key)


_warned_whole_image = False


def warn_whole_image_decode() -> None:
    """Once per decode worker process whose node lacks the region decoder: say so."""
    global _warned_whole_image
    from mae.transforms import REGION_DECODE
    if not REGION_DECODE and not _warned_whole_image:
        _warned_whole_image = True
        logger.warning("mae_jpeg_region is not built on %s (setup.py: needs a C compiler and libjpeg's headers, "
                       "Debian's libjpeg62-turbo-dev): this decoder decodes JPEGs whole, which is slower",
                       ray.util.get_node_ip_address())


def decode_batch(blobs: list, labels: list, names: list, size: int, augment: Augment | None = PRETRAIN,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 positions: list | None = None, seeds: tuple | None = None, trained=None) -> dict:
    """Decode + crop (+ flip, + RandAugment: `augment`) a batch of encoded images into a
    block's columns, `position` (default: 0, 1, ...) carried through. Each image's view draws
    from its own generator, seeded by `seeds` + (its position,), so that it depends on the
    run's seed, the epoch and the image's place in it only; with `seeds` None, from OS
    entropy. An image that does not decode (or is None: lost by the reader, which logged it)
    is replaced in its place by a fresh crop of a decodable one of the batch, flagged in
    `skipped`; if none of the batch decodes, its rows are dropped. `trained`: a bool per
    image already trained in this epoch (a resumed epoch): not decoded, a blank row."""
    from mae.transforms import decode_crop_batch  # torch: here, in the decode tasks, not where the stream is planned
    n = len(blobs)
    positions = np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)

    def generators(slots, *extra):
        if seeds is None:
            return [np.random.default_rng() for _ in slots]
        return [np.random.default_rng([*seeds, int(positions[i]), *extra]) for i in slots]

    todo = [i for i in range(n) if trained is None or not trained[i]]
    images, decoded, errors = decode_crop_batch([blobs[i] or b"" for i in todo], size, generators(todo),
                                                augment=augment, max_pixels=max_pixels, max_bytes=max_bytes)
    ok = [todo[k] for k in decoded]
    bad = sorted(todo[k] for k in errors)
    for k, msg in errors.items():
        if blobs[todo[k]] is not None:
            logger.warning("skipping %s: %s", names[todo[k]], msg)
    labels = np.asarray(labels, dtype=np.int64)
    skipped = np.zeros(n, dtype=np.int8)
    if len(todo) == n and not bad:
        return {"image": images, "label": labels, "skipped": skipped, "position": positions}
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    out[ok] = images
    keep = np.ones(n, dtype=bool)
    keep[bad] = False
    if bad and ok:  # a stand-in for each, drawn (and cropped) as the bad slot's generators say
        stand_ins = np.array([g.choice(ok) for g in generators(bad, 1)])
        extra, extra_ok, _ = decode_crop_batch([blobs[i] for i in stand_ins], size, generators(bad, 2),
                                               augment=augment, max_pixels=max_pixels, max_bytes=max_bytes)
        filled = [bad[k] for k in extra_ok]
        out[filled] = extra
        labels[filled] = labels[stand_ins[extra_ok]]
        skipped[filled] = 1
        keep[filled] = True
    return {"image": out[keep], "label": labels[keep], "skipped": skipped[keep], "position": positions[keep]}


class DecodeAhead(ray_compat.BackpressurePolicy):
    """Ray Data backpressure for the decode operator, in place of Ray's policies: a new
    decode task is submitted only while fewer than twice the operator's `concurrency`
    are in flight and the crops decoded ahead of the consumer (blocks queued, re-blocked or
    prefetched, plus one block per task in flight) would stay within a byte budget.

    Ray's own policies (an adaptive concurrency cap and a per-operator object store budget,
    tuned for many small blocks) leave decoders idle between blocks of a stream with few,
    large blocks and one consumer: README's ingest figures show by how much. The budget is
    what bounds memory when training is slower than decoding: nothing spills."""
    CONFIG_KEY = "mae.decode_ahead"  # (budget bytes, bytes per block)

    @property
    def name(self) -> str:
        return "DecodeAhead"

    def can_add_input(self, op) -> bool:
        cap = ray_compat.concurrency_cap(op) if ray_compat.is_map_operator(op) else None
        if cap is None:  # not the decode operator (which has a `concurrency`): the re-blocking one passes blocks on
            return True
        # Up to 2 x concurrency tasks are submitted: Ray runs `concurrency` of them (their
        # CPUs) and starts a queued one the moment another ends, where waiting for Ray
        # Data's scheduling loop would leave a decoder idle until its next round.
        running = ray_compat.tasks_running(op)
        if running >= 2 * cap:
            return False
        budget, block_bytes = ray_compat.policy_config(self, self.CONFIG_KEY, (None, 0))
        if budget is None:
            return True
        return ray_compat.output_bytes_held(self, op) + (running + 1) * block_bytes <= budget


class IdleWait(ray_compat.ExecutionCallback):
    """Rests Ray Data's control loop for `SECONDS` after each step in which none of the
    dataset's tasks runs. Ray's loop waits for tasks, not for its consumer: held back by
    `DecodeAhead`, or with every read task done while training is behind (a lane decoded
    ahead, waiting for its epoch), it spins on a CPU core that decoding needs (measured: the
    ingest benchmark's driver burned 20 s of CPU instead of 5, and decoded half as fast)."""
    SECONDS = 0.02  # a decode task takes 0.1-1 s: resuming 20 ms late costs nothing measurable

    def on_execution_step(self, executor) -> None:
        if ray_compat.executor_tasks_running(executor) == 0:
            time.sleep(self.SECONDS)


class ImageDatasource(ray.data.Datasource):
    """A source's images, read and decoded in the same Ray task (see `image_stream`)."""

    def __init__(self, source: Source, data: DataConfig, view: View, counter, console: bool = False, decoders: int = 1,
                 rows_per_block: int | None = None):
        self.source, self.counter, self.console = source, counter, console
        self.size, self.seed, self.augment = view.size, view.seed, view.augment
        self.key, self.lane_index = f"stream-{uuid.uuid4().hex[:12]}", 0  # its plans in the ledger: skips.py
        self.batch_size, self.files_per_task = data.decode_batch_size, data.read_files_per_task
        # `rows_per_block`: every block (but the epoch's last) exactly that many rows. Where each
        # read unit's images are known (ImageFolder: a run of the epoch's files) the units and
        # the decoded batches are multiples of it, each batch leaving as blocks of that many
        # rows (`aligned`); shards are re-cut by the stream (`_lanes`).
        self.rows_per_block, self.aligned = rows_per_block, rows_per_block is not None and source.format == "imagefolder"
        if self.aligned:
            self.batch_size = max(rows_per_block, self.batch_size // rows_per_block * rows_per_block)
            self.files_per_task = max(rows_per_block, self.files_per_task // rows_per_block * rows_per_block)
        self.block_rows = rows_per_block if self.aligned else self.batch_size
        self.cpus = data.decode_cpus
        self.max_pixels, self.max_bytes = data.max_pixels, data.max_image_bytes
        self.retry = Retry(data.read_retries, data.retry_backoff_seconds)
        # enough read units for every decoder, and to balance the tail of an epoch
        self.target = UNITS_PER_DECODER * max(1, decoders)
        self.splits, self.sizes = split_plan(source, self.target)

    def lane(self, index: int) -> "ImageDatasource":
        """This datasource as lane `index` of its stream (the split points are shared)."""
        lane = copy.copy(self)
        lane.lane_index = index
        return lane

    def estimate_inmemory_data_size(self) -> int:
        return self.source.num_images * self.size * self.size * 3

    def get_name(self) -> str:
        return f"DecodeCrop({self.source.format})"

    def num_tasks(self) -> int:
        return len(self.read_units(np.random.default_rng(0)))

    def read_units(self, rng: np.random.Generator) -> list[tuple]:
        """(unit, images) of each read task, in this execution's order. A unit is a list of
        (path, label) (imagefolder), a (shard, part, parts) run of a Parquet shard's row
        groups, a tar shard (read start to end), or a (shard, start, end, count) byte range of
        a tar of `count` samples (its images: an estimate from its share of the bytes; see
        `span`). At most `read_files_per_task` images each, and at least `target` units
        where the data can be split that far."""
        src, per_task = self.source, self.files_per_task
        if src.format == "imagefolder":
            per_task = max(1, min(per_task, -(-len(src.files) // self.target)))
            if self.aligned:  # whole blocks: only the epoch's last unit ends in a shorter one
                per_task = -(-per_task // self.rows_per_block) * self.rows_per_block
            order = rng.permutation(len(src.files))
            units = [[(src.files[i], int(src.labels[i])) for i in order[k:k + per_task]]
                     for k in range(0, len(order), per_task)]
            return [(u, len(u)) for u in units]
        wanted = -(-self.target // len(src.files))  # units per shard
        pieces = []
        for i, (shard, n) in enumerate(zip(src.files, src.counts)):
            split = self.splits[i] if self.splits is not None else None
            if src.format == "parquet":
                if split is None:
                    parts = parquet_parts(n, per_task)
                    pieces += [((shard, k, parts), part_rows(n, k, parts)) for k in range(parts)]
                    continue
                groups = split
                parts = max(1, min(len(groups), max(parquet_parts(n, per_task), wanted)))
                pieces += [((shard, k, parts), sum(groups[k * len(groups) // parts:(k + 1) * len(groups) // parts]))
                           for k in range(parts)]
            elif self.sizes is None:
                pieces.append((shard, n))
            else:
                size = self.sizes[i]
                parts = max(1, min(n, max(-(-n // per_task), wanted), size // 512))
                bounds = [k * size // parts for k in range(parts + 1)]
                pieces += [((shard, a, b, n), max(1, round(n * (b - a) / size))) for a, b in zip(bounds, bounds[1:])]
        return [pieces[i] for i in rng.permutation(len(pieces))]

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        seeds, generation, trained = self._plan(data_context)
        reader = Reader(self.source.fs, self.source.format, self.size, self.augment, self.batch_size,
                        max(1, int(self.cpus)), self.counter, self.retry, self.max_pixels, self.max_bytes,
                        self.console, seeds, self.rows_per_block if self.aligned else None)
        units = self.read_units(np.random.default_rng(seeds))
        if generation is not None:
            ranged = dict(zip(self.source.files, self.source.counts)) if self.sizes is not None else None
            self.counter.expect.remote(generation, len(units), ranged)
        fmt, size = self.source.format, self.size
        firsts = np.cumsum([0] + [span(u, n) for u, n in units]).tolist()  # each unit's first position
        return [ReadTask(lambda unit=unit, n=n, index=index, first=first:
                         reader(unit, n, index, generation, first, runs_from(trained, first, first + n)),
                         BlockMetadata(num_rows=n, size_bytes=n * size * size * 3, exec_stats=None,
                                       input_files=unit_files(fmt, unit)),
                         per_task_row_limit=per_task_row_limit)
                for index, ((unit, n), first) in enumerate(zip(units, firsts))]

    def _plan(self, data_context) -> tuple[tuple | None, int | None, list | None]:
        """This execution's seeds, the generation its counts go under, and the runs of
        positions it reads without decoding (trained before a resume). The epoch this
        execution reads, as its consumer planned it (skips.py), seeds its order and its
        images' views: (train.seed, epoch), so that a run is the same run whatever Ray's
        scheduling, and an epoch resumed with its trained runs is the same epoch; resumed
        without them (a checkpoint that has none), the rest of the epoch is drawn anew. Unplanned
        (evaluation, a plain iteration), OS entropy. Ray calls get_read_tasks without a
        context only to plan (count the tasks)."""
        if data_context is None:  # counting the tasks: any order will do
            return (0,), None, None
        plan = ray.get(self.counter.planned.remote(self.key, self.lane_index))
        if plan is None:  # nobody planned this execution: a fresh order, counts not kept
            return tuple(np.random.SeedSequence().generate_state(2).tolist()), None, None
        epoch, first_iteration, generation, trained = plan
        if first_iteration and trained is None:
            return (self.seed, epoch, first_iteration), generation, None
        return (self.seed, epoch), generation, trained


def split_plan(source: Source, units: int) -> tuple[tuple | None, tuple | None]:
    """How a source's shards are split to give at least `units` read units, as the driver
    plans it before training: where there are fewer shards than that, a Parquet shard by its
    row groups (read from its footer: (Parquet row groups per shard, None)), a tar by byte
    ranges, for which only its size is needed (None, tar sizes); else (None, None), each
    shard read whole. Nothing of a tar is read."""
    if source.format == "imagefolder" or len(source.files) >= units:
        return None, None
    if source.format == "webdataset":
        return None, tuple(i.size for i in file_infos(source.fs, source.files))

    def groups(shard: str, count: int) -> tuple[int, ...] | None:
        """Rows per row group; None where the shard does not agree with its count (damaged:
        it is then read whole, and its reader counts what it lacks)."""
        try:
            found = parquet_row_groups(source.fs, shard)
            return found if sum(found) == count else None
        except (OSError, ValueError, EOFError) as e:
            logger.warning("%s is read whole, not split: %s", shard, one_line(e))
            return None
    with ThreadPoolExecutor(16) as pool:
        return tuple(pool.map(groups, source.files, source.counts)), None


def byte_range(unit) -> bool:
    """Whether a read unit is a (shard, start, end, count) byte range of a tar."""
    return isinstance(unit, tuple) and len(unit) == 4


def span(unit, n: int) -> int:
    """The positions a read unit's images take in the epoch's order: its images; for a tar's
    byte range, whose images are known only once read, the tar's count (at most that many)."""
    return unit[3] if byte_range(unit) else n


def runs_from(runs: list | None, start: int, end: int) -> list | None:
    """The parts of `runs` within [start, end); None where there are none."""
    if not runs:
        return None
    out = [[max(a, start), min(b, end)] for a, b in runs if a < end and b > start]
    return out or None


def unit_files(fmt: str, unit) -> tuple[str, ...]:
    """The files a read unit reads: its images (imagefolder), or its shard."""
    return tuple(path for path, _ in unit) if fmt == "imagefolder" else (unit[0],) \
        if isinstance(unit, tuple) else (unit,)


def count_in_tasks(fs, shards: list[str], fmt: str) -> list[int]:
    """`reading.open_source`'s count on a cluster: the images of each shard counted by a Ray
    task of its own (a quarter CPU; spread over the nodes), so that a set of bare tars, each
    read through to count its samples, is read by the cluster in parallel, not by the driver.
    A shard that cannot be read raises its own error (OSError, TarError, ArrowInvalid)."""
    task = ray.remote(num_cpus=0.25, scheduling_strategy="SPREAD")(count_shard)
    try:
        return ray.get([task.remote(fs, shard, fmt) for shard in shards])
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


@dataclass(frozen=True)
class Reader:
    """A read task's work, pickled into each task: read its unit's samples and decode them
    into blocks of `batch` crops (`block_rows` given: `batch` is a multiple of it, and each
    decoded batch leaves as blocks of exactly that many rows), then report the task's counts
    to the ledger."""
    fs: object
    fmt: str
    size: int
    augment: Augment | None
    batch: int
    threads: int
    counter: object
    retry: Retry
    max_pixels: int
    max_bytes: int
    console: bool
    seeds: tuple | None  # of the execution: each image's view is drawn from seeds + (its position,)
    block_rows: int | None = None

    def __setstate__(self, state: dict) -> None:
        """Unpickled in the decode worker, before its task runs: the pixel code (torch,
        torchvision, and the sympy that torch loads lazily) is imported here, in one thread.
        Imported first inside the running task, while Ray Data's threads also touch torch, it
        raced: "module 'sympy' has no attribute 'logic'" ended a run. Where the stream is only
        planned (Ray Data's coordinators), no Reader is unpickled and torch is not loaded."""
        import mae.transforms  # noqa: F401
        self.__dict__.update(state)

    def samples(self, unit, n: int):
        if self.fmt == "imagefolder":
            return imagefolder_samples(self.fs, *map(list, zip(*unit)), retry=self.retry, max_bytes=self.max_bytes)
        if self.fmt == "parquet":
            return parquet_samples(self.fs, unit[0], self.batch, unit[1], unit[2], expected=n, retry=self.retry)
        if byte_range(unit):  # its shortfall, if the tar holds fewer than its count, is the ledger's (skips.py)
            return tar_samples(self.fs, unit[0], retry=self.retry, max_bytes=self.max_bytes,
                               byte_range=(unit[1], unit[2]))
        return tar_samples(self.fs, unit, expected=n, retry=self.retry, max_bytes=self.max_bytes)

    def __call__(self, unit, n: int, index: int, generation: int | None, first: int = 0, trained: list | None = None):
        """Read task `index`: unit `unit` of `n` images, the first at position `first` of the
        execution's order; `trained`: runs of positions not to decode (see `decode_batch`)."""
        import torch
        torch.set_num_threads(self.threads)  # one decoder per CPU it holds; no oversubscription
        if self.console:
            forward_to_driver(f"decoding on {ray.util.get_node_ip_address()}")
        if self.augment:
            warn_whole_image_decode()
        counts = [0, 0, 0.0]  # skipped, decoded, seconds
        batch = self.batch
        # a tail shorter than half a batch joins the task's last block, not a block of its own
        # (with `block_rows`, no: every block is whole)
        flush_at = batch if self.block_rows else batch + batch // 2
        try:
            pending = []
            read = 0
            for read, sample in enumerate(self.samples(unit, n), start=1):
                pending.append((*sample, first + read - 1))
                if len(pending) == flush_at:
                    yield from self.blocks(pending[:batch], counts, trained)
                    pending = pending[batch:]
            last = list(self.blocks(pending, counts, trained)) if pending else []
        except Exception as e:
            names = unit_files(self.fmt, unit)
            raise DataError(f"reading {names[0]}{' and more' if len(names) > 1 else ''}: "
                            f"{type(e).__name__}: {e}") from e
        yield from last
        if generation is not None:  # not waited for: skips.py
            self.counter.add.remote(*counts, generation, index, (unit[0], read) if byte_range(unit) else None)

    def blocks(self, chunk: list, counts: list, trained: list | None = None):
        """The decoded blocks of `chunk`: one, or `block_rows` rows each."""
        from ray.data.block import BlockAccessor
        block = self.block(chunk, counts, trained)
        if block is None:
            return
        if not self.block_rows:
            yield block
            return
        accessor = BlockAccessor.for_block(block)
        for start in range(0, accessor.num_rows(), self.block_rows):
            yield accessor.slice(start, min(start + self.block_rows, accessor.num_rows()), copy=True)

    def block(self, chunk: list, counts: list, trained: list | None = None):
        """The decoded block of `chunk` ((bytes, label, name, position) each), its counts
        added to `counts`; None when no image of the chunk decodes."""
        from ray.data.block import BlockAccessor
        blobs, labels, names, positions = map(list, zip(*chunk))
        skip = within(positions, trained) if trained else None
        t0 = time.perf_counter()
        columns = decode_batch(blobs, labels, names, self.size, self.augment, self.max_pixels, self.max_bytes,
                               positions, self.seeds, skip)
        counts[2] += time.perf_counter() - t0
        decoded = len(chunk) - (int(skip.sum()) if skip is not None else 0)
        counts[1] += decoded
        counts[0] += decoded - int((columns["skipped"] == 0).sum()) + (len(chunk) - decoded)
        return BlockAccessor.batch_to_block(columns) if len(columns["label"]) else None
