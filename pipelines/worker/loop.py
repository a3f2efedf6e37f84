"""The per-worker train loop that Ray Train runs on every worker.

Each worker's plugin and device are set up before its process group exists
(cluster/torch_backend.py). The loop builds the model, restores where the run left off
(pipelines/worker/state.py), wraps DDP itself and trains on its shard of the Ray Data
stream. Rank 0 writes the checkpoint and the run's files at each epoch end (and every
`train.checkpoint_every_steps` steps); every rank reports to Ray Train.

Every random draw of a run follows from `train.seed`: the stream's order and crops from
(seed, epoch, the image's position: pipelines/data/stream.py), the MAE's masking noise of an
image likewise (`masking_noise`), the drop path, random erasing and Mixup of a micro-batch
from (seed, epoch, micro-batch, rank). In an elastic run the images of each optimizer step
are the same at any worker count (the stream's blocks are micro-batches, dealt in turn). A
run resumed from a mid-epoch checkpoint continues at the next micro-batch with the right lr,
in the same epoch (the images trained before are read, not decoded, and dropped here): at the
same worker count it goes on exactly as the run that was never stopped; at another, in an
elastic run, each step trains the same images with the same masks, the gradients summed in
another order; otherwise the rest of that epoch is drawn anew.
"""
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from cluster.accelerators import Accelerator, prepare_device
from cluster.torch_compat import eager_fallback
from mae.recipe import set_lr
from pipelines.common.errors import FatalError, one_line
from pipelines.common.schedule import Schedule
from pipelines.data.lanes import DTYPES, EpochStreams
from pipelines.data.lanes import NAMES as LANES
from pipelines.data.lanes import merge_runs, runs_of, within
from pipelines.data.skips import epoch_counts, skip_counter
from pipelines.output.console import flush_to_driver, forward_to_driver
from pipelines.output.run_files import best_epoch, end_attempt, ended_by
from pipelines.worker.job import JOB, VAL, Worker, WorkerJob
from pipelines.worker.report import EpochLog, Progress, Reporter
from pipelines.worker.state import (
    State,
    build_state,
    read_pretrained,
    restore,
    starting_checkpoint,
)
from pipelines.worker.step import (
    AMP_DTYPES,
    StepConfig,
    masking_noise,
    micro_step,
    optimizer_step,
    wrap_model,
)
from pipelines.worker.tasks import evaluate, task_of

logger = logging.getLogger("mae.train")


class NonFiniteLossError(FatalError):
    """The loss became NaN or infinite; the run stops without checkpointing the weights."""


@dataclass
class Loop:
    """What every epoch of this worker uses, built once when the worker starts."""
    job: WorkerJob
    worker: Worker
    sched: Schedule
    step: StepConfig
    model: torch.nn.Module  # compiled and DDP-wrapped; `State.model` is the bare model
    reporter: Reporter
    progress: Progress


# Errors that a restart meets again: the run's own code or data, not the cluster. Everything
# else (a dead peer's collective error, a lost object, a storage OSError) is Ray Train's to retry.
DETERMINISTIC = (FatalError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError,
                 NotImplementedError, AssertionError, ArithmeticError)


def train_loop_per_worker(config: dict) -> None:
    """Train, ending the run once on an error a restart would meet again: Ray Train's failure
    policy retries every worker error up to `run.max_failures` (-1: forever). `config[JOB]`:
    the driver's WorkerJob.

    A FatalError (a non-finite loss, bf16 unsupported, a data error from the stream) is met
    by every rank at the same point: they all return normally, rank 0 having recorded its
    message as this start's `error` in attempts.jsonl. Another deterministic error (a
    ValueError, a KeyError...) may hit one rank only: that rank records it and raises, and
    the restart that Ray Train may make finds it recorded for this Ray job and returns at
    once. The driver prints the recorded error and exits 1."""
    job: WorkerJob = config[JOB]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not job.cfg.run.verbose:  # the driver shows our lines only: pipelines/output/console.py
        rank = ray.train.get_context().get_world_rank()
        forward_to_driver(f"rank {rank} on {ray.util.get_node_ip_address()}", everything=rank == 0)
    job_id = ray.get_runtime_context().get_job_id()
    error = ended_by(job.storage, job_id)
    if error is not None:
        logger.error("not training: this run ended on an error a restart would meet again: %s", error)
        return
    try:
        with eager_fallback():
            train(job)
    except DETERMINISTIC as e:
        rank = ray.train.get_context().get_world_rank()
        message = error_message(e)
        print(f"rank {rank}: {message}", file=sys.stderr)  # its log; the driver prints the recorded error once
        if isinstance(e, FatalError):
            if rank == 0:
                end_attempt(job.storage, message, job_id)
            return
        end_attempt(job.storage, message, job_id)
        raise
    finally:
        flush_to_driver()


