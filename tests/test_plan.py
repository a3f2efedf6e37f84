"""`pretrain.py --plan`: what a config will do, from the config alone, without Ray."""
import subprocess
import sys

from conftest import ROOT


def plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/pretrain.py", *args, "--plan"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_of_the_paper_vit_large_at_64_workers():
    result = plan("--config", "configs/mae_vit_large.yaml", "scaling.num_workers=64", "data.path=/nonexistent")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1,281,167 images (ImageNet-1k's count: data.path is not readable here" in out
    assert "64 per worker x accum 1 x 64 workers = effective 4,096" in out
    assert "lr:             0.0024 (blr 0.00015 x 4,096 / 256)" in out
    assert "312 steps per epoch x 800 epochs = 249,600 steps; warmup 40 epochs = 12,480 steps" in out
    assert "per worker:     {'CPU': 2.0, 'GPU': 1} (cuda, bf16)" in out
    assert "329.5 M parameters" in out and "GFLOPs per image" in out and "about 3.68 GiB" in out
    assert "x 64 = 64,000 images/s" in out and "decode CPUs to keep up" in out
    assert len(out.splitlines()) <= 40  # one screen
    assert "Ray" not in result.stdout + result.stderr  # no cluster started or joined


def test_plan_lists_readable_data_and_takes_the_accelerator_rate(digits):
    result = plan("--config", "configs/debug.yaml", f"data.path={digits}", "--accelerator-rate", "250")
    assert result.returncode == 0, result.stderr
    assert f"1,438 images (listed at {digits})" in result.stdout
    assert "250 images/s per accelerator" in result.stdout and "images of data.path" in result.stdout


def test_plan_refuses_a_bad_config_like_a_run():
    result = plan("--config", "configs/debug.yaml", "train.batch_size=0")
    assert result.returncode == 2 and "train.batch_size" in result.stderr
