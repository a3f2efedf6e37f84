"""pipelines/compare_loss.py on synthetic logs with known errors (no Ray)."""
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.compare_loss import compare, main, read_log

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200


def reference(step: int) -> float:
    return 1.0 + 0.5 * math.exp(-step / 50)


def write_jsonl(path: Path, losses: dict[int, float], steps_per_epoch: int = 40) -> str:
    rows = [{"step": s, "epoch": (s - 1) / steps_per_epoch, "loss": loss, "lr": 1e-4} for s, loss in losses.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def curve(scale: Callable[[int], float] = lambda step: 1.0,
          loss: Callable[[int], float] = reference) -> dict[int, float]:
    """Steps 1..STEPS of loss(step) * scale(step)."""
    return {s: loss(s) * scale(s) for s in range(1, STEPS + 1)}


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def compare_logs(tmp_path, capsys):
    """Writes both curves as steps.jsonl files, runs main() on them, returns (exit code, JSON line)."""
    def compare_logs(run: dict[int, float], ref: dict[int, float], *options: str) -> tuple[int, dict]:
        code = main([write_jsonl(tmp_path / "run.jsonl", run), write_jsonl(tmp_path / "ref.jsonl", ref), *options])
        return code, last_json_line(capsys.readouterr().out)
    return compare_logs


def test_identical_logs_pass_with_zero_error(compare_logs):
    code, result = compare_logs(curve(), curve())
    assert code == 0
    assert result == {"steps": STEPS - 50, "mean_relative_error": 0.0, "mean_absolute_error": 0.0, "passed": True}


def test_run_3_percent_above_passes(compare_logs):
    code, result = compare_logs(curve(lambda s: 1.03), curve())
    assert code == 0 and result["passed"]
    assert result["mean_relative_error"] == pytest.approx(0.03)


def test_run_10_percent_above_fails(compare_logs):
    code, result = compare_logs(curve(lambda s: 1.10), curve())
    assert code == 1 and not result["passed"]
    assert result["mean_relative_error"] == pytest.approx(0.10)


def test_alternating_errors_fail_unless_signed(compare_logs):
    alternating = curve(lambda s: 1.10 if s % 2 else 0.90)
    code, result = compare_logs(alternating, curve())
    assert code == 1
    assert result["mean_relative_error"] == pytest.approx(0.10)

    code, result = compare_logs(alternating, curve(), "--signed")
    assert code == 0 and result["passed"]
    assert result["mean_relative_error"] == pytest.approx(0.0, abs=1e-12)


def test_signed_run_consistently_below_fails(compare_logs):
    code, result = compare_logs(curve(lambda s: 0.90), curve(), "--signed")
    assert code == 1
    assert result["mean_relative_error"] == pytest.approx(-0.10)


def test_absolute_threshold_alone_can_pass(compare_logs):
    ref = curve(loss=lambda step: 1e-3)
    run = {s: loss + 1e-4 for s, loss in ref.items()}
    code, result = compare_logs(run, ref)
    assert result["mean_relative_error"] == pytest.approx(0.10)
    assert result["mean_absolute_error"] == pytest.approx(1e-4)
    assert code == 0

    assert compare_logs(run, ref, "--max-abs", "5e-5")[0] == 1


def test_skip_drops_the_first_steps(compare_logs):
    run = curve(lambda s: 100.0 if s <= 50 else 1.0)
    code, result = compare_logs(run, curve())
    assert code == 0 and result["steps"] == STEPS - 50 and result["mean_relative_error"] == 0.0

    code, result = compare_logs(run, curve(), "--skip", "0")
    assert code == 1 and result["steps"] == STEPS


def test_compare_uses_common_steps_only():
    run = {s: 2.0 for s in range(1, 101)}
    ref = {s: 1.0 for s in range(61, 201)}
    assert compare(run, ref, skip=50) == {"steps": 40, "mean_relative_error": 1.0, "mean_absolute_error": 1.0}


def test_text_log_with_iterations_restarting_each_epoch(tmp_path):
    lines = []
    for epoch in range(2):
        for it in range(3):
            for rank in (0, 1):
                loss = 0.9 - 0.1 * (3 * epoch + it) + rank  # rank 1 lines are off by 1.0
                lines.append(f"Epoch: {epoch} Iteration: {it}  rank : {rank}  train.loss : {loss:.4f}  "
                             f"train.ips : 95.1 imgs/s")
        lines.append(f"Epoch: {epoch} finished, 3 iterations")
    path = tmp_path / "ref.log"
    path.write_text("\n".join(lines) + "\n")
    assert read_log(str(path)) == pytest.approx({1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4})


def test_text_log_with_global_iterations(tmp_path):
    path = tmp_path / "ref.log"
    path.write_text("Epoch: 0 Iteration: 1  rank : 0  train.loss : 0.9521\n"
                    "Epoch: 0 Iteration: 2  rank : 0  train.loss : 0.9\n"
                    "Epoch: 1 Iteration: 3  rank : 0  train.loss : 0.8\n")
    assert read_log(str(path)) == {1: 0.9521, 2: 0.9, 3: 0.8}


def test_text_log_without_step_numbers_counts_lines(tmp_path):
    path = tmp_path / "ref.log"
    path.write_text("starting training\n"
                    "[12:00:01] lr 0.0001 loss 0.9521 time 0.3s\n"
                    "\n"
                    "some warning without a number\n"
                    "INFO loss: 0.9\n"
                    "INFO loss=8e-1 val_loss=5.0\n")
    assert read_log(str(path)) == {1: 0.9521, 2: 0.9, 3: 0.8}


def test_jsonl_run_against_text_reference(tmp_path, capsys):
    steps_per_epoch = 40
    ref_lines = [f"Epoch: {(s - 1) // steps_per_epoch} Iteration: {(s - 1) % steps_per_epoch}  rank : {rank}  "
                 f"train.loss : {reference(s) + rank:.6f}  train.ips : 95.1 imgs/s"
                 for s in range(1, STEPS + 1) for rank in (0, 1)]
    ref = tmp_path / "reference.log"
    ref.write_text("\n".join(ref_lines) + "\n")
    run = write_jsonl(tmp_path / "steps.jsonl", curve(lambda s: 1.03), steps_per_epoch)

    assert main([run, str(ref)]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["steps"] == STEPS - 50
    assert result["mean_relative_error"] == pytest.approx(0.03, abs=1e-5)


def test_missing_file_exits_2(tmp_path, capsys):
    ref = write_jsonl(tmp_path / "ref.jsonl", curve())
    assert main([str(tmp_path / "nope.jsonl"), ref]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.jsonl" in err and len(err.splitlines()) == 1


def test_log_without_loss_lines_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty.log"
    empty.write_text("Epoch: 0 Iteration: 1 rank : 0 train.ips : 95.1 imgs/s\n")
    assert main([write_jsonl(tmp_path / "run.jsonl", curve()), str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty.log" in err and "no loss" in err


def test_no_common_steps_after_skip_exits_2(tmp_path, capsys):
    short = {s: 1.0 for s in range(1, 51)}
    assert main([write_jsonl(tmp_path / "run.jsonl", short), write_jsonl(tmp_path / "ref.jsonl", curve())]) == 2
    assert "no common steps" in capsys.readouterr().err


def test_plot_writes_png(tmp_path, compare_logs):
    png = tmp_path / "out" / "compare.png"
    png.parent.mkdir()
    code, result = compare_logs(curve(lambda s: 1.10), curve(), "--plot", str(png))
    assert code == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_runs_as_a_subprocess(tmp_path):
    run = write_jsonl(tmp_path / "run.jsonl", curve(lambda s: 1.10))
    ref = write_jsonl(tmp_path / "ref.jsonl", curve())
    proc = subprocess.run([sys.executable, "pipelines/compare_loss.py", run, ref, "--max-rel", "0.2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["passed"] and last["steps"] == STEPS - 50
    assert last["mean_relative_error"] == pytest.approx(0.10)
    assert "PASS" in proc.stdout
