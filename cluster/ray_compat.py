"""Every use of Ray's private APIs, in one place.

Each name below stands in for a public API Ray does not have (yet); each comment names what
it does and which public API it stands in for. All of it was tested on the Ray versions in
`SUPPORTED_RAY`, which `pyproject.toml` pins. Importing this module on another Ray fails at
once with one line naming that range, so a Ray upgrade cannot silently change what the
stream or the workers do (an epoch that stopped reshuffling, say).
"""
import os

import ray
from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_RAY = ">=2.60,<2.61"  # keep in step with pyproject.toml


class RayVersionError(ImportError):
    """The installed Ray is outside the versions this module was tested on."""


def check_ray_version(version: str) -> None:
    if Version(version) not in SpecifierSet(SUPPORTED_RAY):
        raise RayVersionError(f"Ray {version} is installed; this pipeline uses private Ray APIs tested only on "
                              f"ray{SUPPORTED_RAY} (cluster/ray_compat.py): install a version in that range")


check_ray_version(ray.__version__)

# Ray Data, tested on 2.60.0. The stream replaces Ray Data's backpressure policies with its
# own (pipelines/data/stream.py: DecodeAhead). Public stand-in: none; `ExecutionOptions.resource_limits`
# and `concurrency` bound tasks but cannot keep one decode task queued per decoder.
from ray.data._internal.execution.backpressure_policy import (  # noqa: E402
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, BackpressurePolicy)
from ray.data._internal.execution.operators.map_operator import MapOperator  # noqa: E402

# Ray Data, tested on 2.60.0. The executor's control loop waits (in `ray.wait`) only while
# some task runs; with none running (DecodeAhead holding the decoders back, or every read
# task done while the consumer is behind) it spins, a CPU core per waiting dataset. The
# stream rests it (pipelines/data/stream.py: IdleWait). Public stand-in: the DataContext field
# `custom_execution_callback_classes` is public, its base class is not.
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: E402


def __getattr__(name: str):
    """`TorchBackend`, imported on first use: Ray Data's decode tasks import this module, and
    loading Ray Train there cost each decoder process a second of start-up."""
    if name == "TorchBackend":
        # Ray Train, tested on 2.60.0 (Train V2). Public stand-in: `TorchConfig` without a hook
        # that runs on every worker before `init_process_group`.
        from ray.train.torch.config import _TorchBackend
        return _TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BackpressurePolicy", "ExecutionCallback", "TorchBackend",  # noqa: F822 (TorchBackend: __getattr__)
           "concurrency_cap", "executor_tasks_running",
           "hide_raylet_notices", "is_map_operator", "launchable_node_types", "output_bytes_held", "policy_config",
           "run_on_workers", "tasks_running", "use_backpressure_policies"]


def use_backpressure_policies(context: ray.data.DataContext, policies: list[type]) -> None:
    """Run `policies` instead of Ray Data's own (the private config key that lists them)."""
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, policies)


def executor_tasks_running(executor) -> int:
    """Tasks running in all operators of a streaming executor (`executor._topology`)."""
    return sum(tasks_running(op) for op in executor._topology)


def is_map_operator(op) -> bool:
    """Whether a physical operator is a map (read + map_batches fused) operator."""
    return isinstance(op, MapOperator)


def tasks_running(op) -> int:
    """Tasks of the operator submitted and not finished (`op.metrics`, private; the public
    stand-in is the dashboard's per-operator metrics)."""
    return op.metrics.num_tasks_running


def concurrency_cap(op) -> int | None:
    """The `concurrency=` the operator was created with (None: unbounded)."""
    return op.get_max_concurrency_limit()


def policy_config(policy: BackpressurePolicy, key: str, default=None):
    """A value of the DataContext the policy runs under (`policy._data_context`)."""
    return policy._data_context.get_config(key, default)


