"""Many nodes, and losing some: a Ray cluster of several nodes on this machine (Ray's own
`ray.cluster_utils.Cluster`: every node its own raylet, object store, CPUs and `sdaa`
unit), run storage on the S3-compatible server (no path is shared between nodes for the
run's files), nodes killed mid-run and added back."""
import json
import os
import subprocess
import sys
import tempfile
import threading

import pyarrow.fs as pafs
import pytest

from conftest import ROOT, wait_for
from mae.recipe import lr_at

pytestmark = pytest.mark.slow
MB = 2**20
# One training worker each. A training node offers Ray no CPU (its worker asks for none), so
# decoding never takes it: with a CPU for the worker, Ray Data's decode tasks took the
# replacement node's CPU as soon as it came up, and the elastic grow, which needs a whole
# worker's resources free on a node, waited for a gap between them (the run ended first:
# the elastic test failed on one clean run of three).
# No log monitor on any node (each lists its node's log folder twice a second): the drivers
# here print only the run's own lines (pipelines/output/console.py), which travel through the
# job's actor, not through Ray's log streaming.
QUIET = {"include_log_monitor": False}
TRAIN_NODE = {"num_cpus": 0, "resources": {"sdaa": 1}, "object_store_memory": 120 * MB, **QUIET}
DECODE_NODE = {"num_cpus": 1, "object_store_memory": 120 * MB, **QUIET}  # no sdaa: only Ray Data runs there
# 2 workers x accum 1, or 1 worker x accum 2; the elastic run's blocks are 48 rows (not 16:
# Ray Data's cost per block, ~20 ms here, cost that test 30 s)
BATCH, EFFECTIVE = 48, 96
STEPS = 1438 // EFFECTIVE  # optimizer steps per epoch of the demo digits, at every worker count: 14


@pytest.fixture(scope="module")
def cluster():
    """A head node (the drivers, Ray Train's controller, decoding) and two training nodes,
    for this module's two runs; tests add and remove nodes, leaving two training nodes
    alive. Separate from the shared single-node cluster."""
    from ray.cluster_utils import Cluster
    # A killed node is found dead after 3 failed health checks 0.5 s apart (Ray's default: 5
    # checks 3 s apart, 15 s). The checks' own timeout stays Ray's 10 s: a busy node is not dead.
    health = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    # No dashboard either: the drivers here are processes, not `ray job submit` (its head and
    # nine module processes were ~20 CPU-s of the module, which no test reads).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * MB,
                                                      "_system_config": health, "include_dashboard": False,
                                                      **QUIET})
    for _ in range(2):
        c.add_node(**TRAIN_NODE)
    c.wait_for_nodes()
    yield c
    c.shutdown()


class S3Run:
    """A run directory on the S3 server, read as a node that shares no path with the others would."""

    def __init__(self, endpoint: str, name: str):
        self.fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", force_virtual_addressing=False)
        self.path = f"runs/multinode/{name}"
        self.overrides = ["run.storage_path=s3://runs/multinode", f"run.s3_endpoint={endpoint}", f"run.name={name}"]

    def text(self, name: str) -> str:
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as f:
                return f.read().decode()
        except FileNotFoundError:
            return ""

    def jsonl(self, name: str) -> list[dict]:
        return [json.loads(line) for line in self.text(name).splitlines()]

    def registered(self) -> list[str]:
        text = self.text("checkpoint_manager_snapshot.json")
        return [r["checkpoint_dir_name"] for r in json.loads(text)["checkpoint_results"]] if text else []


