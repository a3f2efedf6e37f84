"""The per-worker train loop that Ray Train runs on every worker.

Each worker builds the model on its device, restores the latest checkpoint if Ray Train
has one, wraps DDP itself, and trains on its shard of the Ray Data stream. Rank 0 writes
the checkpoint and the run's log files each epoch; every rank reports to Ray Train.
"""
import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cluster.accelerators import ACCELERATORS
from mae import create_model
from mae.model import preset
from mae.visualize import grid_png, reconstruct
from mae.checkpoint import load_checkpoint, save_checkpoint
from mae.recipe import build_optimizer, fractional_epoch, lr_at, scaled_lr, set_lr
from mae.transforms import normalize_on_device
from pipelines.config import Config, from_dict
from pipelines.data import held_out_images
from pipelines.run_files import RunLog

logger = logging.getLogger("mae.train")

CHECKPOINT_FILE = "checkpoint.pth"
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without checkpointing the weights."""


@dataclass
class State:
    """Everything a step changes, and everything resume restores."""
    model: torch.nn.Module  # the bare model (not DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0  # next epoch to train
    step: int = 0  # optimizer steps completed so far


@dataclass
class Schedule:
    """The run's time axis: how many batches an epoch has and where the lr comes from."""
    iters_per_epoch: int  # data batches per worker per epoch (the reference's len(loader))
    accum_iter: int
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        return self.iters_per_epoch // self.accum_iter

    def lr(self, epoch: int, iteration: int) -> float:
        t = fractional_epoch(epoch, iteration, self.iters_per_epoch)
        return lr_at(t, self.peak_lr, self.min_lr, self.warmup_epochs, self.epochs)


@dataclass
class EpochLog:
    """Per-step losses kept on the device; synced (all-reduced) only every N steps."""
    losses: torch.Tensor
    lrs: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    synced: list[float] = field(default_factory=list)
    done: int = 0  # optimizer steps completed this epoch
    last_log: tuple[int, float] = (0, time.perf_counter())  # (steps done, time) at the last log line


def train_loop_per_worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(cfg, ctx.get_local_rank())
    sched = Schedule(config["iters_per_epoch"], cfg.train.accum_iter,
                     cfg.optim.lr or scaled_lr(cfg.optim.blr, cfg.train.batch_size, cfg.train.accum_iter, world),
                     cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.train.epochs)
    state = build_state(cfg, device, sched.peak_lr)
    restore(state, ray.train.get_checkpoint())
    run_log = RunLog(cfg.run_dir, state.epoch, state.step, cfg.run.tensorboard) if rank == 0 else None
    figures = Figures(cfg, device) if rank == 0 else None
    model = wrap_model(state.model, cfg, world)
    if rank == 0:
        logger.info("training %s from epoch %d (step %d) to %d: %d workers x batch %d x accum %d = %d "
                    "images per step, lr %.3g, %d steps per epoch", cfg.model.name, state.epoch, state.step,
                    cfg.train.epochs, world, cfg.train.batch_size, cfg.train.accum_iter,
                    cfg.effective_batch, sched.peak_lr, sched.steps_per_epoch)
    shard = ray.train.get_dataset_shard("train")
    run_start = time.perf_counter()
    first_epoch = state.epoch
    for epoch in range(state.epoch, cfg.train.epochs):
        torch.manual_seed(hash((cfg.train.seed, rank, epoch)) % 2**63)  # masking noise
        t0 = time.perf_counter()
        log = train_one_epoch(cfg, sched, state, model, shard, device, epoch, world,
                              eta_origin=(run_start, first_epoch))
        seconds = time.perf_counter() - t0
        state.epoch = epoch + 1
        metrics = {"epoch": epoch, "train_loss": sum(log.synced) / max(len(log.synced), 1),
                   "train_lr": log.lrs[-1] if log.lrs else 0.0, "steps": len(log.synced),
                   "images_per_sec": len(log.synced) * cfg.effective_batch / seconds,
                   "epoch_seconds": seconds}
        report(state, cfg, metrics, log, run_log, figures)


