"""The per-worker train loop that Ray Train runs on every worker.

Each worker's plugin and device are set up before its process group exists
(cluster/torch_backend.py). The loop builds the model, restores where the run left off
(pipelines/worker/state.py), wraps DDP itself and trains on its shard of the Ray Data
stream. Rank 0 writes the checkpoint and the run's files at each epoch end (and every
`train.checkpoint_every_steps` steps); every rank reports to Ray Train.

A run resumed from a mid-epoch checkpoint continues at the next micro-batch with the
right lr; the rest of that epoch is drawn from a fresh shuffle of the stream, so its
images may differ from those the interrupted attempt would have seen.
"""
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cluster.accelerators import Accelerator, prepare_device
from cluster.storage import Storage
from mae.checkpoint import checkpoint_dir_name
from mae.model import preset
from mae.recipe import fractional_epoch, lr_at, set_lr
from mae.transforms import eval_crops, normalize_on_device
from mae.visualize import grid_png, reconstruct
from pipelines.common.config import Config, ModelConfig, from_dict
from pipelines.output.console import flush_to_driver, forward_to_driver
from pipelines.common.errors import FatalError
from pipelines.output.run_files import RunLog, end_attempt, ended_by
from pipelines.data.skips import epoch_counts, skip_counter
from pipelines.data.lanes import DTYPES, NAMES as LANES, EpochStreams
from pipelines.worker.tasks import Objective, evaluate, init_from_pretrained
from pipelines.worker.state import (CheckpointWriter, State, build_state, read_pretrained, restore, run_record,
                                   starting_checkpoint)

logger = logging.getLogger("mae.train")

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TASK_VERBS = {"pretrain": "training", "finetune": "fine-tuning", "linprobe": "linear probing"}
VAL = "val"  # the validation stream's dataset name in Ray Train (fine-tuning, linear probing)


class NonFiniteLossError(FatalError):
    """The loss became NaN or infinite; the run stops without checkpointing the weights."""




@dataclass(frozen=True)
class Worker:
    """This training worker: its rank among `world` workers and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes the run files, the figures and the checkpoint."""
        return self.rank == 0


@dataclass(frozen=True)
class StepConfig:
    """What one micro-step needs. `objective(model, images, labels)`: the loss of a
    classification task (pipelines/worker/tasks.py); None: the MAE's own at `mask_ratio`."""
    device: torch.device
    mask_ratio: float
    accum_iter: int
    amp_dtype: torch.dtype | None = None
    objective: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass
