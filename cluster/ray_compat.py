"""Every use of Ray's private APIs, in one place.

Each name below stands in for a public API Ray does not have (yet); each comment names what
it does and which public API it stands in for. All of it was tested on the Ray versions in
`SUPPORTED_RAY`, which `pyproject.toml` pins. Importing this module on another Ray fails at
once with one line naming that range, so a Ray upgrade cannot silently change what the
stream or the workers do (an epoch that stopped reshuffling, say).
"""
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
# own (pipelines/stream.py: DecodeAhead). Public stand-in: none; `ExecutionOptions.resource_limits`
# and `concurrency` bound tasks but cannot keep one decode task queued per decoder.
from ray.data._internal.execution.backpressure_policy import (  # noqa: E402
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, BackpressurePolicy)
from ray.data._internal.execution.operators.map_operator import MapOperator  # noqa: E402

# Ray Data, tested on 2.60.0. The executor's control loop waits (in `ray.wait`) only while
# some task runs; with none running (DecodeAhead holding the decoders back, or every read
# task done while the consumer is behind) it spins, a CPU core per waiting dataset. The
# stream rests it (pipelines/stream.py: IdleWait). Public stand-in: the DataContext field
# `custom_execution_callback_classes` is public, its base class is not.
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: E402

# Ray Train, tested on 2.60.0 (Train V2). Public stand-in: `TorchConfig` without a hook that
# runs on every worker before `init_process_group`.
from ray.train.torch.config import _TorchBackend as TorchBackend  # noqa: E402

__all__ = ["BackpressurePolicy", "ExecutionCallback", "TorchBackend", "concurrency_cap", "executor_tasks_running",
           "is_map_operator", "output_bytes_held", "policy_config", "run_on_workers", "tasks_running",
           "use_backpressure_policies"]


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
    """Bytes of the operator's finished output not yet taken by its consumer, including
    what downstream (the iterator's prefetch) holds (`policy._resource_manager`)."""
    return policy._resource_manager.get_mem_op_outputs(op, include_ineligible_downstream=True)


def run_on_workers(worker_group, fn, *args) -> list:
    """`fn(*args)` on every worker of a Ray Train worker group, in rank order (the backend's
    `worker_group.execute`; public stand-in: none before the process group exists)."""
    return worker_group.execute(fn, *args)
