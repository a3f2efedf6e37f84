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

from cluster.storage import Retry, Storage
from mae.checkpoint import CHECKPOINT_FILE, save_checkpoint
from pipelines.common.errors import FatalError, one_line
from pipelines.worker.state import BEST, State


def checkpoint_dict(state: State, record: dict) -> dict:
    """The reference's keys ({'model', 'optimizer', 'epoch', 'scaler', 'args'}; `epoch` the
    last completed one) plus ours: `step` (optimizer steps done), `position` (where to
    continue: the epoch and the images of it done, at any worker count; mid-epoch, the runs
    of positions trained, with which a resume continues the same epoch, the worker count and
    the stream's rows per block (an elastic run's: a resume at any count trains each later
    step on the images it had)) and the nested `config` (`record`: from `run_record`)."""
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "epoch": state.epoch - 1, "scaler": state.scaler.state_dict(), "args": record["args"],
            "step": state.step,
            "position": {"epoch": state.epoch, "images": state.iteration * state.micro_batch_images,
                         "trained": state.trained if state.iteration else None, "workers": state.workers,
                         "step_blocks": state.step_blocks},
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


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written or uploaded, its retries spent, or that did not
    finish within run.checkpoint_timeout_seconds: it is not registered."""


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
    benchmark's baseline).

    A write or upload that fails with an error that may pass is retried (`retry`), the
    temporary copy kept until it succeeds or the retries are spent; then the function raises
    `CheckpointError` (Ray Train does not register the checkpoint and fails the worker), as
    does the next `submit` or `wait` in the training thread. Ray Train may call the function
    again after it raised: it then raises the same error at once."""

    def __init__(self, storage: Storage, synchronous: bool = False, retry: Retry = Retry(5, 1.0, 30.0),
                 timeout: float = 3600.0, fenced=lambda: None):
        self.storage, self.synchronous, self.retry, self.timeout = storage, synchronous, retry, timeout
        self.fenced = fenced  # raises when the run must write nothing more (its driver lost the lease)
        self.idle = threading.Event()
        self.idle.set()
        self.in_flight: str | None = None
        self.failed: dict[str, CheckpointError] = {}  # by checkpoint name
        self.stalls: list[float] = []  # seconds the training thread spent in each submit

    def submit(self, state: "State", record: dict, metrics: dict, name: str, best: bool = False) -> None:
        t0 = time.perf_counter()
        self.wait()
        ckpt = checkpoint_dict(state, record)
        host = ckpt if self.synchronous else to_host(ckpt, pin=next(state.model.parameters()).is_cuda)
        self.idle.clear()
        self.in_flight = name
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
        if name in self.failed:  # called again after its retries were spent
            raise self.failed[name]
        names = [name, BEST] if best else [name]  # best/: outside Ray Train's checkpoints, never pruned
        local = isinstance(self.storage.fs, pafs.LocalFileSystem)
        staged = os.path.join(folder, CHECKPOINT_FILE)

        def write(each: str) -> None:
            self.fenced()
            if local:
                os.makedirs(self.storage.path(each), exist_ok=True)
                save_checkpoint(host, os.path.join(self.storage.path(each), CHECKPOINT_FILE))
                self.storage.sync(each)
            else:
                if not os.path.exists(staged):  # save_checkpoint renames a complete file into place
                    save_checkpoint(host, staged)
                self.storage.upload(f"{each}/{CHECKPOINT_FILE}", staged)

        try:
            for each in names:
                self.retry.call(lambda: write(each), f"checkpoint {each} to {self.storage.uri}")
        except FatalError:  # fenced: the driver lost the run's lease
            self._done(folder)
            raise
        except Exception as e:
            self.failed[name] = CheckpointError(
                f"checkpoint {name} was not saved to {self.storage.uri} (retries: {self.retry.attempts}): "
                f"{one_line(e)}")
            self._done(folder)
            raise self.failed[name] from None
        self._done(folder)
        return ray.train.Checkpoint(self.storage.path(name), filesystem=self.storage.fs)

    def _done(self, folder: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        self.idle.set()

    def wait(self) -> None:
        """Until the checkpoint in flight is in the run directory. Raises `CheckpointError`
        when it finally failed (Ray Train raises it too, from its own thread, when it gets
        there first) or is not there within the timeout."""
        if not self.idle.wait(self.timeout):
            raise CheckpointError(f"checkpoint {self.in_flight} is not in {self.storage.uri} after "
                                  f"run.checkpoint_timeout_seconds={self.timeout:g}: the store does not answer")
        if self.in_flight in self.failed:
            raise self.failed[self.in_flight]