class Schedule:
    """The run's time axis at this worker-group size: how many batches an epoch has, where
    the lr comes from, and when to log and checkpoint.

    The effective batch is the config's at every size, so an epoch has the same number of
    optimizer steps (floor(images / effective batch)) at every size, and the lr of its k-th
    step is the schedule's at fractional epoch epoch + k / steps_per_epoch."""
    iters_per_epoch: int  # data batches per worker per epoch (the reference's len(loader))
    accum_iter: int
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    images_per_step: int  # the effective batch
    log_every_steps: int = 20
    checkpoint_every_steps: int = 0  # 0: at epoch ends only

    @classmethod
    def of(cls, cfg: Config, num_images: int, world: int) -> "Schedule":
        o, t = cfg.optim, cfg.train
        effective = cfg.effective_batch
        peak = o.lr or o.blr * effective / 256
        iters = (num_images // world) // t.batch_size
        return cls(iters, cfg.accum_iter(world), peak, o.min_lr, o.warmup_epochs, t.epochs, effective,
                   t.log_every_steps, t.checkpoint_every_steps)

    @property
    def steps_per_epoch(self) -> int:
        return self.iters_per_epoch // self.accum_iter

    def fraction(self, epoch: int, iteration: int) -> float:
        """The fractional epoch of the optimizer step that micro-batch `iteration` belongs to."""
        return fractional_epoch(epoch, iteration // self.accum_iter, self.steps_per_epoch)

    def lr(self, epoch: int, iteration: int) -> float:
        return lr_at(self.fraction(epoch, iteration), self.peak_lr, self.min_lr, self.warmup_epochs, self.epochs)


@dataclass
class EpochLog:
    """Per-step losses of one epoch kept on the device; synced (all-reduced) every N steps.
    Index j is the epoch's optimizer step `first + j`."""
    losses: torch.Tensor
    first: int = 0  # first step index of the epoch this attempt runs (> 0 after a mid-epoch resume)
    lrs: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)  # images that went into each step, over all workers
    synced: list[float] = field(default_factory=list)
    skipped: int = 0  # images the stream skipped this epoch (rank 0, set at the epoch's end)
    written: int = 0  # records already written to steps.jsonl (by a mid-epoch checkpoint)
    last_log: tuple[int, float] = field(default_factory=lambda: (0, time.perf_counter()))  # (records, time)

    def records(self, last_step: int) -> list[dict]:
        """Step records synced but not yet written; `last_step` is the global step of the last."""
        base = last_step - len(self.synced) + 1
        new = [{"step": base + j, "epoch": self.epochs[j], "loss": self.synced[j], "lr": self.lrs[j],
                "images": self.images[j]}
               for j in range(self.written, len(self.synced))]
        self.written = len(self.synced)
        return new


@dataclass
class Loop:
    """What every epoch of this worker uses, built once when the worker starts."""
    worker: Worker
    sched: Schedule
    step: StepConfig
    model: torch.nn.Module  # compiled and DDP-wrapped; `State.model` is the bare model
    reporter: "Reporter"
    progress: "Progress"


# Errors that a restart meets again: the run's own code or data, not the cluster. Everything
# else (a dead peer's collective error, a lost object, a storage OSError) is Ray Train's to retry.
DETERMINISTIC = (FatalError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError,
                 NotImplementedError, AssertionError, ArithmeticError)


def train_loop_per_worker(config: dict) -> None:
    """Train, ending the run once on an error a restart would meet again: Ray Train's failure
    policy retries every worker error up to `run.max_failures` (-1: forever).

    A FatalError (a non-finite loss, bf16 unsupported, a data error from the stream) is met
    by every rank at the same point: they all return normally, rank 0 having recorded its
    message as this start's `error` in attempts.jsonl. Another deterministic error (a
    ValueError, a KeyError...) may hit one rank only: that rank records it and raises, and
    the restart that Ray Train may make finds it recorded for this Ray job and returns at
    once. The driver prints the recorded error and exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not config["cfg"]["run"].get("verbose", False):  # the driver shows our lines only: pipelines/output/console.py
        rank = ray.train.get_context().get_world_rank()
        forward_to_driver(f"rank {rank} on {ray.util.get_node_ip_address()}", everything=rank == 0)
    job_id = ray.get_runtime_context().get_job_id()
    error = ended_by(config["storage"], job_id)
    if error is not None:
        logger.error("not training: this run ended on an error a restart would meet again: %s", error)
        return
    try:
        train(config)
    except DETERMINISTIC as e:
        rank = ray.train.get_context().get_world_rank()
        message = error_message(e)
        print(f"rank {rank}: {message}", file=sys.stderr)  # its log; the driver prints the recorded error once
        if isinstance(e, FatalError):
            if rank == 0:
                end_attempt(config["storage"], message, job_id)
            return
        end_attempt(config["storage"], message, job_id)
        raise
    finally:
        flush_to_driver()


def error_message(e: BaseException) -> str:
    """One line for attempts.jsonl and the driver: an error from a Ray task or actor (the
    stream's) by its cause, a FatalError by its message, others with their type."""
    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None and e.cause is not e:
        e = e.cause
    text = " ".join(str(e).split())
    return text if isinstance(e, FatalError) else f"{type(e).__name__}: {text}"


def train(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    row, task = cfg.accelerator, cfg.train.task
    worker, placement = start_worker(row, cfg.train.precision)
    sched = Schedule.of(cfg, config["num_images"], worker.world)
    state = build_state(cfg, row, worker.device, sched.peak_lr, config.get("num_classes"))
    state.micro_batch_images = cfg.train.batch_size * worker.world
    ckpt, source = starting_checkpoint(cfg.run)
    if ckpt is None and task != "pretrain" and cfg.model.checkpoint:
        fresh = init_from_pretrained(state.model, read_pretrained(cfg), task)
        source = f"the encoder of model.checkpoint={cfg.model.checkpoint} (newly initialised: {', '.join(fresh)})"
    elif ckpt is None and task != "pretrain":
        source = "random weights (no model.checkpoint)"
    restore(state, ckpt, sched.steps_per_epoch)
    if cfg.train.compile and not row.compiles:
        logger.warning("train.compile: torch.compile is not supported on %s; running eager", row.device_type)
    model = wrap_model(state.model, cfg.train.compile and row.compiles, worker.world)
    amp_dtype = AMP_DTYPES[cfg.train.precision]
    objective = Objective(cfg, config["num_classes"], worker.device) if task != "pretrain" else None
    step = StepConfig(worker.device, cfg.model.mask_ratio, sched.accum_iter, amp_dtype, objective)
    placements = gather_objects(placement, worker.world)
    reporter = Reporter(worker, run_record(cfg, worker.world, sched.accum_iter), config["storage"])
    if worker.is_chief:
        tracker = None
        if cfg.run.mlflow_tracking_uri:
            from pipelines.output.tracking import MlflowTracker
            tracker = MlflowTracker(config["storage"], cfg.run.mlflow_tracking_uri, cfg.run.mlflow_experiment,
                                    cfg.run.name, config["cfg"])
        figures = Figures(config["held_out"], cfg.model, cfg.train.seed, worker.device) if task == "pretrain" else None
        reporter.start(RunLog(config["storage"], state.epoch, state.step, cfg.run.tensorboard, tracker), figures)
        reporter.run_log.record_attempt({"job_id": ray.get_runtime_context().get_job_id(),
                                         "epoch": state.epoch, "iteration": state.iteration, "step": state.step,
                                         "source": source, "workers": placements})
        logger.info("%s %s from epoch %d, micro-batch %d (step %d; %s) to epoch %d: %d workers x batch %d x "
                    "accum %d = %d images per step, lr %.3g, %d steps per epoch", TASK_VERBS[task], cfg.model.name,
                    state.epoch, state.iteration, state.step, source, sched.epochs, worker.world,
                    cfg.train.batch_size, sched.accum_iter, sched.images_per_step, sched.peak_lr,
                    sched.steps_per_epoch)
    loop = Loop(worker, sched, step, model, reporter, Progress(sched, time.perf_counter(), state.step))
    counter = skip_counter()
    streams = EpochStreams([ray.train.get_dataset_shard(name) for name in LANES], config["stream"], counter,
                           plans=worker.is_chief, batch_size=cfg.train.batch_size, drop_last=True, device="cpu",
                           pin_memory=worker.device.type == "cuda", prefetch_batches=cfg.data.prefetch_batches,
                           dtypes=DTYPES)
    val = ray.train.get_dataset_shard(VAL) if config.get("val") else None
    for epoch in range(state.epoch, sched.epochs):
        torch.manual_seed(hash((cfg.train.seed, worker.rank, epoch, state.iteration)) % 2**63)  # masking noise
        batches = streams.epoch(epoch, state.iteration, epoch + 1 if epoch + 1 < sched.epochs else None)
        t0 = time.perf_counter()
        log = train_one_epoch(loop, state, batches, epoch)
        seconds = time.perf_counter() - t0
        stream = {}
        if worker.is_chief:  # every read task of the epoch has ended: see pipelines/data/skips.py
            stream = epoch_counts(counter, config["stream"], epoch)
            log.skipped = stream["skipped"]
        if not log.synced and state.iteration < sched.steps_per_epoch * sched.accum_iter:
            raise FatalError(f"epoch {epoch}: the stream gave too few images for one step of "
                             f"{sched.images_per_step}; {log.skipped if worker.is_chief else 'some'} images were "
                             "skipped (their warnings above say why)")
        state.epoch, state.iteration = epoch + 1, 0
        metrics = {"epoch": epoch, "train_loss": sum(log.synced) / max(len(log.synced), 1),
                   "train_lr": log.lrs[-1] if log.lrs else 0.0, "steps": len(log.synced),
                   "images_per_sec": len(log.synced) * sched.images_per_step / seconds,
                   "epoch_seconds": seconds, "skipped_images": log.skipped}
        if stream.get("decode_seconds"):  # rank 0: what the decoders did for this epoch
            metrics["decoded_images"] = stream["decoded"]
            metrics["decode_images_per_cpu_sec"] = stream["decoded"] / (stream["decode_seconds"] * cfg.data.decode_cpus)
        best = False
        if val is not None:  # the bare model: every rank holds the same weights, no collective per batch
            batches = val.iter_torch_batches(batch_size=cfg.train.batch_size, dtypes=DTYPES, device="cpu",
                                             prefetch_batches=cfg.data.prefetch_batches)
            accuracy = evaluate(state.model, batches, worker.device, amp_dtype, worker.world)
            metrics.update(accuracy.metrics())
            best = state.best is None or metrics["val_top1"] > state.best["val_top1"]
            if best:
                state.best = {"epoch": epoch, "val_top1": metrics["val_top1"], "val_top5": metrics["val_top5"]}
            metrics["best_val_top1"] = state.best["val_top1"]
        reporter.epoch_end(state, metrics, log, best)
    if worker.is_chief:
        reporter.writer.wait()  # the last checkpoint is in the run directory before the run ends
        if reporter.run_log.tracker is not None:
            reporter.run_log.tracker.finish()


def start_worker(row: Accelerator, precision: str) -> tuple[Worker, dict]:
    """This worker's rank and device (already prepared before init_process_group; idempotent),
    and where it runs, logged."""
    ctx = ray.train.get_context()
    device = prepare_device(row, ctx.get_local_rank())
    if precision == "bf16" and not row.supports_bf16():
        raise FatalError(f"train.precision=bf16: this {row.device_type} device does not support bf16; use fp16")
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


def wrap_model(model: torch.nn.Module, compile: bool, world: int) -> torch.nn.Module:
    """torch.compile (in place, so state-dict keys stay the official ones), then DDP.

    Every parameter is used every step, so DDP looks for no unused ones. If compilation
    fails for a graph, dynamo falls back to eager for it with a warning instead of
    stopping the run.
    """
    if compile:
        torch._dynamo.config.suppress_errors = True
        model.compile()
    if world > 1:
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    return model


def micro_step(model: torch.nn.Module, images: torch.Tensor, step: StepConfig, scaler: torch.amp.GradScaler,
               sync_grads: bool = True, noise: torch.Tensor | None = None,
               inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Forward + backward of one micro-batch of uint8 [N, H, W, 3] images (and their
    `labels`, for a classification objective); returns the detached loss. With
    `sync_grads=False` a DDP model skips its all-reduce (`no_sync`). `inputs`: a float
    [N, 3, H, W] tensor on the step's device to normalise the batch into (reused from step to
    step on the CPU, where allocating it anew costs more than normalising)."""
    imgs = normalize_on_device(images, step.device, out=inputs)
    no_sync = not sync_grads and isinstance(model, DistributedDataParallel)
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with torch.autocast(step.device.type, dtype=step.amp_dtype, enabled=step.amp_dtype is not None):
            if step.objective is None:
                loss, _, _ = model(imgs, mask_ratio=step.mask_ratio, noise=noise)
            else:
                loss = step.objective(model, imgs, labels.to(step.device, non_blocking=True))
        scaler.scale(loss / step.accum_iter).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


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
    inputs = None  # on the CPU, the float batch is reused from step to step
    for i, batch in enumerate(batches, start=start):
        if i >= used_iters:
            continue  # the stream runs to its end, so that its skip count is complete
        j = i // accum - log.first
        if i % accum == 0:
            step_rows = 0
            lr = sched.lr(epoch, i)
            set_lr(state.optimizer, lr)
            log.lrs.append(lr)
            log.epochs.append(sched.fraction(epoch, i))
        if inputs is None and worker.device.type == "cpu":
            n, h, w, _ = batch["image"].shape
            inputs = torch.empty((n, 3, h, w))
        last_micro = (i + 1) % accum == 0
        loss = micro_step(loop.model, batch["image"], loop.step, state.scaler, sync_grads=last_micro, inputs=inputs,
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
            loop.reporter.mid_epoch(state, {"epoch": epoch, "step": state.step, "mid_epoch": True,
                                            "train_loss": sum(log.synced) / len(log.synced)}, log)
    sync_losses(log, len(log.lrs), state.step, worker.world)
    return log


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


@dataclass
class Progress:
    """Rank 0's progress line: epoch, step, loss and lr of the steps since the last line,
    images/s, and the time left at the rate since this start of the worker group."""
    sched: Schedule
    started: float  # time.perf_counter() when this start began
    first_step: int  # global step it began at

    def log(self, step: int, epoch: int, log: EpochLog) -> None:
        sched, now = self.sched, time.perf_counter()
        eta = (now - self.started) / max(step - self.first_step, 1) * (sched.epochs * sched.steps_per_epoch - step)
        recent = log.synced[log.last_log[0]:]
        images_per_sec = len(recent) * sched.images_per_step / (now - log.last_log[1])
        log.last_log = (len(log.synced), now)
        logger.info("epoch %d/%d  step %d/%d  loss %.4f  lr %.3e  images/s %.1f  eta %s",
                    epoch, sched.epochs, log.first + len(log.synced), sched.steps_per_epoch,
                    sum(recent) / len(recent), log.lrs[len(log.synced) - 1], images_per_sec,
                    time.strftime("%H:%M:%S", time.gmtime(eta)))


class Figures:
    """Rank 0's reconstructions of a fixed held-out set, with fixed masks, after each epoch
    (none when the source had no decodable image to hold out)."""

    def __init__(self, held_out: list[bytes], model: ModelConfig, seed: int, device: torch.device):
        self.images = normalize_on_device(eval_crops(held_out, model.input_size), device) if held_out else None
        num_patches = (model.input_size // preset(model.name)["patch_size"]) ** 2
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.rand(len(held_out), num_patches, generator=generator).to(device)
        self.mask_ratio = model.mask_ratio

    def reconstructions(self, model: torch.nn.Module, epoch: int) -> bytes | None:
        if self.images is None:
            return None
        panels = reconstruct(model, self.images, self.mask_ratio, self.noise)
        return grid_png(panels, title=f"epoch {epoch}")


class Reporter:
    """Where each checkpoint's results go: rank 0 writes the run files (`run_log`, with the
    figures) and hands the state, copied off the device, to its CheckpointWriter, which
    writes and uploads checkpoint.pth in the background; every rank reports to Ray Train.
    `record`: what every checkpoint records of the config."""

    def __init__(self, worker: Worker, record: dict, storage: Storage):
        self.worker, self.record = worker, record
        self.writer = CheckpointWriter(storage)  # rank 0's; the upload runs in the background
        self.run_log: RunLog | None = None
        self.figures: Figures | None = None

    def start(self, run_log: RunLog, figures: Figures | None) -> None:
        """Rank 0: the run files as the checkpoint left them, and the figures' fixed inputs
        (pretraining only)."""
        self.run_log, self.figures = run_log, figures

    def epoch_end(self, state: State, metrics: dict, log: EpochLog, best: bool = False) -> None:
        """`best`: this epoch's validation top-1 is the run's best so far; its checkpoint is
        also kept as best/checkpoint.pth."""
        if self.worker.is_chief:
            png = self.figures.reconstructions(state.model, metrics["epoch"]) if self.figures else None
            self.run_log.flush(metrics, log.records(state.step), png)
            logger.info("epoch %d done: train_loss %.4f  lr %.3e  images/s %.1f  decoded %d (%d skipped), "
                        "%.0f images/s per decode CPU", metrics["epoch"], metrics["train_loss"], metrics["train_lr"],
                        metrics["images_per_sec"], metrics.get("decoded_images", 0), metrics["skipped_images"],
                        metrics.get("decode_images_per_cpu_sec", 0.0))
            if "val_top1" in metrics:
                logger.info("epoch %d validation: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images; best top-1 "
                            "%.2f%%)", metrics["epoch"], metrics["val_top1"], metrics["val_top5"],
                            metrics["val_loss"], metrics["val_images"], metrics["best_val_top1"])
        self._report(state, metrics, best)

    def mid_epoch(self, state: State, metrics: dict, log: EpochLog) -> None:
        if self.worker.is_chief:
            self.run_log.flush_steps(log.records(state.step))
        self._report(state, metrics)

    def _report(self, state: State, metrics: dict, best: bool = False) -> None:
        if not self.worker.is_chief:
            ray.train.report(metrics, checkpoint=None)
            return
        self.writer.submit(state, self.record, metrics, checkpoint_dir_name(metrics["epoch"], state.step), best)
