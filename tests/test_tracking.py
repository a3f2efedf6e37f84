"""MLflow tracking against a real MLflow server (SQLite backend, served artifacts) started
here on 127.0.0.1: params, per-step and per-epoch metrics, figures, and the same MLflow run
when the run is submitted again."""
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import _free_port, run_pretrain

mlflow = pytest.importorskip("mlflow")  # the `mlflow` extra; installed with `test`
STEPS_PER_EPOCH = (1438 // 2) // 32  # debug.yaml on the demo digits


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
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


@pytest.mark.slow
def test_a_run_and_its_resubmission_log_into_one_mlflow_run(ray_cluster, digits, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    args = (f"data.path={digits}", f"run.storage_path={tmp_path}", "run.name=tracked", "optim.warmup_epochs=0.5",
            f"run.mlflow_tracking_uri={mlflow_server}", "run.mlflow_experiment=mae-tests")
    first = run_pretrain(*args, "train.epochs=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_id = json.loads((tmp_path / "tracked" / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model.name"] == "mae_vit_tiny_patch4" and run.data.params["train.epochs"] == "1"
    assert run.data.tags["mae.run_dir"] == str(tmp_path / "tracked")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, STEPS_PER_EPOCH + 1))
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in
                                                                   client.list_artifacts(run_id, "reconstructions")}
    assert {"loss_curve.png", "reconstructions/epoch_0000.png"} <= artifacts

    second = run_pretrain(*args, "train.epochs=2")  # resumes the run, and its MLflow run
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert json.loads((tmp_path / "tracked" / "mlflow.json").read_text())["run_id"] == run_id
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [0.0, 1.0]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    steps = [json.loads(line) for line in (tmp_path / "tracked" / "steps.jsonl").read_text().splitlines()]
    assert all(losses[s["step"]] == pytest.approx(s["loss"]) for s in steps)  # the same figures as steps.jsonl
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_credentials_in_the_tracking_uri_are_refused(tmp_path):
    from pipelines.common.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="run.mlflow_tracking_uri: '<redacted>' is not allowed; no credentials"):
        load_config("configs/debug.yaml", [f"data.path={tmp_path}", "run.mlflow_tracking_uri=http://u:pw@h:5000"])