def error_message(e: BaseException) -> str:
    """One line for attempts.jsonl and the driver: an error from a Ray task or actor (the
    stream's) by its cause, a FatalError by its message, others with their type."""
    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None and e.cause is not e:
        e = e.cause
    text = one_line(e)
    return text if isinstance(e, FatalError) else f"{type(e).__name__}: {text}"


def train(job: WorkerJob) -> None:
    """Every epoch from where the run left off, each evaluated (classification) and reported."""
    loop, state = start(job)
    cfg, worker = job.cfg, loop.worker
    ledger = skip_counter()
    streams = EpochStreams([ray.train.get_dataset_shard(name) for name in LANES], job.stream, ledger,
                           plans=worker.is_chief, batch_size=cfg.train.batch_size, drop_last=True, device="cpu",
                           pin_memory=worker.device.type == "cuda", prefetch_batches=cfg.data.prefetch_batches,
                           dtypes=DTYPES)
    val = ray.train.get_dataset_shard(VAL) if job.val else None
    for epoch in range(state.epoch, loop.sched.epochs):
        metrics, log = train_epoch(loop, state, streams, ledger, epoch)
        best = val is not None and validate(loop, state, val, metrics)
        loop.reporter.epoch_end(state, metrics, log, best)
    loop.reporter.finish()  # the last checkpoint is in the run directory before the run ends


def start(job: WorkerJob) -> tuple[Loop, State]:
    """This start of the worker group: the state where the run left off (or its initial
    weights), the wrapped model, the step, and rank 0's reporting."""
    cfg, task, accelerator = job.cfg, task_of(job.cfg), job.cfg.accelerator
    worker, placement = start_worker(accelerator, cfg.train.precision)
    sched = Schedule.of(cfg, job.num_images, worker.world)
    state = build_state(cfg, accelerator, worker.device, sched.peak_lr, job.num_classes)
    state.micro_batch_images, state.workers = cfg.train.batch_size * worker.world, worker.world
    state.step_blocks = cfg.step_blocks
    ckpt, source = starting_checkpoint(cfg.run)
    if ckpt is None:
        source = task.initial_weights(state.model, cfg, read_pretrained)
    restore(state, ckpt, sched.steps_per_epoch, task)
    if cfg.train.compile and not accelerator.compiles:
        logger.warning("train.compile: torch.compile is not supported on %s; running eager", accelerator.device_type)
    model = wrap_model(state.model, cfg.train.compile and accelerator.compiles, worker.world)
    size = cfg.model.input_size  # the CPU's batches are normalised into one tensor, reused
    inputs = torch.empty((cfg.train.batch_size, 3, size, size)) if worker.device.type == "cpu" else None
    objective = task.objective(cfg, job.num_classes, worker.device)
    patches = state.model.patch_embed.num_patches if objective is None else 0
    step = StepConfig(worker.device, cfg.model.mask_ratio, sched.accum_iter, AMP_DTYPES[cfg.train.precision],
                      objective, inputs, patches)
    reporter = Reporter.start(job, worker, state, sched, gather_objects(placement, worker.world), source)
    return Loop(job, worker, sched, step, model, reporter, Progress(sched, time.perf_counter(), state.step)), state


