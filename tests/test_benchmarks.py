"""The benchmark scripts run and print their JSON line (figures are not asserted here)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_prints_ratio_and_flops():
    out = subprocess.run([sys.executable, "benchmarks/train_step.py", "--model", "mae_vit_tiny_patch4", "--batch", "4",
                          "--steps", "2", "--warmup", "1", "--no-compile", "--peak-tflops", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"reference_images_per_sec", "ours_images_per_sec", "ratio", "mfu"} <= result.keys()
    assert result["ratio"] > 0 and 0 < result["mfu"] < 1
