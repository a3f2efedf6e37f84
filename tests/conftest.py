"""Shared fixtures: one real local Ray cluster for the whole session, real JPEG files."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray, so workers use its python

# Token auth turns on when ~/.ray/auth_token exists; the CLI, the cluster, this process and
# the entry points started by the tests must agree, so the tests run without it.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Job entrypoints run the raylet's `python`: the venv's, when the cluster starts with it on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
# Credentials of the local S3 server (moto accepts any); set before the cluster starts so its
# workers inherit them, as nodes of a real cluster have theirs.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")
# Ray Train's controller polls its workers every 2 s by default, so a run's end (and each
# start) was noticed up to 2 s late; the clusters the tests start poll every 0.5 s.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
# Each node's dashboard agent samples every Ray process's CPU and memory (psutil) every 5 s for
# the dashboard's node view and metrics, which no test reads: a minute here. (The clusters the
# suite starts run ~400 worker processes; the agents were ~3% of the suite's CPU.)
os.environ["REPORTER_UPDATE_INTERVAL_MS"] = "60000"
# Each node's log monitor lists its log folder every 0.1 s while it holds under 1,000 files,
# then every 0.5 s (Ray's back-off): every 0.5 s here (~3% of the suite's CPU). A new
# worker's file is found up to 0.5 s later and read from its start: no line is lost.
os.environ["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] = "0"
# Ray Train starts a PreemptionWatcher actor (a process) with each worker group to poll for
# nodes being drained; no test drains a node (they are killed), and the suite starts ~60
# worker groups.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
# Ray's usage statistics off here too, as on the clusters the tests start (--disable-usage-stats):
# with them on, each Ray Data execution in this process queried a Prometheus that is not there
# from a background thread and logged the failure with its traceback. Python 3.11 formats a
# traceback's carets with `ast.parse`, whose AST construction counts its recursion in state the
# interpreter's threads share (CPython gh-106905, pytest-dev/pytest#10763): test_layout's
# `ast.parse` of our modules, run at that moment, failed once with "SystemError: AST
# constructor recursion depth mismatch".
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
SDAA_UNITS = 2  # the shared cluster advertises a custom `sdaa` resource, as SDAA nodes do


def _free_port() -> int:
    """A port free now, from this pytest worker's own range (below Linux's ephemeral ports,
    above Ray's default worker ports): the suite's two workers (pytest-xdist, `make test`)
    never pick the same one between choosing it and binding it."""
    import random
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    low = 20000 + 5000 * (int(worker[2:]) % 2) if worker[2:].isdigit() else 20000
    while True:
        port = random.randrange(low, low + 5000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def stop_cluster(temp_dir: str, gcs_port: int | None = None) -> None:
    """Stop the Ray cluster this process started: kill its daemons (GCS, raylet, dashboard,
    log monitor: each names the cluster's temp dir on its command line), its Ray client server
    (which names only the GCS address, hence `gcs_port`; left alone it outlives the cluster)
    and every process they started. Those rename themselves (`ray::DashboardAgent`,
    `ray::RuntimeEnvAgent`, `ray::IDLE`, a detached `ray::_StatsActor`) and so name nothing:
    left behind by a killed raylet, the agents spun for about a minute (~50 CPU-s each, while
    the other pytest worker still ran tests). Never `ray stop --force`, which stops every Ray
    on the machine, another suite's included."""
    import re
    import signal
    client_server = re.compile(rb"ray\.util\.client\.server\x00.*--address=[^\x00]*:%d\x00" % (gcs_port or -1), re.S)
    parent, ours = {}, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent[int(pid)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if temp_dir.encode() in cmdline or client_server.search(cmdline):
            ours.add(int(pid))
    grown = True
    while grown:  # and their descendants
        children = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        ours |= children
        grown = bool(children)
    for pid in ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """`ray start --head` from the project's venv, with 2 CPUs and 2 units of `sdaa`; yields
    (GCS address, dashboard URL). The GCS address is also set as RAY_ADDRESS, so entry points
    started by tests join the cluster."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    address, dashboard_port = f"127.0.0.1:{_free_port()}", _free_port()
    # 2 CPUs, the machine's: with 4, each run on it started 3 decode processes (each importing
    # torch and torchvision: ~3.5 s of CPU) for 1,438 digits of 8x8 px
    # every port its own (a free one, or the OS's choice for workers): `make test` runs two
    # pytest workers, each with its cluster, and another suite may run on the machine; Ray's
    # fixed defaults (the client server's 10001, the dashboard agent's 52365) would collide
    subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", f"--resources={{\"sdaa\": {SDAA_UNITS}}}",
                    f"--object-store-memory={400 * 2**20}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_free_port()}",
                    f"--dashboard-agent-listen-port={_free_port()}", "--min-worker-port=0", "--max-worker-port=0",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, capture_output=True)
    os.environ["RAY_ADDRESS"] = address
    os.environ["MAE_TEST_RAY_TEMP_DIR"] = temp_dir  # its logs, for tests that read them
    try:
        yield address, f"http://127.0.0.1:{dashboard_port}"
    finally:
        import ray
        ray.shutdown()
        stop_cluster(temp_dir, int(address.split(":")[1]))
        os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This process connected to the shared cluster (for tests that run Ray Data here)."""
    import ray
    ray.init(address=ray_cluster[0], ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The real demo dataset (scikit-learn digits as JPEG files), written once."""
    from pipelines.data.demo_data import write_digits
    return write_digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket `runs`; yields its URL."""
    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", force_virtual_addressing=False,
                           allow_bucket_creation=True)
    fs.create_dir("runs")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, served artifacts) on 127.0.0.1; yields its URL."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            # no job runner: MLflow's server jobs (eight huey processes, ~16 CPU-s
                            # at start, left behind by the server's terminate) serve no test
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the MLflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


# Helpers for the end-to-end tests (imported from conftest).



def _paper_finetune() -> list[str]:
    """The paper's fine-tuning regularisers, as overrides read from configs/finetune_vit_base.yaml
    (every augment key, drop path, layer decay), which the demo's fine-tuning config turns off
    for 8x8 digits: tests of the recipe put them back on it."""
    import yaml
    paper = yaml.safe_load((ROOT / "configs" / "finetune_vit_base.yaml").read_text())
    return [f"augment.{k}={v}" for k, v in paper["augment"].items()] + [
        f"model.drop_path={paper['model']['drop_path']}", f"optim.layer_decay={paper['optim']['layer_decay']}"]


PAPER_FINETUNE = _paper_finetune()

def run_pretrain(*overrides, config="configs/debug.yaml", timeout=600, wait=True, entry="pipelines/pretrain.py"):
    """`python ENTRY --config CONFIG overrides...` (by default pipelines/pretrain.py) in the
    repository root, joining the shared cluster through RAY_ADDRESS."""
    cmd = [sys.executable, entry, "--config", config, *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=os.environ)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ)


