"""Each epoch's count of images the stream skipped (undecodable, unreadable, lost with a
damaged shard), exact whatever batch they would have fallen in, with the images it decoded
and the seconds its decode tasks spent on them (for the decode rate per CPU in each epoch's
line); and, so that read tasks know which epoch they count for, each lane's plan.

A tar read in byte ranges (pipelines/data/stream.py) that holds fewer samples than it was
counted with is short by the difference, which no single read task can know: each range
reports how many samples it gave, the datasource names the tars and their counts, and the
ledger adds what a tar lacks to the epoch's skips (with a warning naming it).

Rows cannot carry the count: the last partial batch of an epoch is dropped, an equal split
drops rows, and a lost shard yields no rows at all. So each read task sends its count, under
its epoch's plan and its own index, to the Ray job's ledger (cluster/actors.py) as it ends, without
waiting for it (a read task blocked on `ray.get` frees its CPU: Ray then starts another
worker process for a queued task and, once it idles, kills one; that churn stalled the
stream for seconds). Rank 0 takes an epoch's count when the epoch's iterator is exhausted,
once every read task of the epoch has reported (`epoch_counts`): the datasource tells the
ledger how many it made. Two epochs' executions overlap (pipelines/data/lanes.py), so counts are
kept per epoch; a retried read task replaces its count.

A read task learns its epoch from the plan of its lane: before a consumer starts iterating
a lane for epoch e, the one process that plans (rank 0) writes (e, first micro-batch) under
the lane's key; the execution starts only once every consumer has asked for it
(streaming_split waits for all splits), so the datasource reads the plan after it was
written. Each plan gets a new generation: what the read tasks of an earlier attempt of the
same epoch (a restarted worker group) still send is not counted.

If the job actor's process dies, Ray restarts it empty (cluster/actors.py): the counts of the
epochs open at that moment are lost, and `epoch_counts` says so in one warning and reports
them as 0; the next plans are counted as before. Generations start at a random offset in
each incarnation, so a late report to an earlier incarnation's generation is never counted.
"""
import logging
import random
import time

import ray

from cluster.actors import job_actor

logger = logging.getLogger(__name__)
COUNTS = ("skipped", "decoded", "decode_seconds")


