"""MLflow tracking of a run, from rank 0 (`run.mlflow_tracking_uri`; the `mlflow` extra).

One MLflow run per run directory: its id is kept in `<run dir>/mlflow.json`, so a
resubmitted or restarted run logs on into the same MLflow run. Logged: the resolved config
as params (it holds no credentials; the tracking server's own come from the nodes'
MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), per-step loss and lr, every numeric value
of each epoch's metrics as `epoch/<key>`, and the loss curve and reconstruction figures as
artifacts, all handed over by pipelines/output/metrics.py. Steps a restart trains again
are logged again at the same step numbers (the last value is the one that counts).

Tracking never stops training: a call that fails (the server down past MLflow's own few
retries) is logged as a warning and dropped.
"""
import json
import logging
import os
import tempfile
import time

from cluster.storage import Storage
from pipelines.common.errors import one_line
from pipelines.output.metrics import scalars

logger = logging.getLogger("mae.train")

RECORD = "mlflow.json"


def flatten(config: dict) -> dict[str, str]:
    """{"model.name": "...", ...} of the nested config dict."""
    return {f"{section}.{key}": str(value) for section, values in config.items() for key, value in values.items()}


class MlflowTracker:
    def __init__(self, storage: Storage, tracking_uri: str, experiment: str, run_name: str, config: dict):
        # a down server fails a call in seconds, not minutes (MLflow's defaults: 7 retries, 120 s)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.client, self.storage = MlflowClient(tracking_uri=tracking_uri), storage
        record = json.loads(storage.read(RECORD) or "null")
        if record and record.get("tracking_uri") == tracking_uri:
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logger.info("MLflow: logging on into run %s (%s)", self.run_id, tracking_uri)
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=run_name, tags={"mae.run_dir": storage.uri})
            self.run_id = run.info.run_id
            storage.write(RECORD, json.dumps({"tracking_uri": tracking_uri, "run_id": self.run_id,
                                              "experiment": experiment}))
            logger.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment, tracking_uri)
        self._params(flatten(config))

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # tracking is a view of the run, never a reason to stop it
            logger.warning("MLflow: could not log %s: %s", what, one_line(e)[:300])

    def _params(self, params: dict[str, str]) -> None:
        """Params not logged yet (a param's value cannot change in MLflow: a value changed on
        resubmission, such as a raised train.epochs, stays as first logged; config.yaml has it)."""
        from mlflow.entities import Param
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            self._call("params", self.client.log_batch, self.run_id, params=new[i:i + 100])

    def log_steps(self, records: list[dict]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(name, r[name], now, r["step"]) for r in records for name in ("loss", "lr")]
        for i in range(0, len(metrics), 1000):
            self._call("step metrics", self.client.log_batch, self.run_id, metrics=metrics[i:i + 1000])

    def log_epoch(self, epoch_metrics: dict, step: int) -> None:
        """Every numeric value of the epoch's metrics as `epoch/<key>`, and `epoch`, at `step`
        (the epoch's last optimizer step)."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(f"epoch/{k}", v, now, step) for k, v in scalars(epoch_metrics).items()]
        metrics.append(Metric("epoch", float(epoch_metrics["epoch"]), now, step))
        self._call("epoch metrics", self.client.log_batch, self.run_id, metrics=metrics)

    def log_figure(self, name: str, png: bytes, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.write(png)
            self._call(name, self.client.log_artifact, self.run_id, path, folder)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("the run's end", self.client.set_terminated, self.run_id, status)
