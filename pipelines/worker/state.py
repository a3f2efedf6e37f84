"""What a training worker saves and restores: model, optimizer, scaler and the position in
the run (epoch, images of it done, optimizer steps done), and how it writes checkpoints.

Where a run starts from, in this order: the run's own latest checkpoint (Ray Train's
`get_checkpoint()`, after a re-submission or a worker failure), else `run.resume_from` (a
checkpoint of ours, an official MAE .pth or a Hugging Face ViTMAE folder), else fresh weights.
"""
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import CheckpointUploadMode

from cluster.accelerators import Accelerator
from cluster.storage import Storage, open_storage
from mae import MaskedAutoencoderViT, create_model
from mae.checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FILE, load_checkpoint, load_mae_state, model_state,
                            save_checkpoint)
from mae.export import HF_CONFIG, HF_WEIGHTS, read_hf
from mae.recipe import build_optimizer
from pipelines.common.config import Config, RunConfig
from pipelines.common.errors import FatalError

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
    best: dict | None = None  # classification: the epoch of the best validation top-1 so far, and its metrics


def build_state(cfg: Config, row: Accelerator, device: torch.device, lr: float,
                num_classes: int | None = None) -> State:
    """Fresh weights (seeded by `train.seed`), the task's optimizer at `lr` and the gradient
    scaler (on for fp16). Pretraining: the MAE and AdamW (0.9, 0.95); fine-tuning and linear
    probing: the classifier of `num_classes` and its optimizer (pipelines/worker/tasks.py)."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    fused = device.type == "cuda"
    if t.task == "pretrain":
        net = create_model(m.name, img_size=m.input_size, norm_pix_loss=m.norm_pix_loss).to(device)
        optimizer = build_optimizer(net, lr=lr, weight_decay=cfg.optim.weight_decay, fused=fused)
    else:
        from pipelines.worker.tasks import build_classifier, build_classifier_optimizer
        net = build_classifier(cfg, num_classes).to(device)
        optimizer = build_classifier_optimizer(net, cfg, lr, fused)
    return State(net, optimizer, row.make_scaler(enabled=t.precision == "fp16"))


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
    folder, _, name = run.resume_from.rstrip("/").rpartition("/")
    data = open_storage(folder or ".", run.s3_endpoint, run.s3_region, run.s3_credentials_file).read(name)
    if data is None:
        raise FileNotFoundError(f"run.resume_from: no such checkpoint {run.resume_from!r}")
    return load_checkpoint(io.BytesIO(data)), f"run.resume_from={run.resume_from}"


def starting_checkpoint(run: RunConfig) -> tuple[dict | None, str]:
    """(checkpoint dict or None, where it came from), by the precedence above."""
    latest = ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as d:
            return load_checkpoint(os.path.join(d, CHECKPOINT_FILE)), f"the run's latest checkpoint {latest.path}"
    if run.resume_from:
        return read_resume_from(run)
    return None, "fresh weights"


def locate_pretrained(cfg: Config) -> tuple[Storage, str]:
    """(storage, file name) of the checkpoint `model.checkpoint` names (fine-tuning, linear
    probing): a checkpoint file of ours or an official .pth, or a run directory of ours (its
    latest checkpoint), on local storage or S3. FileNotFoundError names what is missing."""
    uri, r = cfg.model.checkpoint, cfg.run
    store = open_storage(uri, r.s3_endpoint, r.s3_region, r.s3_credentials_file)
    info = store.fs.get_file_info(store.root)
    if info.type == pafs.FileType.Directory:
        found = sorted(i.base_name for i in store.fs.get_file_info(pafs.FileSelector(store.root))
                       if CHECKPOINT_DIR.fullmatch(i.base_name))
        for name in reversed(found):
            if store.fs.get_file_info(store.path(f"{name}/{CHECKPOINT_FILE}")).type == pafs.FileType.File:
                return store, f"{name}/{CHECKPOINT_FILE}"
        raise FileNotFoundError(f"model.checkpoint: the folder {uri!r} holds no checkpoint_epoch_*_step_*/"
                                f"{CHECKPOINT_FILE}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"model.checkpoint: no such checkpoint file or run directory {uri!r}")
    folder, _, name = uri.rstrip("/").rpartition("/")
    return open_storage(folder or ".", r.s3_endpoint, r.s3_region, r.s3_credentials_file), name


def read_pretrained(cfg: Config) -> dict:
    """The checkpoint dict `locate_pretrained` finds; a FatalError (a restart would meet it
    again) when it is gone."""
    try:
        store, name = locate_pretrained(cfg)
    except FileNotFoundError as e:
        raise FatalError(str(e)) from None
    data = store.read(name)
    if data is None:
        raise FatalError(f"model.checkpoint: {store.path(name)} is gone")
    return load_checkpoint(io.BytesIO(data))


def restore(state: State, ckpt: dict | None, steps_per_epoch: int) -> None:
    """Load a checkpoint of ours or the official code's into `state`.

    Full model state dicts load strictly; encoder-only ones (the official
    `mae_pretrain_vit_*.pth`) load the encoder, and the decoder keys they lack are named.
    Where the checkpoint holds an optimizer and an epoch (ours, or the official training
    checkpoints), the optimizer, scaler and position are restored too.
    """
    if ckpt is None:
        return
    if isinstance(state.model, MaskedAutoencoderViT):
        missing = load_mae_state(state.model, model_state(ckpt))
        if missing:
            logger.info("checkpoint holds the encoder only; newly initialised: %s", ", ".join(missing))
    else:  # a classifier of ours: the whole of it
        try:
            state.model.load_state_dict(model_state(ckpt))
        except RuntimeError as e:  # a restart would meet it again
            raise FatalError(f"the checkpoint does not fit this classifier (model.name, model.num_classes, "
                             f"train.task): {' '.join(str(e).split())[:500]}") from None
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


def checkpoint_dict(state: State, record: dict) -> dict:
    """The reference's keys ({'model', 'optimizer', 'epoch', 'scaler', 'args'}; `epoch` the
    last completed one) plus ours: `step` (optimizer steps done), `position` (where to
    continue: the epoch and the images of it done, at any worker count) and the nested
    `config` (`record`: from `run_record`)."""
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "epoch": state.epoch - 1, "scaler": state.scaler.state_dict(), "args": record["args"],
            "step": state.step,
            "position": {"epoch": state.epoch, "images": state.iteration * state.micro_batch_images},
            "config": record["config"], "best": state.best}


def to_host(obj, pin: bool = False):
    """A copy of `obj` (a checkpoint dict) whose tensors are host-memory copies: what the
    training step waits for. From an accelerator the copies go into pinned memory without
    blocking, then one synchronisation; on the CPU they are clones, since the step goes on
    changing the originals in place."""
    copies = []

    def copy(x):
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":
                return x.detach().clone()
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
            out.copy_(x.detach(), non_blocking=pin)
            copies.append(x.device)
            return out
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(obj)
    for device in set(copies):
        torch.accelerator.synchronize(device)
    return out


class CheckpointWriter:
    """Rank 0's checkpoints, written and uploaded off the training thread, one at a time.

    `submit` takes the state off the device (the step's only wait) and hands Ray Train the
    checkpoint with an upload function that runs in Ray Train's background thread
    (`ray.train.report(checkpoint_upload_mode=ASYNC, checkpoint_upload_fn=...)`): it writes
    checkpoint.pth straight into the run directory on a local filesystem (a temporary file,
    fsynced, then renamed), or into a local temporary folder that it then uploads to S3
    (an object appears only once whole). Ray Train registers the checkpoint as the run's
    latest only after the function returns, so a restart never starts from a checkpoint
    half written. A second `submit` first waits for the checkpoint in flight: host memory
    holds at most one copy of the state. `synchronous=True` does all of it in the step (the
    benchmark's baseline)."""

    def __init__(self, storage: Storage, synchronous: bool = False):
        self.storage, self.synchronous = storage, synchronous
        self.idle = threading.Event()
        self.idle.set()
        self.stalls: list[float] = []  # seconds the training thread spent in each submit

    def submit(self, state: "State", record: dict, metrics: dict, name: str, best: bool = False) -> None:
        t0 = time.perf_counter()
        self.wait()
        ckpt = checkpoint_dict(state, record)
        host = ckpt if self.synchronous else to_host(ckpt, pin=next(state.model.parameters()).is_cuda)
        self.idle.clear()
        folder = tempfile.mkdtemp(prefix="mae-checkpoint-")
        mode = CheckpointUploadMode.SYNC if self.synchronous else CheckpointUploadMode.ASYNC
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name,
                             checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=False,
                             checkpoint_upload_fn=lambda checkpoint, dir_name: self._persist(host, folder, dir_name,
                                                                                             best))
        except BaseException:
            self._done(folder)
            raise
        self.stalls.append(time.perf_counter() - t0)

    def _persist(self, host: dict, folder: str, name: str, best: bool) -> ray.train.Checkpoint:
        try:
            names = [name, BEST] if best else [name]  # best/: outside Ray Train's checkpoints, never pruned
            if isinstance(self.storage.fs, pafs.LocalFileSystem):
                for each in names:
                    os.makedirs(self.storage.path(each), exist_ok=True)
                    save_checkpoint(host, os.path.join(self.storage.path(each), CHECKPOINT_FILE))
                    self.storage.sync(each)
            else:
                save_checkpoint(host, os.path.join(folder, CHECKPOINT_FILE))
                for each in names:
                    pafs.copy_files(folder, self.storage.path(each), destination_filesystem=self.storage.fs)
            return ray.train.Checkpoint(self.storage.path(name), filesystem=self.storage.fs)
        finally:
            self._done(folder)

    def _done(self, folder: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        self.idle.set()

    def wait(self) -> None:
        """Until the checkpoint in flight is in the run directory (Ray Train raises its upload
        error in the training thread; this one does not wait forever on it)."""
        self.idle.wait()
