"""Fail fast instead of waiting forever: compare what a run asks for with what the cluster
has, before the trainer starts. Each problem is one line naming the resource and numbers."""
import importlib

import ray

from cluster.accelerators import Accelerator
from cluster.ray_compat import launchable_node_types


class PreflightError(RuntimeError):
    """The run can never start on this cluster; the message says why."""


def fit_errors(num_workers: int, per_worker: dict[str, float], data_cpus: float,
               nodes: list[dict[str, float]], where: str | None = None) -> list[str]:
    """What keeps `num_workers` bundles of `per_worker` (each on one node) plus `data_cpus`
    spare CPUs from ever fitting on `nodes` (each node's total resources); `where`: how the
    messages describe those nodes."""
    where = where or f"on {len(nodes)} node(s)"
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + amount
    errors = []
    for name, amount in per_worker.items():
        spare = data_cpus if name == "CPU" else 0.0
        need = amount * num_workers + spare
        if need > totals.get(name, 0.0) + 1e-9:
            extra = f" + {spare:g} CPU for decoding (data.min_cpus)" if spare else ""
            errors.append(f"scaling: {num_workers} workers x {amount:g} {name}{extra} need {need:g} {name}; "
                          f"the cluster has {totals.get(name, 0.0):g} {name} {where}")
    if errors:
        return errors
    needed = {k: v for k, v in per_worker.items() if v > 0}
    fit = sum(min(int(node.get(k, 0.0) / v + 1e-9) for k, v in needed.items()) for node in nodes) if needed \
        else num_workers
    if fit < num_workers:
        errors.append(f"scaling: each worker needs {needed} on one node; only {fit} such bundles fit on the "
                      f"cluster's nodes {where} ({[{k: n.get(k, 0.0) for k in needed} for n in nodes]}), "
                      f"{num_workers} requested")
    return errors


def alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def cluster_nodes(num_workers: int) -> tuple[list[dict[str, float]], str]:
    """The nodes a run can ever have, and how to name them: those alive, plus, when the
    cluster has an autoscaler, as many of each node type as it may launch (counted as if
    none were up yet: an over-count never refuses a run that could start)."""
    alive = alive_nodes()
    types = launchable_node_types()
    if not types:
        return alive, f"on {len(alive)} node(s)"
    launchable = []
    for t in types:
        launchable += [t["resources"]] * (t["max_count"] if t["max_count"] >= 0 else num_workers)
    kinds = ", ".join(f"{t['name']}: up to {t['max_count']} x {t['resources']}" for t in types)
    return alive + launchable, f"on {len(alive)} node(s) up and {len(launchable)} its autoscaler can launch ({kinds})"


def _import(module: str) -> str:
    importlib.import_module(module)
    return module


def check_cluster(row: Accelerator, num_workers: int, per_worker: dict[str, float], data_cpus: float) -> None:
    """Raise PreflightError with one line per problem (call after ray.init)."""
    errors = fit_errors(num_workers, per_worker, data_cpus, *cluster_nodes(num_workers))
    if errors:
        raise PreflightError("\n".join(errors))
    if row.plugin and any(node.get(row.resource) for node in alive_nodes()):  # else its nodes are not up yet
        probe = ray.remote(num_cpus=0, resources={row.resource: 0.001}, max_retries=0)(_import)
        try:
            ray.get(probe.remote(row.plugin), timeout=120)
        except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as e:
            raise PreflightError(f"scaling.accelerator={row.name}: its torch plugin {row.plugin!r} does not import "
                                 f"on a node with {row.resource} ({type(e.cause if hasattr(e, 'cause') else e).__name__}: "
                                 f"{str(e).strip().splitlines()[-1]})") from None