def train_epoch(loop: Loop, state: State, streams: EpochStreams, ledger, epoch: int) -> tuple[dict, EpochLog]:
    """Train epoch `epoch` (from `state.iteration` on); its metrics and step log."""
    cfg, sched, worker = loop.job.cfg, loop.sched, loop.worker
    batches = streams.epoch(epoch, state.iteration, epoch + 1 if epoch + 1 < sched.epochs else None, state.trained)
    t0 = time.perf_counter()
    log = train_one_epoch(loop, state, batches, epoch)
    seconds = time.perf_counter() - t0
    stream = {}
    if worker.is_chief:  # every read task of the epoch has ended: see pipelines/data/skips.py
        stream = epoch_counts(ledger, loop.job.stream, epoch)
        log.skipped = stream["skipped"]
    if not log.synced and state.iteration < sched.steps_per_epoch * sched.accum_iter:
        raise FatalError(f"epoch {epoch}: the stream gave too few images for one step of "
                         f"{sched.images_per_step}; {log.skipped if worker.is_chief else 'some'} images were "
                         "skipped (their warnings above say why)")
    state.epoch, state.iteration, state.trained = epoch + 1, 0, None
    metrics = {"epoch": epoch, "train_loss": sum(log.synced) / max(len(log.synced), 1),
               "train_lr": log.lrs[-1] if log.lrs else 0.0, "steps": len(log.synced),
               "images_per_sec": len(log.synced) * sched.images_per_step / seconds,
               "epoch_seconds": seconds, "skipped_images": log.skipped}
    if stream.get("decode_seconds"):  # rank 0: what the decoders did for this epoch
        metrics["decoded_images"] = stream["decoded"]
        metrics["decode_images_per_cpu_sec"] = stream["decoded"] / (stream["decode_seconds"] * cfg.data.decode_cpus)
    return metrics, log


def validate(loop: Loop, state: State, val, metrics: dict) -> bool:
    """Evaluate the bare model on this worker's share of the validation stream (every rank
    holds the same weights: no collective per batch) into `metrics`; whether this epoch is
    the run's best so far."""
    cfg = loop.job.cfg
    batches = val.iter_torch_batches(batch_size=cfg.train.batch_size, dtypes=DTYPES, device="cpu",
                                     prefetch_batches=cfg.data.prefetch_batches)
    metrics.update(evaluate(state.model, batches, loop.worker.device, loop.step.amp_dtype, loop.worker.world).metrics())
    best = best_epoch([m for m in (state.best, metrics) if m is not None])
    if best is metrics:
        state.best = {"epoch": metrics["epoch"], "val_top1": metrics["val_top1"], "val_top5": metrics["val_top5"]}
    metrics["best_val_top1"] = state.best["val_top1"]
    return best is metrics


def start_worker(accelerator: Accelerator, precision: str) -> tuple[Worker, dict]:
    """This worker's rank and device (already prepared before init_process_group; idempotent),
    and where it runs, logged."""
    ctx = ray.train.get_context()
    device = prepare_device(accelerator, ctx.get_local_rank())
    if precision == "bf16" and not accelerator.supports_bf16():
        raise FatalError(f"train.precision=bf16: this {accelerator.device_type} device does not support bf16; use fp16")
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), device)
    placement = worker_placement(worker.rank, device)
    logger.info("rank %d: pid %d on %s, device %s, Ray resources %s", worker.rank, placement["pid"],
                placement["node_ip"], device, placement["resources"])
    return worker, placement


def worker_placement(rank: int, device: torch.device) -> dict:
    """Where this worker runs: its rank, node, pid, device and the Ray resources it holds."""
    ctx = ray.get_runtime_context()
    return {"rank": rank, "node_ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
            "pid": os.getpid(), "device": str(device), "resources": ctx.get_assigned_resources()}


