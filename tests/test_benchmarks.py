"""The benchmark scripts run and print their JSON line (figures are not asserted here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_prints_ratio_and_flops():
    out = subprocess.run([sys.executable, "benchmarks/train_step.py", "--model", "mae_vit_tiny_patch4", "--batch", "4",
                          "--steps", "2", "--warmup", "1", "--no-compile", "--peak-tflops", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"reference_images_per_sec", "ours_images_per_sec", "ratio", "mfu"} <= result.keys()
    assert result["ratio"] > 0 and 0 < result["mfu"] < 1


@pytest.mark.slow
def test_ingest_benchmark_prints_both_rates_the_cost_of_epoch_boundaries_and_requests_per_image(ray_cluster, digits,
                                                                                                 s3_server):
    """Ours (WebDataset shards on the S3 server, through the benchmark's counting proxy)
    against the DataLoader baseline (the ImageFolder they came from), then whole epochs
    against the steady rate; with the fine-tuning view (RandAugment on both sides, random
    erasing): the pretraining view is the default and differs only in the transforms. Over
    the epochs the stream makes at most one request per 50 images."""
    from pipelines.prepare_shards import convert
    convert(str(digits), "s3://runs/ingest-bench", "webdataset", shard_size=256 * 2**10, s3_endpoint=s3_server)
    out = subprocess.run([sys.executable, "benchmarks/ingest.py", "--data", "s3://runs/ingest-bench", "--format",
                          "webdataset", "--baseline-data", str(digits), "--s3-endpoint", s3_server, "--cpus", "2",
                          "--seconds", "2", "--epochs", "2", "--batch", "32", "--input-size", "32",
                          "--recipe", "finetune", "--address", ray_cluster[0]],  # the suite's cluster: 2 CPUs
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["recipe"] == "finetune"
    assert result["baseline_images_per_sec"] > 0 and result["ours_images_per_sec"] > 0
    assert result["ratio"] == pytest.approx(result["ours_images_per_sec"] / result["baseline_images_per_sec"])
    assert result["epochs_ratio"] == pytest.approx(result["epochs_images_per_sec"] / result["steady_images_per_sec"])
    assert 0 < result["epochs_images_per_sec"]
    assert result["images"] >= 3 * (1438 // 32) * 32 and result["requests"].get("GET", 0) > 0
    assert result["requests_per_image"] <= 1 / 50, result


@pytest.mark.slow
def test_checkpoint_benchmark_measures_both_ways_on_local_disk_and_s3(ray_cluster):
    out = subprocess.run([sys.executable, "benchmarks/checkpoint.py", "--model", "mae_vit_tiny_patch4",
                          "--s3-model", "mae_vit_tiny_patch4", "--checkpoints", "1", "--address", ray_cluster[0]],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for where in ("local", "s3"):
        r = result[where]
        assert r["model"] == "mae_vit_tiny_patch4" and r["checkpoint_bytes"] > 0
        assert r["synchronous_stall_s"] > 0 and r["ours_stall_s"] > 0 and r["ratio"] > 0


@pytest.mark.slow
def test_startup_benchmark_counts_the_drivers_requests_per_layout():
    out = subprocess.run([sys.executable, "benchmarks/startup.py", "--scales", "40,80", "--per-shard", "40"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    figures = result["figures"]
    assert {f"{layout}/ours" for layout in ("imagefolder", "webdataset bare", "parquet bare")} <= figures.keys()
    # no request per image before training in any layout (a request per shard or class folder: 40 images each)
    assert all(f["requests_per_image"] <= 0.1 for k, f in figures.items() if k.endswith("/ours"))
    assert figures["webdataset bare/baseline"]["requests_per_image"] >= 2 and result["ratio"] > 10
