"""Training image sources: ImageNet's class folders, WebDataset tar shards or Parquet
shards, on a local/NFS path or an S3-compatible store, as one Ray Data stream.

`open_source` lists the files and counts the images before anything runs, so the epoch
size (and with it the lr schedule) is right from step 0: from the listing (imagefolder),
from the `manifest.json` that `prepare_shards.py` writes, or else from the shards
themselves (Parquet footers; tar headers). `Source.stream` then yields rows of uint8 HWC
crops: the encoded bytes cross the object store, and decode + RandomResizedCrop + flip
run in one fused `map_batches` step on the CPUs left over by the training workers.

Files that do not decode are logged with their path and replaced in their batch by a
fresh crop of another image of the same batch, flagged in the row's `skipped` column;
training counts them (`skipped_images` in metrics.jsonl) and batch sizes stay whole.
"""
import fnmatch
import itertools
import json
import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data._internal.execution.backpressure_policy import (ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                                                          BackpressurePolicy)
from ray.data._internal.execution.operators.map_operator import MapOperator

from cluster.storage import Storage, open_storage
from mae.transforms import REGION_DECODE, decode_crop_batch

logger = logging.getLogger(__name__)

FORMATS = ("imagefolder", "webdataset", "parquet")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SHARD_EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png")
MANIFEST, CLASSES = "manifest.json", "classes.json"


class DataError(ValueError):
    """The data path does not hold what the config says it holds."""


