"""Each epoch's count of images the stream skipped (undecodable, unreadable, lost with a
damaged shard), exact whatever batch they would have fallen in, with the images it decoded
and the seconds its decode tasks spent on them (for the decode rate per CPU in each epoch's
line); and, so that read tasks know which epoch they count for, each lane's plan.

Rows cannot carry the count: the last partial batch of an epoch is dropped, an equal split
drops rows, and a lost shard yields no rows at all. So each read task adds its count, under
its epoch, to one ledger actor per Ray job before it hands over its last block, and rank 0
takes an epoch's count when that epoch's iterator is exhausted: by then every read task of
that execution has finished. Two epochs' executions overlap (pipelines/stream.py,
`EpochStreams`), so counts are kept per epoch.

A read task learns its epoch from the plan of its lane: before a consumer starts iterating
a lane for epoch e, the one process that plans (rank 0) writes (e, first micro-batch) under
the lane's key; the execution starts only once every consumer has asked for it
(streaming_split waits for all splits), so the datasource reads the plan after it was
written. Each plan gets a new generation: what the read tasks of an earlier attempt of the
same epoch (a restarted worker group) still add is not counted.
"""
import ray

from pipelines.console import job_actor

ZERO = {"skipped": 0, "decoded": 0, "decode_seconds": 0.0}


@ray.remote(num_cpus=0)
class SkipCounter:
    def __init__(self):
        self.plans: dict[str, tuple[int, int, int]] = {}  # lane -> (epoch, first micro-batch, generation)
        self.generation_of: dict[tuple[str, int], int] = {}  # (stream, epoch) -> its last plan's generation
        self.counts: dict[int | None, dict] = {None: dict(ZERO)}  # generation (None: unplanned) -> counts
        self.generations = 0

    def plan(self, stream: str, lane: int, epoch: int, first_iteration: int = 0) -> None:
        """The next execution of `stream`'s lane `lane` reads epoch `epoch` from micro-batch
        `first_iteration`; its counts start from 0."""
        self.generations += 1
        self.counts.pop(self.generation_of.get((stream, epoch)), None)
        self.plans[f"{stream}/{lane}"] = (epoch, first_iteration, self.generations)
        self.generation_of[(stream, epoch)] = self.generations
        self.counts[self.generations] = dict(ZERO)

    def planned(self, stream: str, lane: int) -> tuple[int, int, int] | None:
        """(epoch, first micro-batch, generation) of the lane's execution; None if never planned."""
        return self.plans.get(f"{stream}/{lane}")

    def add(self, skipped: int, decoded: int = 0, seconds: float = 0.0, generation: int | None = None) -> None:
        counts = self.counts.get(generation)
        if counts is None:
            return  # an earlier attempt's read task, or an epoch already taken
        counts["skipped"] += skipped
        counts["decoded"] += decoded
        counts["decode_seconds"] += seconds

    def peek(self, stream: str | None = None, epoch: int | None = None) -> dict:
        """What the read tasks of `stream`'s epoch `epoch` (None: of unplanned executions) have added so far."""
        generation = self.generation_of.get((stream, epoch)) if stream is not None else None
        return dict(self.counts.get(generation, ZERO))

    def take(self, stream: str | None = None, epoch: int | None = None) -> dict:
        """`peek`, after which the epoch is closed (its late adds are dropped); for unplanned
        executions, the counts restart from 0."""
        counts = self.peek(stream, epoch)
        if stream is None:
            self.counts[None] = dict(ZERO)
        else:
            self.counts.pop(self.generation_of.pop((stream, epoch), None), None)
        return counts


def skip_counter():
    """This Ray job's ledger (created by the first caller: the driver, in `image_stream`)."""
    return job_actor(SkipCounter, "mae-skipped-images")
