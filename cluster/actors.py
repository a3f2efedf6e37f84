"""One actor per Ray job, shared by the driver, the training workers and the data tasks. It
hosts the job's parts, each a plain object made on its first call: the run fence (below),
the console's lines (pipelines/output/console.py) and the stream's ledger of skipped images
(pipelines/data/skips.py). One process for all three: an actor is a Python process of its
own that imports Ray (over a second of CPU at each job's start), and each part's calls are
few and small."""
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

_handles: dict = {}


@ray.remote(num_cpus=0)
class JobActor:
    """The parts of this job, by class; calls run one at a time."""

    def __init__(self):
        self.parts: dict[type, object] = {}

    def call(self, part_class: type, method: str, *args, **kwargs):
        part = self.parts.get(part_class)
        if part is None:
            part = self.parts[part_class] = part_class()
        return getattr(part, method)(*args, **kwargs)


class Part:
    """One part of the job's actor, called as an actor of its own: `part.method.remote(*args)`
    returns the call's ObjectRef. `actor` is the job actor's handle."""

    def __init__(self, actor, part_class: type):
        self.actor, self.part_class = actor, part_class

    def __getattr__(self, method: str) -> "_Method":
        if method.startswith("_"):  # pickle's and copy's lookups (made before __init__ has run)
            raise AttributeError(method)
        return _Method(self.actor, self.part_class, method)


class _Method:
    def __init__(self, actor, part_class: type, method: str):
        self.actor, self.part_class, self.method = actor, part_class, method

    def remote(self, *args, **kwargs):
        return self.actor.call.remote(self.part_class, self.method, *args, **kwargs)


def job_actor(part_class: type) -> Part:
    """`part_class`'s part of this Ray job's actor, named `mae-job-<job id>`, created by the
    first caller (the driver) on the caller's node: with the driver, whose loss ends the job
    anyway. Elsewhere, the loss of a node (a preempted decoder or training node) would take
    the actor with it, and every restart of the worker group would meet the dead handle the
    stream holds. The handle is kept for the life of this process: a named actor whose
    handles are all dropped dies, and a later `get_if_exists` could return it dying (a call on
    it then fails with ActorDiedError).

    If its process dies (killed, out of memory) Ray restarts it, empty, and retries the calls
    that were in flight: what its parts held is lost, the job goes on; each part's class says
    what a restart costs it."""
    name = f"mae-job-{ray.get_runtime_context().get_job_id()}"
    if name not in _handles:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _handles[name] = JobActor.options(name=name, get_if_exists=True, scheduling_strategy=here,
                                          max_restarts=-1, max_task_retries=-1).remote()
    return Part(_handles[name], part_class)


class RunFence:
    """Why this job must stop writing its run directory (its driver lost the lease), or None.
    The driver sets it; rank 0 reads it before each write of the run's files and checkpoints.
    A restart of the job actor empties it: the driver's abort of the run still stops the job."""

    def __init__(self):
        self.why: str | None = None

    def set(self, why: str) -> None:
        self.why = why

    def get(self) -> str | None:
        return self.why


def run_fence() -> Part:
    """This job's `RunFence` (the driver's call creates the job actor on the driver's node)."""
    return job_actor(RunFence)
