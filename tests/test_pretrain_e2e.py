"""The real entry point on the shared local Ray cluster: train, resume, extend, stop on NaN;
the run and its resubmission tracked in one MLflow run on the suite's real MLflow server."""
import re

import pytest
import torch

from conftest import ELASTIC
from conftest import checkpoint_dirs as checkpoints
from conftest import mlflow_view
from conftest import read_jsonl as jsonl
from conftest import run_pretrain as pretrain
from mae import create_model
from mae.checkpoint import load_checkpoint
from mae.recipe import lr_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(pretrained_run):
    """The suite's shared pretraining run (conftest.py): 2 epochs tracked in MLflow, then its
    resubmission extended to 3 epochs with TensorBoard on."""
    return pretrained_run


def test_two_workers_two_epochs_write_checkpoints_and_logs(run):
    assert run["first_metrics"][0]["epoch"] == 0 and len(run["first_metrics"]) == 2
    steps_per_epoch = (1438 // 2) // 32  # 1,438 digits split over 2 workers, batch 32
    assert [s["step"] for s in run["first_steps"]] == list(range(1, 2 * steps_per_epoch + 1))
    assert all({"epoch", "train_loss", "train_lr", "images_per_sec"} <= m.keys() for m in run["first_metrics"])
    assert all(set(s) == {"step", "epoch", "loss", "lr", "images"} and s["images"] == 64 for s in run["first_steps"])
    assert "loss_curve.png" in run["first"].stdout and "metrics.jsonl" in run["first"].stdout
    assert (run["dir"] / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "model:" in (run["dir"] / "config.yaml").read_text()


def test_reconstruction_figures_each_epoch_and_tensorboard_events(run):
    figures = sorted(p.name for p in (run["dir"] / "reconstructions").iterdir())
    assert figures == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    from PIL import Image
    with Image.open(run["dir"] / "reconstructions" / "epoch_0002.png") as im:
        assert im.width > 4 * 96 and im.height > 8 * 96  # 8 held-out images x 4 columns
    from tensorboardX.proto import event_pb2  # the resumed run wrote events for its epoch
    import struct
    raw = next((run["dir"] / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
    tags, pos = set(), 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos:pos + 8])
        event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
        tags |= {(v.tag, event.step) for v in event.summary.value}
        pos += 12 + length + 4
    assert {("train/loss", 45), ("train/loss", 66), ("train/lr", 66), ("epoch/train_loss", 66),
            ("epoch/images_per_sec", 66), ("reconstructions", 66)} <= tags
    assert not any(step <= 44 for tag, step in tags if tag == "train/loss")


def test_loss_goes_down(run):
    m = run["first_metrics"]
    assert m[1]["train_loss"] < m[0]["train_loss"]
    steps = run["first_steps"]
    assert sum(s["loss"] for s in steps[-5:]) < sum(s["loss"] for s in steps[:5])


def test_lr_follows_warmup_then_cosine(run):
    peak = 1.0e-3 * 64 / 256  # debug.yaml: blr 1e-3, 2 workers x 32
    for s in run["first_steps"]:
        assert s["lr"] == pytest.approx(lr_at(s["epoch"], peak, 0.0, 1, 2), rel=1e-9, abs=1e-15)


def test_resume_appends_exactly_one_epoch_with_restored_state(run):
    assert "from epoch 2, micro-batch 0 (step 44; the run's latest checkpoint" in \
        run["second"].stdout + run["second"].stderr
    metrics = jsonl(run["dir"] / "metrics.jsonl")
    steps = jsonl(run["dir"] / "steps.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert metrics[:2] == run["first_metrics"]
    assert [s["step"] for s in steps] == list(range(1, 67))
    assert steps[:44] == run["first_steps"]
    # the new epoch's lr comes from the extended schedule (3 epochs) at fractional epoch 2
    assert steps[44]["epoch"] == 2.0
    assert steps[44]["lr"] == pytest.approx(lr_at(2.0, 2.5e-4, 0.0, 1, 3))
    assert checkpoints(run["dir"]) == ["checkpoint_epoch_0000_step_000000022", "checkpoint_epoch_0001_step_000000044",
                                       "checkpoint_epoch_0002_step_000000066"]
    ckpt = load_checkpoint(run["dir"] / "checkpoint_epoch_0002_step_000000066" / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 66
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= ckpt.keys() and isinstance(ckpt["args"], dict)
    assert all(s["step"] == 66 for s in ckpt["optimizer"]["state"].values())  # AdamW state carried over


def test_the_same_seed_gives_the_same_run_and_a_resized_resume_the_same_steps(run, digits, tmp_path):
    """A second run of the shared run's config (configs/debug.yaml, elastic 1..2: 2 workers, 2
    epochs, CPU, fp32), checkpointing every 30 steps, gives its per-step losses bit for bit; its
    mid-epoch checkpoint (step 30) records the positions of the epoch trained so far. Resumed from its
    step-30 checkpoint at another worker count (1 worker x accum 2: what an elastic restart
    after a lost node does), each later step trains the same images with the same crops and masks:
    its losses are the uninterrupted run's within float noise (the gradients of the step's
    two halves are summed in another order; with two halves on the CPU they come out equal).
    (A resume at the same count giving the losses bit for bit: test_cluster_e2e.py's S3 test;
    a run that is not elastic keeps its faster blocks, and draws the rest of an epoch anew
    when resumed at another count.)"""
    again = pretrain(f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=again",
                     "train.checkpoint_every_steps=30", *ELASTIC)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    steps = jsonl(tmp_path / "again" / "steps.jsonl")
    assert [s["loss"] for s in steps] == [s["loss"] for s in run["first_steps"]]  # ==: bit for bit
    mid = tmp_path / "again" / "checkpoint_epoch_0001_step_000000030" / "checkpoint.pth"
    position = load_checkpoint(mid)["position"]
    assert position["workers"] == 2 and position["images"] == 8 * 64 and position["step_blocks"] == 32
    # runs of positions: the blocks of 32 the split dealt in turn to the two workers, 8 each
    assert position["trained"] == [[0, 8 * 64]]  # 8 steps of epoch 1, 64 images each: its first 512 images

    resized = pretrain(f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=resized",
                       "scaling.num_workers=1", "train.accum_iter=2", f"run.resume_from={mid}", *ELASTIC)
    out = resized.stdout + resized.stderr
    assert resized.returncode == 0, out[-6000:]
    assert "resumed mid-epoch at 1 workers, saved at 2: each step from here on trains the images" in out, out[-6000:]
    later = jsonl(tmp_path / "resized" / "steps.jsonl")
    assert [s["step"] for s in later] == list(range(31, 45))
    assert [s["lr"] for s in later] == [s["lr"] for s in steps[30:]]
    assert [s["loss"] for s in later] == pytest.approx([s["loss"] for s in steps[30:]], rel=1e-5, abs=0)
    (epoch,) = jsonl(tmp_path / "resized" / "metrics.jsonl")
    assert epoch["decoded_images"] == 1438 - 8 * 64  # the rest of epoch 1 only


def test_checkpoint_loads_into_fresh_model_strict(run):
    ckpt = load_checkpoint(run["dir"] / "checkpoint_epoch_0001_step_000000044" / "checkpoint.pth")
    model = create_model("mae_vit_tiny_patch4", img_size=16)
    model.load_state_dict(ckpt["model"], strict=True)
    loss, _, _ = model(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(loss)


def test_non_finite_loss_stops_with_step_and_saves_nothing(ray_cluster, digits, tmp_path):
    """A restart would meet the same loss again: the run ends once, even with unlimited restarts
    (max_failures=-1; with 0 there is no restart to avoid, and the same line and exit)."""
    result = pretrain(f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=nan",
                      "optim.lr=1e30", "train.accum_iter=2", "train.log_every_steps=2", "run.max_failures=-1",
                      "scaling.num_workers=1")  # one worker is enough to meet it
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^error: loss is (nan|inf) at step \d+; stopping without saving a checkpoint$",
                     result.stderr, re.M), result.stderr[-2000:]
    assert checkpoints(tmp_path / "nan") == []
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()
    assert len(jsonl(tmp_path / "nan" / "attempts.jsonl")) == 1  # started once, never restarted


def test_a_run_and_its_resubmission_log_into_one_mlflow_run(run):
    first, steps_per_epoch = run["first_mlflow"], (1438 // 2) // 32
    assert first["run"].info.status == "FINISHED" and first["run"].info.run_name == "e2e"
    assert first["run"].data.params["model.name"] == "mae_vit_tiny_patch4"
    assert first["run"].data.params["train.epochs"] == "2"
    assert first["run"].data.tags["mae.run_dir"] == str(run["dir"])
    assert first["loss_steps"] == list(range(1, 2 * steps_per_epoch + 1))
    assert {"loss_curve.png", "reconstructions/epoch_0000.png"} <= first["artifacts"]
    # the resubmission resumed the run, and its MLflow run
    second = mlflow_view(run["mlflow"], run["dir"])
    assert second["run_id"] == first["run_id"]
    assert second["epochs"] == [0.0, 1.0, 2.0]
    assert second["loss_steps"] == list(range(1, 3 * steps_per_epoch + 1))
    steps = jsonl(run["dir"] / "steps.jsonl")
    assert all(second["loss"][s["step"]] == pytest.approx(s["loss"]) for s in steps)  # the figures of steps.jsonl
    assert second["run"].info.status == "FINISHED"
    assert second["runs_in_experiment"] == 1
