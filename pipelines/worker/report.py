"""Rank 0's view of a run while it trains: the step log of an epoch, the progress lines, the
reconstruction figures, and the Reporter that sends each checkpoint's results to the run
files, the trackers and Ray Train."""
import logging
import time
from dataclasses import dataclass, field

import ray
import ray.train
import torch

from cluster.actors import run_fence
from cluster.storage import Retry
from mae.checkpoint import checkpoint_dir_name
from mae.model import preset
from mae.transforms import decodable, eval_crops, normalize_on_device
from mae.visualize import grid_png, reconstruct
from pipelines.common.config import ModelConfig
from pipelines.common.errors import FatalError
from pipelines.common.schedule import Schedule
from pipelines.output.metrics import RunMetrics
from pipelines.output.run_files import record_attempt
from pipelines.worker.checkpointing import CheckpointWriter
from pipelines.worker.job import FIGURE_IMAGES, Worker, WorkerJob
from pipelines.worker.state import State, run_record
from pipelines.worker.tasks import task_of

logger = logging.getLogger("mae.train")


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
        held_out = decodable(held_out, FIGURE_IMAGES)  # of the driver's candidates
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
    """Where each checkpoint's results go: rank 0 logs the metrics (the run files, the
    trackers, the console) and hands the state, copied off the device, to its
    CheckpointWriter, which writes and uploads checkpoint.pth in the background; every rank
    reports to Ray Train. `record`: what every checkpoint records of the config."""

    def __init__(self, worker: Worker, record: dict, writer: CheckpointWriter, metrics: RunMetrics | None = None,
                 figures: Figures | None = None):
        self.worker, self.record, self.writer = worker, record, writer
        self.metrics, self.figures = metrics, figures  # rank 0's

    @classmethod
    def start(cls, job: WorkerJob, worker: Worker, state: State, sched: Schedule, placements: list[dict],
              source: str) -> "Reporter":
        """This start's reporter; rank 0 opens the run files as the checkpoint left them, the
        figures' fixed inputs (pretraining) and records the start in attempts.jsonl."""
        cfg, task = job.cfg, task_of(job.cfg)
        fence = run_fence()

        def fenced() -> None:
            """Before each write of the run directory: raise when the driver lost its lease."""
            why = ray.get(fence.get.remote())
            if why is not None:
                raise FatalError(f"rank 0 writes nothing more: {why}")

        writer = CheckpointWriter(job.storage, retry=Retry(cfg.run.checkpoint_upload_retries, 1.0, 30.0),
                                  timeout=cfg.run.checkpoint_timeout_seconds, fenced=fenced)
        reporter = cls(worker, run_record(cfg, worker.world, sched.accum_iter), writer)
        if not worker.is_chief:
            return reporter
        tracker = None
        if cfg.run.mlflow_tracking_uri:
            from pipelines.output.tracking import MlflowTracker
            tracker = MlflowTracker(job.storage, cfg.run.mlflow_tracking_uri, cfg.run.mlflow_experiment,
                                    cfg.run.name, cfg.to_dict())
        if task.figures:
            reporter.figures = Figures(job.held_out, cfg.model, cfg.train.seed, worker.device)
        reporter.metrics = RunMetrics(job.storage, state.epoch, state.step, cfg.run.tensorboard, tracker)
        record_attempt(job.storage, {"job_id": ray.get_runtime_context().get_job_id(), "epoch": state.epoch,
                                     "iteration": state.iteration, "step": state.step, "source": source,
                                     "workers": placements})
        logger.info("%s %s from epoch %d, micro-batch %d (step %d; %s) to epoch %d: %d workers x batch %d x "
                    "accum %d = %d images per step, lr %.3g, %d steps per epoch", task.verb, cfg.model.name,
                    state.epoch, state.iteration, state.step, source, sched.epochs, worker.world,
                    cfg.train.batch_size, sched.accum_iter, sched.images_per_step, sched.peak_lr,
                    sched.steps_per_epoch)
        return reporter

    def epoch_end(self, state: State, metrics: dict, log: EpochLog, best: bool = False) -> None:
        """`best`: this epoch's validation top-1 is the run's best so far; its checkpoint is
        also kept as best/checkpoint.pth."""
        if self.worker.is_chief:
            self.writer.fenced()
            png = self.figures.reconstructions(state.model, metrics["epoch"]) if self.figures else None
            self.metrics.epoch(metrics, log.records(state.step), png)
        self._report(state, metrics, best)

    def mid_epoch(self, state: State, metrics: dict, log: EpochLog) -> None:
        if self.worker.is_chief:
            self.writer.fenced()
            self.metrics.steps(log.records(state.step))
        self._report(state, metrics)

    def finish(self) -> None:
        """The run's end on this worker: rank 0 waits until the last checkpoint is in the
        run directory and ends its tracking."""
        if self.worker.is_chief:
            self.writer.wait()
            self.metrics.finish()

    def _report(self, state: State, metrics: dict, best: bool = False) -> None:
        if not self.worker.is_chief:
            ray.train.report(metrics, checkpoint=None)
            return
        self.writer.submit(state, self.record, metrics, checkpoint_dir_name(metrics["epoch"], state.step), best)