def read_jsonl(path) -> list[dict]:
    import json
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def checkpoint_dirs(run_dir) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob("checkpoint_epoch_*"))


def registered_checkpoints(run_dir) -> list[str]:
    """Checkpoints Ray Train has registered for the run (a restart resumes from these; a
    checkpoint folder appears before its upload is done and registered)."""
    import json
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def add_broken_files_to(folder) -> int:
    """Seven files named .JPEG that must not be trained on, in `folder`: three undecodable
    (truncated, empty, text) and the four format bombs of `crafted.FORMAT_BOMBS` (a TIFF, an
    ICO, an ICNS and an AVIF whose headers claim less than they decode to); returns 7."""
    from crafted import FORMAT_BOMBS
    jpeg = next(folder.glob("*.JPEG")).read_bytes()
    (folder / "truncated.JPEG").write_bytes(jpeg[:100])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_bytes(b"this is not an image\n")
    for name, make in FORMAT_BOMBS.items():
        (folder / name).write_bytes(make())
    return 3 + len(FORMAT_BOMBS)


def wait_for(predicate, timeout: float, what: str):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


ELASTIC = ("scaling.min_workers=1",)  # the debug config's run as an elastic one (each step's images at any count)


@pytest.fixture(scope="session")
def pretrained_run(ray_cluster, digits, tmp_path_factory, mlflow_server):
    """One pretraining run (configs/debug.yaml, elastic: 1..2 workers, at 2 here) of 2 epochs,
    tracked in MLflow, then its resubmission extended to 3 epochs with TensorBoard on; what the
    first left (its files, its MLflow run) is kept aside. test_pretrain_e2e.py asserts what it
    wrote (and resumes a run of its config at one worker); fine-tunes start from it
    (test_finetune_e2e.py)."""
    storage = tmp_path_factory.mktemp("runs")
    common = [f"data.path={digits}", f"run.storage_path={storage}", "run.name=e2e",
              f"run.mlflow_tracking_uri={mlflow_server}", "run.mlflow_experiment=mae-tests", *ELASTIC]
    first = run_pretrain(*common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_metrics = read_jsonl(storage / "e2e" / "metrics.jsonl")
    first_steps = read_jsonl(storage / "e2e" / "steps.jsonl")
    first_mlflow = mlflow_view(mlflow_server, storage / "e2e")
    second = run_pretrain(*common, "train.epochs=3", "run.tensorboard=true")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return dict(dir=storage / "e2e", first=first, first_metrics=first_metrics, first_steps=first_steps,
                first_mlflow=first_mlflow, second=second, mlflow=mlflow_server)


def mlflow_view(server: str, run_dir) -> dict:
    """What the MLflow server holds of the run in `run_dir` (its id from mlflow.json)."""
    import json

    from mlflow.tracking import MlflowClient
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=server)
    run = client.get_run(run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in
                                                                   client.list_artifacts(run_id, "reconstructions")}
    loss = client.get_metric_history(run_id, "loss")
    return dict(run_id=run_id, run=run, artifacts=artifacts, loss_steps=[m.step for m in loss],
                loss={m.step: m.value for m in loss},
                epochs=[m.value for m in client.get_metric_history(run_id, "epoch")],
                runs_in_experiment=len(client.search_runs([run.info.experiment_id])))


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadscope`): each test
# module stays on one worker (its module-scoped fixtures are made once), the modules that
# share a session fixture stay together, and the modules are split in two halves of about
# equal time in `make test` and in `make test-fast` alike (from each one's --durations: in the
# fast run the end-to-end modules, first in each half, are nearly empty, and the modules after
# them balance it); the small modules go where a worker is free.
HALF_A = ("test_multinode", "test_cluster_e2e", "test_console", "test_evaluate", "test_hf", "test_cluster",
          "test_lease", "test_export", "test_layout", "test_transforms", "test_decode_limits", "test_plan",
          "test_train_step")
HALF_B = ("test_pretrain_e2e", "test_finetune_e2e", "test_hostile", "test_sources", "test_benchmarks",
          "test_tracking")
# (test_pretrain_e2e and test_finetune_e2e share pretrained_run; it and test_tracking, the MLflow server)
GROUPS = {**dict.fromkeys(HALF_A, "half-a"), **dict.fromkeys(HALF_B, "half-b")}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadscope":
        from xdist_compat import Groups
        return Groups(config, log, GROUPS)