def start(cluster, digits, run: S3Run, *overrides):
    cmd = [sys.executable, "pipelines/pretrain.py", "--config", "configs/debug.yaml", f"data.path={digits}",
           "scaling.accelerator=sdaa", "scaling.device_type=cpu", "scaling.cpus_per_worker=0",
           f"train.batch_size={BATCH}", f"train.effective_batch={EFFECTIVE}", "train.checkpoint_every_steps=5",
           "run.max_failures=2", *run.overrides, *overrides]
    # A restart after a node's loss first asks for the size of the cluster as Ray Train last
    # read it (every 20 s: `refresh_autoscaling_view`), the dead node included, and waits for a
    # placement group of that size for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's 60 s) before
    # it asks again (retries of a start are not counted as failures): 10 s here.
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def waiting(proc, lines, predicate, timeout: float, what: str) -> None:
    """wait_for, with the driver's output when the run ended or the wait timed out."""
    try:
        wait_for(lambda: predicate() or proc.poll() is not None, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the driver printed:\n{''.join(lines)[-4000:]}") from None
    assert predicate(), f"the run ended before {what}:\n{''.join(lines)[-4000:]}"


def finish(proc, lines, timeout=900) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    return out


def node_of(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def assert_every_epoch_and_step_once(run: S3Run, epochs: int) -> list[dict]:
    assert [m["epoch"] for m in run.jsonl("metrics.jsonl")] == list(range(epochs))
    steps = run.jsonl("steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, epochs * STEPS + 1))
    return steps


REFRESH = """import sys, ray
from cluster.ray_compat import refresh_autoscaling_view
ray.init(address=sys.argv[1], log_to_driver=False)
refresh_autoscaling_view()
"""


def refresh(cluster) -> None:
    """Ray Train's view of the cluster's nodes read now, from a driver of its own."""
    done = subprocess.run([sys.executable, "-c", REFRESH, cluster.address], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_elastic_run_shrinks_when_a_training_node_dies_and_grows_when_one_comes_back(cluster, s3_server, digits):
    run = S3Run(s3_server, "elastic")
    # The grow must come before the run ends: after the shrunk group starts, the replacement
    # node's start (~3 s) and the next resize check (every second here) take ~4-5 s on an idle
    # machine, where the rest of the run trained 4 epochs in ~13 s on three nodes (the shrunk
    # group's one worker trains them slower).
    epochs = 5
    proc, lines = start(cluster, digits, run, f"train.epochs={epochs}", "scaling.num_workers=2",
                        "scaling.min_workers=1", "scaling.resize_check_seconds=1")
    waiting(proc, lines, run.registered, 400, "the first checkpoint")
    (first,) = run.jsonl("attempts.jsonl")
    assert len(first["workers"]) == 2 and len({w["node_id"] for w in first["workers"]}) == 2
    saved = run.registered()[-1]
    cluster.remove_node(node_of(cluster, first["workers"][1]["node_id"]), allow_graceful=False)  # mid-epoch
    refresh(cluster)  # the restart asks for the node left at once (see `start`)
    waiting(proc, lines, lambda: len(run.jsonl("attempts.jsonl")) >= 2, 300, "the restart on the node left")
    replacement = cluster.add_node(**TRAIN_NODE)  # a replacement comes up
    # Ray Train reads the cluster's nodes every 20 s (cluster/ray_compat.py: `refresh_autoscaling_view`):
    # left to that, the grow came after the rest of the run had ended, on one clean run of the
    # suite in four. Read now, it comes at the next resize check.
    refresh(cluster)
    waiting(proc, lines, lambda: len(run.jsonl("attempts.jsonl")) >= 3, 300, "the group to grow")
    finish(proc, lines)

    attempts = run.jsonl("attempts.jsonl")
    assert [len(a["workers"]) for a in attempts] == [2, 1, 2]
    for a in attempts:  # one worker per node; each start from where a checkpoint had got to
        assert len({w["node_id"] for w in a["workers"]}) == len(a["workers"])
    shrunk, grown = attempts[1], attempts[2]
    assert shrunk["source"].startswith("the run's latest checkpoint") and shrunk["step"] >= int(saved.split("_")[-1])
    assert grown["source"].startswith("the run's latest checkpoint") and grown["step"] >= shrunk["step"]
    assert first["workers"][1]["node_id"] not in {w["node_id"] for w in shrunk["workers"]}
    assert replacement.node_id in {w["node_id"] for w in grown["workers"]}
    steps = assert_every_epoch_and_step_once(run, epochs)
    peak = 1e-3 * EFFECTIVE / 256  # debug.yaml: blr 1e-3, one warmup epoch
    for s in steps:
        epoch, k = divmod(s["step"] - 1, STEPS)
        assert s["images"] == EFFECTIVE
        assert s["epoch"] == pytest.approx(epoch + k / STEPS, abs=1e-12)
        assert s["lr"] == pytest.approx(lr_at(epoch + k / STEPS, peak, 0.0, 1, epochs), rel=1e-9, abs=1e-15)


def test_run_survives_the_loss_of_a_node_that_only_decodes(cluster, s3_server, digits):
    decoder = cluster.add_node(**DECODE_NODE)  # the head's CPU decodes too, and alone once it is gone
    run = S3Run(s3_server, "decoder-lost")
    epochs = 2  # the node goes at the first checkpoint (step 5 of 28), mid-run
    proc, lines = start(cluster, digits, run, f"train.epochs={epochs}", "scaling.num_workers=2")
    waiting(proc, lines, run.registered, 400, "the first checkpoint")
    (first,) = run.jsonl("attempts.jsonl")
    assert decoder.node_id not in {w["node_id"] for w in first["workers"]}
    cluster.remove_node(decoder, allow_graceful=False)
    finish(proc, lines)
    assert_every_epoch_and_step_once(run, epochs)
    for a in run.jsonl("attempts.jsonl"):  # any restart was from a checkpoint, on the two training nodes
        assert len({w["node_id"] for w in a["workers"]}) == 2
        assert a["source"] == "fresh weights" or a["source"].startswith("the run's latest checkpoint")


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head node whose Ray autoscaler (v1, over Ray's fake multi-node provider, which starts
    worker nodes as local processes when a request needs them) can launch up to two nodes of
    type `sdaa_node`, none of them up. Yields its GCS address. Stopped by killing its own
    processes (`ray stop` would stop the shared cluster too)."""
    from conftest import RAY, _free_port, stop_cluster
    port = _free_port()
    config = {
        "cluster_name": "fake", "max_workers": 2, "idle_timeout_minutes": 5, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "auth": {"ssh_user": "ray"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "sdaa_node": {"resources": {"CPU": 1, "sdaa": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
    }
    (tmp_path / "autoscaler.yaml").write_text(json.dumps(config))
    temp_dir = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    f"--autoscaling-config={tmp_path / 'autoscaler.yaml'}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", f"--object-store-memory={150 * MB}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(temp_dir, port)


def test_preflight_counts_the_nodes_the_autoscaler_can_launch(autoscaling_head, digits, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": autoscaling_head}
    sdaa = [f"data.path={digits}", f"run.storage_path={tmp_path}", "scaling.accelerator=sdaa",
            "scaling.device_type=cpu", "scaling.cpus_per_worker=1"]
    pretrain = [sys.executable, "pipelines/pretrain.py", "--config", "configs/debug.yaml", *sdaa]
    # more workers than the autoscaler could ever give: refused at once, naming what it can launch
    three = subprocess.run([*pretrain, "scaling.num_workers=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert three.returncode == 2, three.stdout + three.stderr
    assert ("scaling: 3 workers x 1 sdaa need 3 sdaa; the cluster has 2 sdaa on 1 node(s) up and 2 its "
            "autoscaler can launch (sdaa_node: up to 2 x {'CPU': 1.0, 'sdaa': 1.0})") in three.stderr
    # what it can launch fits, though no such node is up yet
    probe = ("import ray; from cluster.accelerators import resolve; from cluster.preflight import check_cluster;"
             "ray.init(); assert [n['Resources'].get('sdaa', 0) for n in ray.nodes() if n['Alive']] == [0];"
             "check_cluster(resolve('sdaa', 'cpu'), 2, {'CPU': 1.0, 'sdaa': 1.0}, 0.0); print('fits')")
    fits = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert fits.returncode == 0 and fits.stdout.strip().endswith("fits"), fits.stderr[-3000:]
    # an elastic range is checked at its minimum (3 here: more than the autoscaler can give)
    elastic = subprocess.run([*pretrain, "scaling.num_workers=4", "scaling.min_workers=3", "train.batch_size=16",
                              "train.effective_batch=192"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert elastic.returncode == 2 and "scaling: 3 workers x 1 sdaa need 3 sdaa" in elastic.stderr, elastic.stderr
    # scaling.preflight=false: not checked, with a warning (the run then waits for the workers)
    unchecked = subprocess.Popen([*pretrain, "scaling.num_workers=3", "scaling.preflight=false"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        warning = next(line for line in unchecked.stdout if "scaling.preflight=false" in line)
    finally:
        unchecked.terminate()
        unchecked.wait(timeout=60)
    assert warning.startswith("warning: scaling.preflight=false: the cluster's resources are not checked")