def worker_device(cfg: Config, local_rank: int) -> torch.device:
    accel = ACCELERATORS[cfg.scaling.accelerator]
    if accel.device_type == "cpu":
        return torch.device("cpu")
    device = torch.device(accel.device_type, local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def build_state(cfg: Config, device: torch.device, lr: float) -> State:
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, img_size=cfg.model.input_size,
                         norm_pix_loss=cfg.model.norm_pix_loss).to(device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=cfg.optim.weight_decay,
                                fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    return State(model, optimizer, scaler)


def wrap_model(model: torch.nn.Module, cfg: Config, world: int) -> torch.nn.Module:
    """torch.compile (in place, so state-dict keys stay the official ones), then DDP.

    Every parameter is used every step, so DDP looks for no unused ones. If compilation
    fails for a graph, dynamo falls back to eager for it with a warning instead of
    stopping the run.
    """
    accel = ACCELERATORS[cfg.scaling.accelerator]
    if cfg.train.compile and accel.compiles:
        torch._dynamo.config.suppress_errors = True
        model.compile()
    elif cfg.train.compile:
        logger.warning("train.compile: torch.compile is not supported on %s; running eager",
                       cfg.scaling.accelerator)
    if world > 1:
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    return model


def restore(state: State, checkpoint: "ray.train.Checkpoint | None") -> None:
    """Continue after the last completed epoch of the checkpoint Ray Train hands us."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        ckpt = load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
    state.model.load_state_dict(ckpt["model"], strict=True)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch = ckpt["epoch"] + 1
    state.step = ckpt["step"]


def micro_step(model: torch.nn.Module, images: torch.Tensor, device: torch.device, mask_ratio: float,
               accum_iter: int, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler,
               sync_grads: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Forward + backward of one micro-batch of uint8 [N, H, W, 3] images; returns the
    detached loss. With `sync_grads=False` a DDP model skips its all-reduce (`no_sync`)."""
    imgs = normalize_on_device(images, device)
    no_sync = not sync_grads and isinstance(model, DistributedDataParallel)
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise)
        scaler.scale(loss / accum_iter).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(cfg: Config, sched: Schedule, state: State, model: torch.nn.Module, shard,
                    device: torch.device, epoch: int, world: int, eta_origin) -> EpochLog:
    accum, amp_dtype = sched.accum_iter, AMP_DTYPES[cfg.train.precision]
    used_iters = sched.steps_per_epoch * accum  # trailing micro-batches that fill no step are dropped
    log = EpochLog(losses=torch.zeros(sched.steps_per_epoch, device=device))
    model.train()
    state.optimizer.zero_grad(set_to_none=True)
    batches = shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True, device="cpu",
                                       pin_memory=device.type == "cuda", prefetch_batches=2,
                                       dtypes={"image": torch.uint8, "label": torch.int64})
    for i, batch in enumerate(batches):
        if i >= used_iters:
            continue
        k = i // accum
        if i % accum == 0:
            lr = sched.lr(epoch, i)
            set_lr(state.optimizer, lr)
            log.lrs.append(lr)
            log.epochs.append(fractional_epoch(epoch, i, sched.iters_per_epoch))
        last_micro = (i + 1) % accum == 0
        loss = micro_step(model, batch["image"], device, cfg.model.mask_ratio, accum, amp_dtype, state.scaler,
                          sync_grads=last_micro)
        log.losses[k] += loss.float() / accum
        if last_micro:
            optimizer_step(state.optimizer, state.scaler)
            state.step += 1
            log.done += 1
            if (k + 1) % cfg.train.log_every_steps == 0:
                sync_losses(log, k + 1, state.step, world)
                log_progress(cfg, sched, state, epoch, k + 1, log, eta_origin)
    sync_losses(log, log.done, state.step, world)
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


def log_progress(cfg: Config, sched: Schedule, state: State, epoch: int, k: int, log: EpochLog,
                 eta_origin) -> None:
    if ray.train.get_context().get_world_rank() != 0:
        return
    run_start, first_epoch = eta_origin
    elapsed = time.perf_counter() - run_start
    done = (epoch - first_epoch) * sched.steps_per_epoch + k
    left = (cfg.train.epochs - epoch) * sched.steps_per_epoch - k
    eta = elapsed / max(done, 1) * left
    recent = log.synced[log.last_log[0]:k]
    now = time.perf_counter()
    images_per_sec = len(recent) * cfg.effective_batch / (now - log.last_log[1])
    log.last_log = (k, now)
    logger.info("epoch %d/%d  step %d/%d  loss %.4f  lr %.3e  images/s %.1f  eta %s",
                epoch, cfg.train.epochs, k, sched.steps_per_epoch, sum(recent) / len(recent), log.lrs[k - 1],
                images_per_sec, time.strftime("%H:%M:%S", time.gmtime(eta)))


class Figures:
    """Rank 0's reconstructions of a fixed held-out set, with fixed masks, after each epoch."""

    def __init__(self, cfg: Config, device: torch.device):
        self.images = normalize_on_device(held_out_images(cfg.data.path, cfg.model.input_size), device)
        num_patches = (cfg.model.input_size // preset(cfg.model.name)["patch_size"]) ** 2
        generator = torch.Generator().manual_seed(cfg.train.seed)
        self.noise = torch.rand(len(self.images), num_patches, generator=generator).to(device)
        self.mask_ratio = cfg.model.mask_ratio

    def reconstructions(self, model: torch.nn.Module, epoch: int) -> bytes:
        panels = reconstruct(model, self.images, self.mask_ratio, self.noise)
        return grid_png(panels, title=f"epoch {epoch}")


def report(state: State, cfg: Config, metrics: dict, log: EpochLog, run_log: RunLog | None,
           figures: Figures | None) -> None:
    """Rank 0 writes the run files and checkpoint.pth; every rank reports to Ray Train."""
    if run_log is None:
        ray.train.report(metrics, checkpoint=None)
        return
    first = state.step - len(log.synced) + 1
    run_log.flush(metrics, [{"step": first + j, "epoch": log.epochs[j], "loss": log.synced[j], "lr": log.lrs[j]}
                            for j in range(len(log.synced))],
                  figures.reconstructions(state.model, metrics["epoch"]))
    logger.info("epoch %d done: train_loss %.4f  lr %.3e  images/s %.1f", metrics["epoch"],
                metrics["train_loss"], metrics["train_lr"], metrics["images_per_sec"])
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(checkpoint_dict(state, cfg), os.path.join(d, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_epoch_{metrics['epoch']:04d}")


def checkpoint_dict(state: State, cfg: Config) -> dict:
    """The reference's keys ({'model', 'optimizer', 'epoch', 'scaler', 'args'}; `epoch` the
    last completed one) plus ours: `step` (optimizer steps done) and the nested `config`."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    args = {"model": m.name, "input_size": m.input_size, "mask_ratio": m.mask_ratio,
            "norm_pix_loss": m.norm_pix_loss, "batch_size": t.batch_size, "accum_iter": t.accum_iter,
            "epochs": t.epochs, "warmup_epochs": o.warmup_epochs, "blr": o.blr, "lr": o.lr,
            "min_lr": o.min_lr, "weight_decay": o.weight_decay, "seed": t.seed,
            "data_path": cfg.data.path, "world_size": cfg.scaling.num_workers}
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "epoch": state.epoch - 1, "scaler": state.scaler.state_dict(), "args": args,
            "step": state.step, "config": cfg.to_dict()}
