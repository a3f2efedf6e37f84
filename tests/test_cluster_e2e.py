"""Running as users do on a cluster: `ray job submit`, stop and re-submit, a worker killed,
resources that can never fit, checkpoints on an S3-compatible store, resume_from (from a
mid-epoch checkpoint on S3, and from an official encoder-only .pth: test_console.py)."""
import json
import os
import re
import signal
import subprocess
import threading
import time

import pyarrow.fs as pafs
import pytest

from conftest import (RAY, ROOT, SDAA_UNITS, checkpoint_dirs, read_jsonl, registered_checkpoints, run_pretrain,
                      wait_for)
from mae.recipe import lr_at

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = (1438 // 2) // 32  # debug.yaml on the demo digits: 22
# the same 64 images per step from one worker (one worker's processes less to start), where what
# a test asserts is the run's storage, not its workers
ONE_WORKER = ("scaling.num_workers=1", "train.batch_size=64")


def assert_each_epoch_and_step_once(run_dir, epochs):
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(epochs))
    assert [s["step"] for s in read_jsonl(run_dir / "steps.jsonl")] == list(range(1, epochs * STEPS_PER_EPOCH + 1))


def test_job_submit_on_sdaa_nodes_stop_resubmit_and_a_worker_killed(ray_cluster, digits, tmp_path):
    """`ray job submit` on the sdaa resource; `ray job stop` after the first checkpoint; the
    resubmission resumes from the latest checkpoint; then rank 1's worker process is killed
    (SIGKILL) after the resumed run's own first checkpoint: the run restarts its workers from
    the latest checkpoint (run.max_failures=1) and ends with every epoch and step once."""
    _, dashboard = ray_cluster
    # enough that the stop lands before the job could finish by itself (it lands within an epoch
    # or two of the first checkpoint), and that the resubmission trains an epoch after the kill
    epochs = 8
    overrides = [f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=job", f"train.epochs={epochs}",
                 "scaling.accelerator=sdaa", "scaling.device_type=cpu", "run.max_failures=1"]
    submit = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT)]
    entrypoint = ["--", "python", "pipelines/pretrain.py", "--config", "configs/debug.yaml", *overrides]
    first = subprocess.run([*submit, "--no-wait", *entrypoint], capture_output=True, text=True, timeout=120,
                           check=True)
    job_id = re.search(r"raysubmit_\w+", first.stdout).group(0)
    wait_for(lambda: registered_checkpoints(tmp_path / "job"), 300, "the first checkpoint")
    subprocess.run([RAY, "job", "stop", "--address", dashboard, job_id], check=True, capture_output=True, timeout=120)
    status = subprocess.run([RAY, "job", "status", "--address", dashboard, job_id], capture_output=True, text=True)
    assert "was stopped" in status.stdout
    done_before = len(read_jsonl(tmp_path / "job" / "metrics.jsonl"))
    assert 1 <= done_before < epochs
    saved_before = set(registered_checkpoints(tmp_path / "job"))

    second = subprocess.Popen([*submit, *entrypoint], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(second.stdout), daemon=True)  # never a full pipe
    reader.start()
    try:
        # (a checkpoint registered after the resume: its attempt's line was written before it)
        wait_for(lambda: set(registered_checkpoints(tmp_path / "job")) - saved_before, 300,
                 "the resumed run's first checkpoint")
        resumed = read_jsonl(tmp_path / "job" / "attempts.jsonl")[1]
        os.kill(resumed["workers"][1]["pid"], signal.SIGKILL)  # rank 1's worker process
        second.wait(timeout=600)
        reader.join(timeout=30)
        out = "".join(lines)
    finally:
        second.kill()
    assert second.returncode == 0, out[-3000:]
    assert re.search(r"Job .raysubmit_\w+. succeeded", out)
    assert_each_epoch_and_step_once(tmp_path / "job", epochs)
    # the run's own record of its starts: the resubmission continued from the latest checkpoint,
    # and so did its restart after the kill, with a new process for rank 1; one worker per unit
    # of the custom resource each time
    first_start, resumed, restart = read_jsonl(tmp_path / "job" / "attempts.jsonl")
    assert (first_start["epoch"], first_start["step"], first_start["source"]) == (0, 0, "fresh weights")
    assert resumed["epoch"] >= 1 and resumed["step"] == resumed["epoch"] * STEPS_PER_EPOCH
    assert resumed["source"].startswith("the run's latest checkpoint")
    assert restart["step"] >= resumed["step"] + STEPS_PER_EPOCH and restart["source"].startswith(
        "the run's latest checkpoint")
    assert restart["workers"][1]["pid"] != resumed["workers"][1]["pid"]
    for attempt in (first_start, resumed, restart):
        assert [w["rank"] for w in attempt["workers"]] == [0, 1] and SDAA_UNITS == 2
        assert all(w["device"] == "cpu" and w["resources"] == {"CPU": 0.5, "sdaa": 1.0} for w in attempt["workers"])
        assert len({w["pid"] for w in attempt["workers"]}) == 2