def gather_objects(obj, world: int) -> list:
    """`obj` of every rank, in rank order (over the process group Ray Train set up)."""
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train_one_epoch(loop: Loop, state: State, batches, epoch: int) -> EpochLog:
    """Micro-batches `state.iteration` .. the last that fills an optimizer step."""
    sched, worker = loop.sched, loop.worker
    accum = sched.accum_iter
    used_iters = sched.steps_per_epoch * accum  # trailing micro-batches that fill no step are dropped
    start = state.iteration
    log = EpochLog(losses=torch.zeros(sched.steps_per_epoch - start // accum, device=worker.device),
                   first=start // accum)
    loop.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    positions = []  # of the images this worker trained on in this attempt of the epoch
    seed = loop.job.cfg.train.seed
    for i, batch in enumerate(untrained(batches, state.trained), start=start):
        if i >= used_iters:
            continue  # the stream runs to its end, so that its skip count is complete
        seed_micro_batch(seed, epoch, i, worker.rank)
        noise = masking_noise(seed, epoch, batch["position"].numpy(), loop.step.patches) if loop.step.patches else None
        positions.append(batch["position"])
        j = i // accum - log.first
        if i % accum == 0:
            step_rows = 0
            lr = sched.lr(epoch, i)
            set_lr(state.optimizer, lr)
            log.lrs.append(lr)
            log.epochs.append(sched.fraction(epoch, i))
        last_micro = (i + 1) % accum == 0
        loss = micro_step(loop.model, batch["image"], loop.step, state.scaler, sync_grads=last_micro, noise=noise,
                          labels=batch["label"])
        log.losses[j] += loss.float() / accum
        step_rows += len(batch["image"])
        if not last_micro:
            continue
        log.images.append(step_rows * worker.world)
        optimizer_step(state.optimizer, state.scaler)
        state.step += 1
        if (j + 1) % sched.log_every_steps == 0:
            sync_losses(log, j + 1, state.step, worker.world)
            if worker.is_chief:
                loop.progress.log(state.step, epoch, log)
        every = sched.checkpoint_every_steps
        if every and state.step % every == 0 and i + 1 < used_iters:
            sync_losses(log, j + 1, state.step, worker.world)
            state.iteration = i + 1
            mine = runs_of(torch.cat(positions).numpy())
            state.trained = merge_runs(state.trained or [], *gather_objects(mine, worker.world))
            positions = [torch.cat(positions)]
            loop.reporter.mid_epoch(state, {"epoch": epoch, "step": state.step, "mid_epoch": True,
                                            "train_loss": sum(log.synced) / len(log.synced)}, log)
    sync_losses(log, len(log.lrs), state.step, worker.world)
    return log


def seed_micro_batch(seed: int, epoch: int, iteration: int, rank: int) -> None:
    """Seed every generator a micro-batch draws from (torch's on every device: drop path,
    random erasing; Python's and numpy's: Mixup / CutMix) from (train.seed, epoch,
    micro-batch, rank): a resumed run draws what the uninterrupted one drew. (The MAE's
    masking noise is drawn per image: `masking_noise`.)"""
    a, b, c = np.random.SeedSequence([seed, epoch, iteration, rank]).generate_state(3).tolist()
    torch.manual_seed(a << 32 | b)
    random.seed(c)
    np.random.seed(c)


def untrained(batches, trained: list | None):
    """The batches of an epoch without the rows of images trained before the resume (`trained`:
    runs of positions; their rows are blank, never decoded). They are whole batches, the first
    ones of each worker's split (at any worker count where the blocks are micro-batches)."""
    for batch in batches:
        if trained:
            done = torch.from_numpy(within(batch["position"].numpy(), trained))
            if bool(done.all()):
                continue
            if bool(done.any()):
                batch = {k: v[~done] for k, v in batch.items()}
        yield batch


def sync_losses(log: EpochLog, upto: int, step: int, world: int) -> None:
    """All-reduce the step losses not yet synced (one host sync); stop on a non-finite one."""
    start = len(log.synced)
    if upto <= start:
        return
    chunk = log.losses[start:upto].clone()
    if world > 1:
        dist.all_reduce(chunk)
        chunk /= world
    values = chunk.tolist()
    for j, v in enumerate(values):
        if not math.isfinite(v):
            bad_step = step - (upto - start) + j + 1
            raise NonFiniteLossError(f"loss is {v} at step {bad_step}; stopping without saving a checkpoint")
    log.synced.extend(values)


