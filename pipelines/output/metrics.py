"""A run's metrics, logged once: rank 0 hands each batch of step records to
`RunMetrics.steps` and each epoch's metrics dict to `RunMetrics.epoch`, which fan them out
to every sink. A new metric is one more key in the epoch's dict; no sink keeps a list of
names it could miss it from.

- files (pipelines/output/run_files.py): steps.jsonl and metrics.jsonl, rewritten whole
  (atomically) each time, loss_curve.png and reconstructions/epoch_NNNN.png;
- TensorBoard (`run.tensorboard`): train/loss and train/lr per step, every numeric value of
  an epoch's dict as `epoch/<key>`, the reconstruction figure;
- MLflow (`run.mlflow_tracking_uri`; pipelines/output/tracking.py): the same scalars, and
  the figures as artifacts;
- the console: each epoch's line, and its validation line for a classification run.

On resume the records at or after the checkpoint's epoch/step are dropped first, so a
resumed run holds each epoch and step exactly once even if the previous attempt died after
writing them; TensorBoard drops the events after the checkpoint's step (`purge_step`), and
MLflow keeps the last value logged at a step.
"""
import io
import logging
import numbers
import os
import tempfile

import pyarrow.fs as pafs

from cluster.storage import Storage
from pipelines.output.run_files import plot_loss_curve, read_jsonl, write_jsonl

logger = logging.getLogger("mae.train")


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric values of an epoch's metrics by name: what TensorBoard and MLflow log as
    `epoch/<key>`. All of them, so that a key added to the dict reaches every sink; `epoch`
    is the record's index, not one of its values."""
    return {k: float(v) for k, v in metrics.items() if k != "epoch" and isinstance(v, numbers.Real)}


class RunMetrics:
    """Rank 0's sinks for the run's metrics, opened where the checkpoint left them (epoch
    `start_epoch`, optimizer step `start_step`). `tracker`: the run's MLflow run, if any."""

    def __init__(self, storage: Storage, start_epoch: int, start_step: int, tensorboard: bool = False,
                 tracker=None):  # a pipelines.output.tracking.MlflowTracker (which imports this module)
        self.storage, self.tracker = storage, tracker
        self.epochs = [m for m in read_jsonl(storage, "metrics.jsonl") if m["epoch"] < start_epoch]
        self.step_records = [s for s in read_jsonl(storage, "steps.jsonl") if s["step"] <= start_step]
        self.board = TensorBoardEvents(storage, start_step) if tensorboard else None

    def steps(self, records: list[dict]) -> None:
        """Step records ({step, epoch, loss, lr, images}) not logged yet: those of a
        mid-epoch checkpoint (the epoch's end logs the rest with `epoch`)."""
        self._add_steps(records)
        if self.board is not None:
            self.board.flush()

    def epoch(self, metrics: dict, step_records: list[dict], reconstruction_png: bytes | None = None) -> None:
        """The end of epoch `metrics["epoch"]`: its step records not logged yet, its metrics
        (every numeric value is logged to every sink) and, when pretraining, the figure of
        its reconstructions."""
        self._add_steps(step_records)
        self.epochs.append(metrics)
        write_jsonl(self.storage, "metrics.jsonl", self.epochs)
        step = self.step_records[-1]["step"] if self.step_records else 0
        curve = plot_loss_curve(self.step_records, self.epochs)
        self.storage.write("loss_curve.png", curve)
        figure = f"epoch_{metrics['epoch']:04d}.png"
        if reconstruction_png is not None:
            self.storage.write(f"reconstructions/{figure}", reconstruction_png)
        if self.board is not None:
            self.board.epoch(metrics, step, reconstruction_png)
            self.board.flush()
        if self.tracker is not None:
            self.tracker.log_epoch(metrics, step)
            self.tracker.log_figure("loss_curve.png", curve)
            if reconstruction_png is not None:
                self.tracker.log_figure(figure, reconstruction_png, "reconstructions")
        log_epoch_lines(metrics)

    def finish(self, status: str = "FINISHED") -> None:
        """The run's end: its MLflow run is marked `status`, its TensorBoard file closed."""
        if self.board is not None:
            self.board.close()
        if self.tracker is not None:
            self.tracker.finish(status)

    def _add_steps(self, records: list[dict]) -> None:
        self.step_records.extend(records)
        write_jsonl(self.storage, "steps.jsonl", self.step_records)
        if self.board is not None:
            self.board.steps(records)
        if self.tracker is not None:
            self.tracker.log_steps(records)


def log_epoch_lines(metrics: dict) -> None:
    """The console's lines for an epoch (rank 0's lines reach the driver: pipelines/output/console.py)."""
    logger.info("epoch %d done: train_loss %.4f  lr %.3e  images/s %.1f  decoded %d (%d skipped), "
                "%.0f images/s per decode CPU", metrics["epoch"], metrics["train_loss"], metrics["train_lr"],
                metrics["images_per_sec"], metrics.get("decoded_images", 0), metrics["skipped_images"],
                metrics.get("decode_images_per_cpu_sec", 0.0))
    if "val_top1" in metrics:
        logger.info("epoch %d validation: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images; best top-1 "
                    "%.2f%%)", metrics["epoch"], metrics["val_top1"], metrics["val_top5"],
                    metrics["val_loss"], metrics["val_images"], metrics["best_val_top1"])


class TensorBoardEvents:
    """The run's TensorBoard events, in `tensorboard/` of the run directory. A writer can
    only append to a local file, so on remote storage the events are written to a local
    folder and copied into the run directory after each flush. `purge_step` makes
    TensorBoard drop the events a previous attempt wrote after the checkpoint."""

    def __init__(self, storage: Storage, start_step: int):
        from tensorboardX import SummaryWriter

        self.storage = storage
        self.mirror = not isinstance(storage.fs, pafs.LocalFileSystem)
        self.folder = tempfile.mkdtemp(prefix="mae-tensorboard-") if self.mirror else storage.path("tensorboard")
        self.writer = SummaryWriter(self.folder, purge_step=start_step + 1)

    def steps(self, records: list[dict]) -> None:
        for r in records:
            self.writer.add_scalar("train/loss", r["loss"], r["step"])
            self.writer.add_scalar("train/lr", r["lr"], r["step"])

    def epoch(self, metrics: dict, step: int, png: bytes | None) -> None:
        for name, value in scalars(metrics).items():
            self.writer.add_scalar(f"epoch/{name}", value, step)
        if png is not None:
            import numpy as np
            from PIL import Image

            grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            self.writer.add_image("reconstructions", grid, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if self.mirror:
            for name in os.listdir(self.folder):
                with open(os.path.join(self.folder, name), "rb") as f:
                    self.storage.write(f"tensorboard/{name}", f.read())

    def close(self) -> None:
        self.writer.close()