def test_resources_that_can_never_fit_fail_fast(ray_cluster, digits, tmp_path):
    t0 = time.monotonic()
    result = run_pretrain(f"data.path={digits}", f"run.storage_path={tmp_path}", "scaling.num_workers=3",
                          "scaling.accelerator=sdaa", "scaling.device_type=cpu", timeout=120)
    assert result.returncode == 2 and time.monotonic() - t0 < 60
    assert result.stderr.strip().splitlines() == [  # every problem of the request, at once
        "error: scaling: 3 workers x 0.5 CPU + 1 CPU for decoding (data.min_cpus) need 2.5 CPU; the cluster has 2 CPU "
        "on 1 node(s)", "scaling: 3 workers x 1 sdaa need 3 sdaa; the cluster has 2 sdaa on 1 node(s)"]
    assert not checkpoint_dirs(tmp_path / "debug")


def test_bad_paths_are_one_line_errors(digits, tmp_path):
    result = run_pretrain(f"data.path={tmp_path / 'nothing'}", "data.build_demo=false", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: data.path:")
    result = run_pretrain(f"data.path={digits}", "run.storage_path=/proc/not-writable", timeout=120)
    assert result.returncode == 2
    assert "error: run.storage_path: cannot write the run directory /proc/not-writable/debug" in result.stderr


def _s3_objects(endpoint, prefix):
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", force_virtual_addressing=False)
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return fs, {i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_checkpoints_on_s3_kept_bounded_resumed_and_resumed_from(ray_cluster, s3_server, digits, tmp_path):
    """The run directory is on the S3 server behind a proxy that throttles: the first upload of
    one checkpoint is answered 503 SlowDown past the S3 client's own 3 attempts and lands on our
    retry, with no worker-group restart; in the resumed run, the last checkpoint's upload is
    refused every time: it is not registered and the run ends with exit 1, naming it."""
    from s3_proxy import SLOW_DOWN, S3Proxy
    slow_down = {"step_000000020/": 4, "step_000000044/": 10**9}  # 503s left for each checkpoint's PUTs

    def throttle(method, path, headers):
        for key, left in slow_down.items():
            if method == "PUT" and f"{key}checkpoint.pth" in path and left:
                slow_down[key] -= 1
                return SLOW_DOWN
    proxy = S3Proxy(s3_server, throttle)
    s3 = ["run.storage_path=s3://runs/team", f"run.s3_endpoint={proxy.endpoint}", "run.name=s3run",
          f"data.path={digits}", "train.checkpoint_every_steps=10", "run.keep_checkpoints=2",
          "optim.warmup_epochs=0.5", "run.tensorboard=true", *ONE_WORKER]
    first = run_pretrain(*s3, "train.epochs=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    puts = [status for method, path, status in proxy.log if method == "PUT" and "step_000000020/checkpoint" in path]
    assert puts[:4] == [503] * 4 and puts[-1] == 200 and slow_down["step_000000020/"] == 0
    assert "step_000000020 to s3://runs/team/s3run: " in first.stdout + first.stderr  # the retry, logged
    fs, objects = _s3_objects(s3_server, "runs/team/s3run")
    with fs.open_input_stream("runs/team/s3run/attempts.jsonl") as f:
        assert len(f.read().decode().splitlines()) == 1  # no worker-group restart
    assert {"config.yaml", "metrics.jsonl", "steps.jsonl", "loss_curve.png", "reconstructions/epoch_0000.png",
            "checkpoint_epoch_0000_step_000000020/checkpoint.pth",
            "checkpoint_epoch_0000_step_000000022/checkpoint.pth"} <= objects
    assert not any("step_000000010" in o for o in objects)  # only the 2 latest checkpoints are kept
    assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)

    # run.resume_from an s3:// mid-epoch checkpoint into a new local run: it continues at that
    # step, with the lr of its fractional epoch, and is the run that was never stopped (the same
    # losses, bit for bit), having decoded only the images of the epoch not trained yet
    fork = run_pretrain(f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=fork", "train.epochs=1",
                        "optim.warmup_epochs=0.5", f"run.s3_endpoint={s3_server}", *ONE_WORKER,
                        "run.resume_from=s3://runs/team/s3run/checkpoint_epoch_0000_step_000000020/checkpoint.pth")
    assert fork.returncode == 0, fork.stdout[-3000:] + fork.stderr[-3000:]
    assert "from epoch 0, micro-batch 20 (step 20; run.resume_from=s3://" in fork.stdout + fork.stderr
    steps = read_jsonl(tmp_path / "fork" / "steps.jsonl")
    assert [s["step"] for s in steps] == [21, 22]
    assert steps[0]["epoch"] == pytest.approx(20 / 22)
    assert steps[0]["lr"] == pytest.approx(lr_at(20 / 22, 2.5e-4, 0.0, 0.5, 1))
    (metrics,) = read_jsonl(tmp_path / "fork" / "metrics.jsonl")
    assert (metrics["epoch"], metrics["decoded_images"], metrics["skipped_images"]) == (0, 1438 - 20 * 64, 0)
    with fs.open_input_stream("runs/team/s3run/steps.jsonl") as f:
        uninterrupted = [json.loads(line) for line in f.read().decode().splitlines()]
    assert [s["loss"] for s in steps] == [s["loss"] for s in uninterrupted[20:22]]

    # the S3 run resumed, its older checkpoints pruned; its last checkpoint never uploads
    second = run_pretrain(*s3, "train.epochs=2", "run.checkpoint_upload_retries=1", "run.max_failures=0")
    out = second.stdout + second.stderr
    assert second.returncode == 1, out[-6000:]
    assert re.search(r"checkpoint checkpoint_epoch_0001_step_000000044 was not saved to s3://runs/team/s3run "
                     r"\(retries: 1\): .*SLOW_DOWN", out), out[-6000:]
    fs, objects = _s3_objects(s3_server, "runs/team/s3run")
    assert not any("step_000000020" in o or "step_000000044" in o for o in objects)  # pruned; never uploaded
    with fs.open_input_stream("runs/team/s3run/checkpoint_manager_snapshot.json") as f:
        registered = [r["checkpoint_dir_name"] for r in json.loads(f.read())["checkpoint_results"]]
    assert registered == ["checkpoint_epoch_0001_step_000000030", "checkpoint_epoch_0001_step_000000040"]
    proxy.close()
    with fs.open_input_stream("runs/team/s3run/metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f.read().decode().splitlines()] == [0, 1]
    with fs.open_input_stream("runs/team/s3run/steps.jsonl") as f:
        assert [json.loads(line)["step"] for line in f.read().decode().splitlines()] == list(range(1, 45))