class SkipCounter:
    def __init__(self):
        self.plans: dict[str, tuple] = {}  # lane -> (epoch, first micro-batch, generation, trained runs)
        self.generation_of: dict[tuple[str, int], int] = {}  # (stream, epoch) -> its last plan's generation
        self.tasks: dict[int, dict[int, tuple]] = {}  # generation -> read task index -> its counts
        self.expected: dict[int, int] = {}  # generation -> read tasks of the execution
        self.ranged: dict[int, dict[str, int]] = {}  # generation -> {tar: count} of tars read in byte ranges
        self.generations = random.getrandbits(40) << 20  # this incarnation's own (see the module's docstring)

    def plan(self, stream: str, lane: int, epoch: int, first_iteration: int = 0, trained: list | None = None) -> None:
        """The next execution of `stream`'s lane `lane` reads epoch `epoch` from micro-batch
        `first_iteration` (`trained`: the runs of positions already trained, which it reads
        without decoding: pipelines/data/lanes.py); its counts start from 0."""
        self.generations += 1
        old = self.generation_of.get((stream, epoch))
        self.tasks.pop(old, None)
        self.expected.pop(old, None)
        self.ranged.pop(old, None)
        self.plans[f"{stream}/{lane}"] = (epoch, first_iteration, self.generations, trained)
        self.generation_of[(stream, epoch)] = self.generations
        self.tasks[self.generations] = {}

    def planned(self, stream: str, lane: int) -> tuple | None:
        """(epoch, first micro-batch, generation, trained runs) of the lane's execution; None
        if never planned."""
        return self.plans.get(f"{stream}/{lane}")

    def expect(self, generation: int, tasks: int, ranged: dict[str, int] | None = None) -> None:
        """The execution planned as `generation` has `tasks` read tasks; `ranged`: the tars it
        reads in byte ranges, with the samples each was counted with (a tar that holds fewer
        is short by the difference: no single read task knows it)."""
        if generation in self.tasks:
            self.expected[generation] = tasks
            self.ranged[generation] = ranged or {}

    def add(self, skipped: int, decoded: int, seconds: float, generation: int, task: int,
            read: tuple[str, int] | None = None) -> None:
        """Read task `task` of the execution planned as `generation` ended (executions nobody
        planned, such as an evaluation's, do not report); `read`: (tar, samples it gave) for a
        byte range of a tar."""
        if generation in self.tasks:  # else an earlier attempt's read task, or an epoch already taken
            self.tasks[generation][task] = (skipped, decoded, seconds, read)

    def peek(self, stream: str, epoch: int) -> dict:
        """What the read tasks of `stream`'s epoch `epoch` have reported so far, with
        `complete`: whether all of them have, and `lost`: whether this ledger never saw the
        epoch's plan (it was restarted since)."""
        generation = self.generation_of.get((stream, epoch))
        reported = self.tasks.get(generation, {})
        sums = [sum(column) for column in zip(*(r[:3] for r in reported.values()))] or [0, 0, 0.0]
        complete = len(reported) == self.expected.get(generation, -1)
        short = {}
        if complete:  # a tar read in ranges that gave fewer samples than its count: the rest is lost
            given = {}
            for *_, read in reported.values():
                if read is not None:
                    given[read[0]] = given.get(read[0], 0) + read[1]
            short = {tar: count - given.get(tar, 0) for tar, count in self.ranged.get(generation, {}).items()
                     if given.get(tar, 0) < count}
            sums[0] += sum(short.values())  # and, as a whole tar's reader counts its lost samples, in `decoded`
            sums[1] += sum(short.values())
        return {**dict(zip(COUNTS, sums)), "complete": complete, "lost": generation is None, "short": short}

    def take(self, stream: str, epoch: int, force: bool = False) -> dict | None:
        """`peek`, after which the epoch is closed (late reports are dropped); None, leaving it
        open, while some of its read tasks have not reported, unless `force` (or the epoch is
        `lost`: nothing more will come)."""
        counts = self.peek(stream, epoch)
        if not (counts["complete"] or counts["lost"] or force):
            return None
        generation = self.generation_of.pop((stream, epoch), None)
        self.tasks.pop(generation, None)
        self.expected.pop(generation, None)
        self.ranged.pop(generation, None)
        return counts


def epoch_counts(counter, stream: str, epoch: int, timeout: float = 60.0) -> dict:
    """Epoch `epoch`'s counts, once every read task of it has reported (its iterator is
    exhausted, so each has ended and sent its report: it arrives within moments); after
    `timeout` seconds, what has arrived, with a warning."""
    deadline = time.monotonic() + timeout
    while (counts := ray.get(counter.take.remote(stream, epoch))) is None:
        if time.monotonic() > deadline:
            counts = ray.get(counter.take.remote(stream, epoch, force=True))
            logger.warning("epoch %d: some read tasks did not report within %.0f s; skipped_images and "
                           "decoded_images count only those that did", epoch, timeout)
            break
        time.sleep(0.01)
    for tar, missing in counts.get("short", {}).items():
        logger.warning("epoch %d: %s gave %d samples fewer than it was counted with (damaged or cut short): "
                       "counted as skipped", epoch, tar, missing)
    if counts["lost"]:
        logger.warning("epoch %d: the skip ledger was restarted during the epoch (its process died); this epoch's "
                       "skipped_images and decoded_images are lost and reported as 0", epoch)
    return counts


def skip_counter():
    """This Ray job's ledger (created by the first caller: the driver, in `image_stream`)."""
    return job_actor(SkipCounter)
