"""One named actor per Ray job, shared by the driver, the training workers and the data
tasks (the console's lines, the stream's count of skipped images)."""
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

_handles: dict = {}


def job_actor(actor_class, prefix: str):
    """This Ray job's one actor of `actor_class`, named `<prefix>-<job id>`, created by the
    first caller (the driver) on the caller's node: with the driver, whose loss ends the job
    anyway. Elsewhere, the loss of a node (a preempted decoder or training node) would take
    the actor with it, and every restart of the worker group would meet the dead handle the
    stream holds. The handle is kept for the life of this process: a named actor whose
    handles are all dropped dies, and a later `get_if_exists` could return it dying (a call on
    it then fails with ActorDiedError).

    If its process dies (killed, out of memory) Ray restarts it, empty, and retries the calls
    that were in flight: what it held is lost, the job goes on; each actor class says what a
    restart costs it."""
    name = f"{prefix}-{ray.get_runtime_context().get_job_id()}"
    if name not in _handles:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _handles[name] = actor_class.options(name=name, get_if_exists=True, scheduling_strategy=here,
                                             max_restarts=-1, max_task_retries=-1).remote()
    return _handles[name]


@ray.remote(num_cpus=0)
class RunFence:
    """Why this job must stop writing its run directory (its driver lost the lease), or None.
    The driver sets it; rank 0 reads it before each write of the run's files and checkpoints.
    A restart of its process empties it: the driver's abort of the run still stops the job."""

    def __init__(self):
        self.why: str | None = None

    def set(self, why: str) -> None:
        self.why = why

    def get(self) -> str | None:
        return self.why


def run_fence():
    """This job's `RunFence` (the driver's call creates it on the driver's node)."""
    return job_actor(RunFence, "mae-fence")