def _list_files(fs: pafs.FileSystem, folder: str, recursive: bool = True) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise DataError(f"data.path: cannot list {folder}: {e}") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def expand_braces(pattern: str) -> list[str]:
    """`a-{0000..0003}.tar` -> a-0000.tar .. a-0003.tar (zero padding kept); `{a,b}` lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def list_shards(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    """Shard files of `path`: a folder (searched recursively), a glob, or a brace pattern."""
    ext = SHARD_EXTENSIONS[fmt]
    if "{" in path:
        shards = expand_braces(path)
        missing = [p for p, i in zip(shards, fs.get_file_info(shards)) if i.type != pafs.FileType.File]
        if missing:
            raise DataError(f"data.path: {len(missing)} of the {len(shards)} shards of the pattern do not exist "
                            f"(first: {missing[0]})")
        return shards
    if any(c in path for c in "*?["):
        folder = path[:path.index(next(c for c in path if c in "*?["))].rsplit("/", 1)[0]
        shards = sorted(i.path for i in _list_files(fs, folder) if fnmatch.fnmatch(i.path, path))
    else:
        shards = sorted(i.path for i in _list_files(fs, path) if i.path.endswith(ext))
    if not shards:
        raise DataError(f"data.path: no {ext} shards at {path} (data.format={fmt})")
    return shards


@dataclass(frozen=True)
class Source:
    """Where the images are and how many: listed and counted before training starts."""
    format: str
    uri: str
    fs: pafs.FileSystem
    files: tuple[str, ...]  # image files (imagefolder) or shards
    num_images: int
    classes: tuple[str, ...]  # class names (imagefolder, or the shards' classes.json); may be empty
    counts: tuple[int, ...] = ()  # images per shard (webdataset, parquet)

    def __len__(self) -> int:
        return self.num_images

    def stream(self, input_size: int, seed: int, batch_size: int = 256, read_files_per_task: int = 1024,
               decode_cpus: float = 1.0, decode_concurrency: int | None = None,
               augment: bool = True, ahead_bytes: int | None = None) -> ray.data.Dataset:
        """Rows {image: uint8 [S, S, 3], label: int64, skipped: int8}; the file or shard
        order is reshuffled on every execution (every epoch) from `seed`. `augment=False`
        gives the deterministic evaluation view (resize + centre crop) instead of the
        random crop and flip.

        Reading and decoding are one Ray Data operator: each read task reads its files (or
        its shard) and decodes `batch_size` images at a time into one block, so every CPU
        Ray Data may use decodes, instead of being split between a read and a decode
        operator. At most `decode_concurrency` tasks run at once (default: the cluster's
        CPUs / `decode_cpus`), and decoded crops that the consumer has not taken yet
        (queued, prefetched, or being decoded) stay under `ahead_bytes` (default: three
        blocks per decoder and two more, at most half the object store); see `DecodeAhead`."""
        if decode_concurrency is None:
            decode_concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // decode_cpus))
        if augment and not REGION_DECODE:
            logger.warning("mae_jpeg_region is not built (setup.py: needs a C compiler and libjpeg's headers, "
                           "Debian's libjpeg62-turbo-dev): JPEGs are decoded whole, about 20% slower")
        source = ImageDatasource(self, input_size, seed, batch_size, read_files_per_task, augment, decode_cpus)
        ds = ray.data.read_datasource(source, num_cpus=decode_cpus, concurrency=decode_concurrency,
                                      override_num_blocks=source.num_tasks())  # blocks of batch_size, unsplit
        block_bytes = batch_size * input_size * input_size * 3
        if ahead_bytes is None:
            store = ray.cluster_resources().get("object_store_memory", float("inf"))
            ahead_bytes = int(min((3 * decode_concurrency + 2) * block_bytes, store / 2))
        # each decoded batch leaves its task as a block of its own, at once: by default Ray
        # Data merges blocks up to 128 MB, and a tar shard's crops reached training in bursts
        # of 1,024 after a 1 s silence
        ds.context.target_max_block_size = block_bytes
        ds.context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [DecodeAhead])
        ds.context.set_config(DecodeAhead.CONFIG_KEY, (max(ahead_bytes, block_bytes), block_bytes))
        return ds

    def held_out(self, n: int, window: int = 256) -> list[bytes]:
        """Encoded bytes of `n` fixed images for figures: from `val/` of an imagefolder
        when it has one, else evenly spaced over the training images (for shards: over
        the first `window` images of the first shard, so that a 512 MB shard is not read
        on the driver before training starts)."""
        if self.format == "imagefolder":
            root = self.uri[len("s3://"):] if self.uri.startswith("s3://") else self.uri
            try:
                paths = list_imagefolder(self.fs, root.rstrip("/"), "val")[0]
            except DataError:
                paths = list(self.files)
            return [_read(self.fs, p) for p in evenly_spaced(paths, n)]
        if self.format == "parquet":
            import pyarrow.parquet as pq
            with self.fs.open_input_file(self.files[0]) as f:
                first = next(pq.ParquetFile(f).iter_batches(batch_size=window, columns=["image"]), None)
            blobs = first.column("image").field("bytes").to_pylist() if first is not None else []
        else:
            blobs = [data for data, _, _ in itertools.islice(_tar_samples(self.fs, self.files[0]), window)]
        return evenly_spaced([b for b in blobs if b], n)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def evenly_spaced(items, n: int) -> list:
    """At most `n` items spread over the whole sequence (so a sorted listing shows several classes)."""
    items = list(items)
    return [items[i * len(items) // n] for i in range(min(n, len(items)))]


def list_imagefolder(fs: pafs.FileSystem, root: str, split: str = "train") -> tuple[list[str], list[str]]:
    """(image paths sorted by class then name, class names sorted) of `<root>/<split>/<class>/<image>`."""
    top = f"{root}/{split}"
    if fs.get_file_info(top).type != pafs.FileType.Directory:
        raise DataError(f"data.path: {root!r} has no {split}/ folder (expected {top}/<class>/<image>)")
    paths = sorted(i.path for i in _list_files(fs, top)
                   if i.path.lower().endswith(IMAGE_EXTENSIONS) and i.path[len(top) + 1:].count("/") == 1)
    if not paths:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {top}/<class>/")
    classes = sorted({p.rsplit("/", 2)[-2] for p in paths})
    return paths, classes


def count_parquet(fs: pafs.FileSystem, shard: str) -> int:
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        return pq.ParquetFile(f).metadata.num_rows


def count_tar(fs: pafs.FileSystem, shard: str) -> int:
    """Samples (image members) of a WebDataset tar, reading only its headers where it can seek."""
    with fs.open_input_file(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return sum(1 for m in tar if m.isfile() and wds_member(m.name)[1] in WDS_IMAGE_KEYS)


def wds_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a WebDataset tar member: the key is the member's path up
    to the first dot of its basename, as WebDataset groups a sample's files."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return name[:len(name) - len(base)] + key, ext.lower()


def open_source(fmt: str, uri: str, endpoint: str | None = None, region: str | None = None,
                access_key: str | None = None, secret_key: str | None = None) -> Source:
    """List and count the training images of `uri` in layout `fmt` (see the module doc)."""
    store = open_storage(uri, endpoint, region, access_key, secret_key)
    fs, path = store.fs, store.root
    if fmt == "imagefolder":
        paths, classes = list_imagefolder(fs, path)
        return Source(fmt, uri, fs, tuple(paths), len(paths), tuple(classes))
    shards = list_shards(fs, path, fmt)
    folder = Storage(fs, shards[0].rsplit("/", 1)[0], uri)
    manifest = json.loads(folder.read(MANIFEST) or "null")
    counts = {folder.path(s["path"]): s["num_images"] for s in manifest["shards"]} if manifest else {}
    unknown = [s for s in shards if s not in counts]
    if unknown:  # published shards without our manifest: count them (in parallel)
        count = count_parquet if fmt == "parquet" else count_tar
        try:
            with ThreadPoolExecutor(16) as pool:
                counts.update(zip(unknown, pool.map(lambda s: count(fs, s), unknown)))
        except (OSError, tarfile.TarError, pa.ArrowInvalid) as e:
            raise DataError(f"data.path: cannot read the {fmt} shards at {uri}: {e}") from None
    classes = tuple(json.loads(folder.read(CLASSES) or "[]"))
    num_images = sum(counts[s] for s in shards)
    if num_images == 0:
        raise DataError(f"data.path: the {len(shards)} {fmt} shards at {uri} hold no images")
    return Source(fmt, uri, fs, tuple(shards), num_images, classes, tuple(counts[s] for s in shards))


def decode_batch(blobs: list, labels: np.ndarray, names: list, size: int, augment: bool = True) -> dict:
    """Decode + crop (+ flip) a batch of encoded images into a block's columns. Each call
    draws fresh crops from OS entropy, so every epoch sees new crops. Undecodable images
    are logged and replaced by a fresh crop of a decodable one of the batch, flagged in
    `skipped`; if none of the batch decodes, the batch is dropped."""
    rng = np.random.default_rng()
    images, ok, errors = decode_crop_batch([b if isinstance(b, bytes) else b"" for b in blobs], size, rng,
                                           augment=augment)
    for i, msg in errors.items():
        logger.warning("skipping %s: %s", names[i], msg)
    labels = np.asarray(labels, dtype=np.int64)
    skipped = np.zeros(len(ok), dtype=np.int8)
    if errors and ok:
        stand_ins = rng.choice(ok, size=len(errors))
        extra, _, _ = decode_crop_batch([blobs[i] for i in stand_ins], size, rng, augment=augment)
        images = np.concatenate([images, extra])
        labels = np.concatenate([labels[ok], labels[stand_ins]])
        skipped = np.concatenate([skipped, np.ones(len(errors), dtype=np.int8)])
    else:
        labels = labels[ok]
    return {"image": images, "label": labels, "skipped": skipped}


def _imagefolder_samples(fs: pafs.FileSystem, paths: list[str], class_index: dict[str, int]):
    for path in paths:
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except OSError as e:
            logger.warning("skipping %s: cannot read it: %s", path, e)
            data = b""
        yield data, class_index[path.rsplit("/", 2)[-2]], path


def _parquet_samples(fs: pafs.FileSystem, shard: str, batch_size: int, part: int = 0, parts: int = 1):
    """Samples of the `part`-th of `parts` contiguous runs of the shard's row groups."""
    import pyarrow.parquet as pq
    with fs.open_input_file(shard) as f:
        pf = pq.ParquetFile(f)
        n = pf.num_row_groups
        groups = list(range(part * n // parts, (part + 1) * n // parts))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=["image", "label"]):
            image = batch.column("image")
            blobs = image.field("bytes").to_pylist()
            names = (image.field("path").to_pylist() if image.type.get_field_index("path") >= 0
                     else [None] * len(blobs))
            for j, (data, label) in enumerate(zip(blobs, batch.column("label").to_pylist())):
                yield data, label, f"{shard}:{names[j] or j}"


def _tar_samples(fs: pafs.FileSystem, shard: str):
    """(image bytes, label, name) per sample: consecutive members grouped by `wds_member` key."""
    key, sample = None, {}

    def emit():
        data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), b"")
        try:
            label = int(sample.get("cls", b"-1"))
        except ValueError:
            label = -1
        return data, label, f"{shard}:{key}"

    with fs.open_input_stream(shard) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = wds_member(member.name)
            if k != key and key is not None:
                yield emit()
                sample = {}
            key = k
            if ext in (*WDS_IMAGE_KEYS, "cls"):
                sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield emit()