def output_bytes_held(policy: BackpressurePolicy, op) -> int:
    """Bytes of the operator's finished output not yet taken by its consumer, including what
    downstream (the iterator's prefetch) holds, and all that a map operator after it (the
    re-cutting one of an elastic run's stream) holds: queued, in its tasks and in its output
    (`policy._resource_manager`, `policy._topology`)."""
    manager, after = policy._resource_manager, False
    held = manager.get_mem_op_outputs(op, include_ineligible_downstream=True)
    for other in policy._topology:
        if after and is_map_operator(other):
            held += manager.get_mem_op_internal(other) + manager.get_mem_op_outputs(other,
                                                                                  include_ineligible_downstream=True)
        after = after or other is op
    return held


def run_on_workers(worker_group, fn, *args) -> list:
    """`fn(*args)` on every worker of a Ray Train worker group, in rank order (the backend's
    `worker_group.execute`; public stand-in: none before the process group exists)."""
    return worker_group.execute(fn, *args)


def refresh_autoscaling_view() -> None:
    """Make the cluster's autoscaling coordinator read the cluster's nodes now (tests: a node
    just added or lost, for Ray Train's elastic resize check or restart to see).

    Ray Train and Ray Data, tested on 2.60.0. Ray Train's elastic policy counts the workers
    that fit on the nodes the coordinator actor (named `AutoscalingCoordinator`) last read,
    and it reads them every 20 s (`TICK_INTERVAL_S`): a node that joins is seen up to 20 s
    late. Public stand-in: none; its `get_reserved_resources(recompute=True)` runs that read."""
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("mae-refresh", recompute=True))


def launchable_node_types() -> list[dict] | None:
    """The worker node types the cluster's autoscaler can launch, each {"name", "resources",
    "max_count"} (max_count -1: no limit); None when no autoscaler is found.

    Ray core, tested on 2.60.0. Public stand-in: none (`ray.autoscaler.v2.sdk.get_cluster_status`
    lists nodes up or pending, not the types that could be launched). Two sources, in order:
    the node groups reported to the GCS (`ray._private.state.state.get_cluster_config()`,
    which KubeRay and the v2 autoscaler fill), else the `--autoscaling-config` file of the v1
    autoscaler's monitor process on this machine, which is the head node when the run was
    submitted with `ray job submit` (its entrypoint runs there)."""
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [{"name": g.name, "resources": {k: float(v) for k, v in g.resources.items()},
                 "max_count": g.max_count} for g in config.node_group_configs]
    path = _monitor_autoscaling_config(ray.get_runtime_context().gcs_address)
    if path is None:
        return None
    import yaml
    with open(os.path.expanduser(path)) as f:
        cfg = yaml.safe_load(f)
    head = cfg.get("head_node_type")
    return [{"name": name, "resources": {k: float(v) for k, v in (t.get("resources") or {}).items()},
             "max_count": t.get("max_workers", cfg.get("max_workers", 0))}
            for name, t in (cfg.get("available_node_types") or {}).items() if name != head]


def _monitor_autoscaling_config(gcs_address: str) -> str | None:
    """The `--autoscaling-config` of the v1 autoscaler monitor of the cluster at `gcs_address`
    running on this machine (Ray starts it as `.../autoscaler/_private/monitor.py`)."""
    port = gcs_address.rsplit(":", 1)[-1]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in argv):
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in argv):
            continue
        return next((a.split("=", 1)[1] for a in argv if a.startswith("--autoscaling-config=")), None)
    return None


def hide_raylet_notices(hidden) -> None:
    """Keep the messages raylets broadcast to every driver for which `hidden(text)` is true
    off this driver's console (they stay in the raylets' logs).

    Ray core, tested on 2.60.0: the driver's `ray_listen_error_messages` thread prints them
    through `ray._private.worker.print_to_stdstream` whatever `ray.init(log_to_driver=...)`
    says. Public stand-in: none (`log_to_driver=False` silences the workers' output only)."""
    import ray._private.worker as worker
    show = worker.print_to_stdstream

    def filtered(data, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and all(hidden(line) for line in data.get("lines", [])):
            return
        show(data, ignore_prefix)

    worker.print_to_stdstream = filtered
