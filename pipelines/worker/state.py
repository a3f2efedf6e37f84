"""What a training worker saves and restores: model, optimizer, scaler and the position in
the run (epoch, images of it done, optimizer steps done); the checkpoints are written by
pipelines/worker/checkpointing.py.

Where a run starts from, in this order: the run's own latest checkpoint (Ray Train's
`get_checkpoint()`, after a re-submission or a worker failure), else `run.resume_from` (a
checkpoint of ours, an official MAE .pth or a Hugging Face ViTMAE folder), else fresh weights.
"""
import logging
import os
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray.train
import torch

from cluster.accelerators import Accelerator
from cluster.storage import open_storage
from mae.checkpoint import CHECKPOINT_FILE, load_checkpoint
from mae.export import HF_CONFIG, HF_WEIGHTS, read_hf
from pipelines.common.checkpoints import read_checkpoint
from pipelines.common.config import Config, RunConfig
from pipelines.common.errors import FatalError
from pipelines.worker.tasks import Classify, Pretrain, task_of

logger = logging.getLogger("mae.train")
BEST = "best"  # the folder of a classification run's best checkpoint (by validation top-1)


@dataclass
class State:
    """Everything a step changes, and everything resume restores."""
    model: torch.nn.Module  # the bare model (not DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epoch to train next (or to continue)
    iteration: int = 0  # micro-batch of `epoch` to continue at (0 unless resumed mid-epoch)
    step: int = 0  # optimizer steps completed so far
    micro_batch_images: int = 1  # images one micro-batch takes over all workers (batch x workers)
    workers: int = 1  # this start's worker count
    step_blocks: int | None = None  # rows per block of the stream, if each step's images hold at any count: config.py
    trained: list | None = None  # runs of the positions of `epoch` trained (resumed mid-epoch): lanes.py
    best: dict | None = None  # classification: the epoch of the best validation top-1 so far, and its metrics


def build_state(cfg: Config, accelerator: Accelerator, device: torch.device, lr: float,
                num_classes: int | None = None) -> State:
    """Fresh weights (seeded by `train.seed`), the task's optimizer at `lr` and the gradient
    scaler (on for fp16): the task's model and optimizer (pipelines/worker/tasks.py), of
    `num_classes` for a classifier."""
    task = task_of(cfg)
    torch.manual_seed(cfg.train.seed)
    net = task.model(cfg, num_classes).to(device)
    optimizer = task.optimizer(net, cfg, lr, fused=device.type == "cuda")
    return State(net, optimizer, accelerator.make_scaler(enabled=cfg.train.precision == "fp16"))


def read_resume_from(run: RunConfig) -> tuple[dict, str]:
    """The checkpoint `run.resume_from` names: a checkpoint file (ours or an official .pth),
    or a Hugging Face ViTMAE folder (config.json + model.safetensors, e.g. from
    `export.py --to hf` or the hub), whose weights load as an official full checkpoint's."""
    store = open_storage(run.resume_from, run.s3_endpoint, run.s3_region, run.s3_credentials_file)
    if store.fs.get_file_info(store.root).type == pafs.FileType.Directory:
        config_json, weights = store.read(HF_CONFIG), store.read(HF_WEIGHTS)
        if config_json is None or weights is None:
            raise FileNotFoundError(f"run.resume_from: {run.resume_from!r} is a folder without {HF_CONFIG} and "
                                    f"{HF_WEIGHTS} (a Hugging Face ViTMAE model)")
        state, _, _ = read_hf(config_json, weights)
        return {"model": state}, f"run.resume_from={run.resume_from} (Hugging Face ViTMAE)"
    ckpt = read_checkpoint(run.resume_from, run.s3_endpoint, run.s3_region, run.s3_credentials_file,
                           "run.resume_from")
    return ckpt, f"run.resume_from={run.resume_from}"


def starting_checkpoint(run: RunConfig) -> tuple[dict | None, str]:
    """(checkpoint dict or None, where it came from), by the precedence above."""
    latest = ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as d:
            return load_checkpoint(os.path.join(d, CHECKPOINT_FILE)), f"the run's latest checkpoint {latest.path}"
    if run.resume_from:
        return read_resume_from(run)
    return None, "fresh weights"


def read_pretrained(cfg: Config) -> dict:
    """The checkpoint dict `model.checkpoint` names (a file, or a run directory's latest
    checkpoint, with the run's S3 settings); a FatalError (a restart would meet it again)
    when it is missing or gone."""
    r = cfg.run
    try:
        return read_checkpoint(cfg.model.checkpoint, r.s3_endpoint, r.s3_region, r.s3_credentials_file,
                               "model.checkpoint")
    except FileNotFoundError as e:
        raise FatalError(str(e)) from None


def restore(state: State, ckpt: dict | None, steps_per_epoch: int, task: "Pretrain | Classify") -> None:
    """Load a checkpoint of ours or the official code's into `state`: the weights as `task`
    loads them and, where the checkpoint holds an optimizer and an epoch (ours, or the
    official training checkpoints), the optimizer, scaler and position too."""
    if ckpt is None:
        return
    task.load_weights(state.model, ckpt)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        return
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    position = ckpt.get("position") or {"epoch": ckpt["epoch"] + 1, "images": 0}
    state.epoch, state.iteration = position["epoch"], position.get("iteration", 0)
    if "images" in position:  # counted in images, so that it resumes at any worker count
        state.iteration, rest = divmod(position["images"], state.micro_batch_images)
        if rest:
            raise FatalError(f"the checkpoint stops at image {position['images']} of epoch {position['epoch']}, "
                             f"which is not a whole number of micro-batches of {state.micro_batch_images} images "
                             "at this worker count; resume it with train.effective_batch unchanged")
    if state.iteration and position.get("trained") is not None:
        # the same order: at the same worker count and blocks, each worker's split begins with
        # its trained rows; with blocks of whole micro-batches (both runs elastic) the trained
        # rows are the epoch's first whole micro-batches at any count (stream.py: `training_stream`)
        same_blocks = (position.get("step_blocks") is None) == (state.step_blocks is None)
        if same_blocks and (position.get("workers") == state.workers or state.step_blocks):
            state.trained = position["trained"]
            if position.get("workers") != state.workers:
                logger.info("resumed mid-epoch at %d workers, saved at %s: each step from here on trains the images "
                            "of the run saved (its losses agree to float noise: the gradients are summed in another "
                            "order)", state.workers, position.get("workers"))
        else:
            logger.info("resumed mid-epoch at %d workers, saved at %s: the rest of epoch %d is drawn anew (each "
                        "step keeps its images at another worker count in an elastic run: scaling.min_workers)",
                        state.workers, position.get("workers"), state.epoch)
    state.step = ckpt.get("step", state.epoch * steps_per_epoch)
    state.best = ckpt.get("best")


def run_record(cfg: Config, world: int, accum_iter: int) -> dict:
    """What every checkpoint of a run records of its configuration: the reference's `args`
    (a plain dict of its argument names) and our nested `config` (which holds no credentials:
    config.CREDENTIAL_KEYS are never config values)."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    args = {"model": m.name, "input_size": m.input_size, "mask_ratio": m.mask_ratio,
            "norm_pix_loss": m.norm_pix_loss, "batch_size": t.batch_size, "accum_iter": accum_iter,
            "epochs": t.epochs, "warmup_epochs": o.warmup_epochs, "blr": o.blr, "lr": o.lr,
            "min_lr": o.min_lr, "weight_decay": o.weight_decay, "seed": t.seed,
            "data_path": cfg.data.path, "world_size": world, "task": t.task}
    return {"args": args, "config": cfg.to_dict()}