class DecodeAhead(BackpressurePolicy):
    """Ray Data backpressure for the decode operator, in place of Ray's policies: a new
    decode task is submitted only while fewer than twice the operator's `concurrency`
    are in flight and the crops decoded ahead of the consumer (blocks queued or
    prefetched, plus one block per task in flight) would stay within a byte budget.

    Ray's own policies throttle this stream: their adaptive concurrency cap and
    per-operator object store budget (tuned for many small blocks) left each of two
    decoders idle for 0.05-0.25 s after most 0.3 s blocks while the consumer waited
    (1.3-1.45 of 2 CPUs decoding; 1.8 with this policy, 1,000 -> 1,400 images/s). The
    budget is what bounds memory when training is slower than decoding: nothing spills."""
    CONFIG_KEY = "mae.decode_ahead"  # (budget bytes, bytes per block)

    @property
    def name(self) -> str:
        return "DecodeAhead"

    def can_add_input(self, op) -> bool:
        if not isinstance(op, MapOperator):
            return True
        # Up to 2 x concurrency tasks are submitted: Ray runs `concurrency` of them (their
        # CPUs) and starts a queued one the moment another ends, where waiting for Ray
        # Data's scheduling loop would leave a decoder idle for up to 0.2 s per block.
        running, cap = op.metrics.num_tasks_running, op.get_max_concurrency_limit()
        if cap is not None and running >= 2 * cap:
            return False
        budget, block_bytes = self._data_context.get_config(self.CONFIG_KEY, (None, 0))
        if budget is None:
            return True
        held = self._resource_manager.get_mem_op_outputs(op, include_ineligible_downstream=True)
        return held + (running + 1) * block_bytes <= budget


