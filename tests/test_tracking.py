"""A run's metrics reach every sink (files, TensorBoard, MLflow, console), against the real
MLflow server (SQLite backend, served artifacts) the suite starts on 127.0.0.1
(conftest.mlflow_server). A whole run and its resubmission logging into one MLflow run is
checked on the shared pretraining run (test_pretrain_e2e.py)."""
import json
import logging
import struct

import pytest


mlflow = pytest.importorskip("mlflow")  # the `mlflow` extra; installed with `test`
STEPS_PER_EPOCH = (1438 // 2) // 32  # debug.yaml on the demo digits


def test_credentials_in_the_tracking_uri_are_refused(tmp_path):
    from pipelines.common.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="run.mlflow_tracking_uri: '<redacted>' is not allowed; no credentials"):
        load_config("configs/debug.yaml", [f"data.path={tmp_path}", "run.mlflow_tracking_uri=http://u:pw@h:5000"])


def finetune_epoch(epoch: int, steps_per_epoch: int = 3) -> tuple[dict, list[dict]]:
    """A fine-tuning epoch's metrics, shaped as the train loop's, and its step records."""
    first = epoch * steps_per_epoch + 1
    records = [{"step": first + k, "epoch": epoch + k / steps_per_epoch, "loss": 2.0 - 0.1 * (first + k),
                "lr": 1e-3 * (k + 1), "images": 64} for k in range(steps_per_epoch)]
    metrics = {"epoch": epoch, "train_loss": 1.9 - 0.3 * epoch, "train_lr": 3e-3, "images_per_sec": 512.0,
               "epoch_seconds": 0.375, "skipped_images": epoch, "steps": steps_per_epoch,
               "val_top1": 41.5 + 10 * epoch, "val_top5": 80.25 + 5 * epoch, "val_loss": 1.5 - 0.25 * epoch,
               "val_images": 200, "best_val_top1": 41.5 + 10 * epoch}
    return metrics, records


def tensorboard_scalars(folder) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the scalars in a TensorBoard folder's event files (TFRecord
    framing: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2
    found = {}
    for path in folder.glob("events.out.tfevents.*"):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            found |= {(v.tag, event.step): v.simple_value for v in event.summary.value if v.HasField("simple_value")}
            pos += 12 + length + 4
    return found


def test_every_numeric_epoch_metric_reaches_every_sink(tmp_path, mlflow_server, caplog):
    from mlflow.tracking import MlflowClient

    from cluster.storage import open_storage
    from pipelines.output.metrics import RunMetrics
    from pipelines.output.tracking import MlflowTracker
    storage = open_storage(str(tmp_path / "run"))
    tracker = MlflowTracker(storage, mlflow_server, "mae-tests-metrics", "fine-tuned", {"train": {"task": "finetune"}})
    run = RunMetrics(storage, start_epoch=0, start_step=0, tensorboard=True, tracker=tracker)
    epochs = [finetune_epoch(0), finetune_epoch(1)]
    with caplog.at_level(logging.INFO, logger="mae.train"):
        for metrics, records in epochs:
            run.epoch(metrics, records)
    run.finish()

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [metrics for metrics, _ in epochs]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert steps == epochs[0][1] + epochs[1][1]
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "epoch 1 validation: top-1 51.50%  top-5 85.25%  loss 1.2500  (200 images; best top-1 51.50%)" \
        in caplog.messages
    assert any(m.startswith("epoch 1 done: train_loss 1.6000  lr 3.000e-03  images/s 512.0") for m in caplog.messages)

    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    history = {name: [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, f"epoch/{name}")]
               for name in ("val_top1", "val_top5", "val_loss", "val_images", "best_val_top1", "train_loss")}
    assert history["val_top1"] == [(3, 41.5), (6, 51.5)] and history["val_top5"] == [(3, 80.25), (6, 85.25)]
    assert history["val_loss"] == [(3, 1.5), (6, 1.25)] and history["val_images"] == [(3, 200.0), (6, 200.0)]
    assert history["best_val_top1"] == [(3, 41.5), (6, 51.5)] and len(history["train_loss"]) == 2
    assert [m.value for m in client.get_metric_history(tracker.run_id, "epoch")] == [0.0, 1.0]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(1, 7))
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(tracker.run_id)}

    events = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    for key in ("train_loss", "train_lr", "images_per_sec", "epoch_seconds", "skipped_images", "steps",
                "val_top1", "val_top5", "val_loss", "val_images", "best_val_top1"):
        assert events[(f"epoch/{key}", 6)] == pytest.approx(epochs[1][0][key]), key
    assert events[("epoch/val_top1", 3)] == pytest.approx(41.5)
    assert events[("train/loss", 6)] == pytest.approx(epochs[1][1][-1]["loss"])
    assert {step for tag, step in events if tag == "train/lr"} == set(range(1, 7))


def test_a_resumed_run_keeps_each_epoch_and_step_once(tmp_path):
    from cluster.storage import open_storage
    from pipelines.output.metrics import RunMetrics
    storage = open_storage(str(tmp_path))
    first = RunMetrics(storage, start_epoch=0, start_step=0)
    for epoch in range(2):  # the previous attempt wrote epoch 1 after the checkpoint it resumes from
        first.epoch(*finetune_epoch(epoch))
    first.steps(finetune_epoch(2)[1][:2])
    resumed = RunMetrics(storage, start_epoch=1, start_step=3)
    resumed.epoch(*finetune_epoch(1))
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert [json.loads(line)["step"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()] == \
        list(range(1, 7))
