"""The driver's console as a person reads it: the run's own lines, its workers' warnings
tagged with where they happened, and none of Ray's internals unless --verbose (which
test_hostile.py's hostile-data run uses)."""
import shutil

import pytest
import torch

from conftest import run_pretrain
from mae import create_model

pytestmark = pytest.mark.slow
RAY_INTERNALS = ("(RayTrainWorker pid=", "(SplitCoordinator", "(TrainController", "core_worker", "TrainingReport(",
                 "Reporting training result", "Checkpoint successfully created", "Progress bar", ".cc:")


@pytest.fixture(scope="module")
def one_broken(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("console") / "digits"
    shutil.copytree(digits, root)
    (root / "train" / "3" / "broken.jpg").write_bytes(b"not a JPEG at all")
    return root


def test_the_console_shows_the_run_and_its_warnings_not_rays_internals(ray_cluster, one_broken, tmp_path):
    """A run started from an official encoder-only checkpoint (`mae_pretrain_vit_*.pth`: no
    decoder, no mask token), as a person reads its console."""
    torch.manual_seed(3)
    state = create_model("mae_vit_tiny_patch4", img_size=16).state_dict()
    encoder_only = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain_vit_tiny.pth")
    result = run_pretrain(f"data.path={one_broken}", f"run.storage_path={tmp_path}", "run.name=quiet",
                          "train.epochs=1", "optim.warmup_epochs=0.5", "scaling.num_workers=1",
                          "train.batch_size=64",  # one worker is enough to read its console: 22 steps still
                          f"run.resume_from={tmp_path / 'mae_pretrain_vit_tiny.pth'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert not [line for line in lines if any(marker in line for marker in RAY_INTERNALS)], out[-3000:]
    assert lines[0].startswith("1439 training images in 10 classes")
    assert any(line.startswith("training mae_vit_tiny_patch4 from epoch 0, micro-batch 0") for line in lines)
    assert "checkpoint holds the encoder only; newly initialised: mask_token, decoder_pos_embed" in out
    assert "from epoch 0, micro-batch 0 (step 0; run.resume_from=" in out
    assert any(line.startswith("epoch 0/1  step 20/22  loss") for line in lines)
    assert any(line.startswith("epoch 0 done: train_loss") for line in lines)
    broken = [line for line in lines if "broken.jpg" in line]
    assert len(broken) == 1 and broken[0].startswith("warning: skipping ") and "[decoding on " in broken[0]
    assert lines[-1].startswith("  final epoch 0: train_loss")
    assert len(lines) <= 30  # the whole run on one screen


def test_a_dead_worker_is_one_line_with_its_rank_and_node(ray_cluster, digits, tmp_path):
    import os
    import signal

    from conftest import read_jsonl, wait_for
    proc = run_pretrain(f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=dies", "train.epochs=6",
                        "optim.warmup_epochs=0.5", "run.max_failures=0", wait=False)
    try:
        wait_for(lambda: (tmp_path / "dies" / "attempts.jsonl").exists(), 300, "the workers' start")
        (attempt,) = read_jsonl(tmp_path / "dies" / "attempts.jsonl")
        os.kill(attempt["workers"][1]["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0].startswith(f"error: rank 1 on {attempt['workers'][1]['node_ip']}: "), out
    assert "the full tracebacks are in the workers' logs" in errors[1] and "Traceback" not in out