class ImageDatasource(ray.data.Datasource):
    """A source's images, read and decoded in the same Ray task (see Source.stream)."""

    def __init__(self, source: Source, size: int, seed: int, batch_size: int, files_per_task: int, augment: bool,
                 cpus: float = 1.0):
        self.source, self.size, self.seed, self.cpus = source, size, seed, cpus
        self.batch_size, self.files_per_task, self.augment = batch_size, files_per_task, augment

    def estimate_inmemory_data_size(self) -> int:
        return self.source.num_images * self.size * self.size * 3

    def get_name(self) -> str:
        return f"DecodeCrop({self.source.format})"

    def num_tasks(self) -> int:
        src = self.source
        if src.format == "imagefolder":
            return -(-len(src.files) // self.files_per_task)
        if src.format == "parquet":
            return sum(self.parts(c) for c in src.counts)
        return len(src.files)

    def parts(self, rows: int) -> int:
        """Read tasks a Parquet shard of `rows` rows is split into (by row groups)."""
        return max(1, rows // self.files_per_task)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        from ray.data.block import BlockAccessor, BlockMetadata
        from ray.data.datasource import ReadTask

        src = self.source
        execution = getattr(data_context, "_execution_idx", 0) if data_context is not None else 0
        rng = np.random.default_rng([self.seed, execution])  # a new order every execution (epoch)
        if src.format == "imagefolder":
            order = rng.permutation(len(src.files))
            units = [[src.files[i] for i in order[k:k + self.files_per_task]]
                     for k in range(0, len(order), self.files_per_task)]
            rows = [len(u) for u in units]
        elif src.format == "parquet":  # a shard is split into parts of about files_per_task rows (row groups)
            pieces = [(shard, k, self.parts(n), n) for shard, n in zip(src.files, src.counts)
                      for k in range(self.parts(n))]
            order = rng.permutation(len(pieces))
            units = [pieces[i][:3] for i in order]
            rows = [pieces[i][3] // pieces[i][2] for i in order]
        else:  # a tar shard is read start to end by one task
            order = rng.permutation(len(src.files))
            units = [src.files[i] for i in order]
            rows = [src.counts[i] for i in order]
        fs, fmt, size, augment, batch = src.fs, src.format, self.size, self.augment, self.batch_size
        threads = max(1, int(self.cpus))
        class_index = {c: i for i, c in enumerate(src.classes)}

        def read(unit):
            import torch
            torch.set_num_threads(threads)  # one decoder per CPU it holds; no oversubscription
            if fmt == "imagefolder":
                samples = _imagefolder_samples(fs, unit, class_index)
            elif fmt == "parquet":
                samples = _parquet_samples(fs, unit[0], batch, unit[1], unit[2])
            else:
                samples = _tar_samples(fs, unit)

            def block(chunk):
                return BlockAccessor.batch_to_block(decode_batch(*map(list, zip(*chunk)), size, augment))

            pending = []  # a tail shorter than half a batch joins the task's last block, not a block of its own
            for sample in samples:
                pending.append(sample)
                if len(pending) == batch + batch // 2:
                    yield block(pending[:batch])
                    pending = pending[batch:]
            if pending:
                yield block(pending)

        return [ReadTask(lambda unit=unit: read(unit),
                         BlockMetadata(num_rows=n, size_bytes=n * size * size * 3, exec_stats=None,
                                       input_files=tuple(unit) if isinstance(unit, list) else (unit[0],)
                                       if isinstance(unit, tuple) else (unit,)),
                         per_task_row_limit=per_task_row_limit)
                for unit, n in zip(units, rows)]
