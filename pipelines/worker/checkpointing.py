"""Rank 0's checkpoints: the checkpoint dict of a training state, copied off the device, then
written and uploaded by Ray Train's background thread, one at a time."""
import os
import shutil
import tempfile
import threading
import time

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import CheckpointUploadMode

from cluster.storage import Storage
from mae.checkpoint import CHECKPOINT_FILE, save_checkpoint
from pipelines.worker.state import BEST, State


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
