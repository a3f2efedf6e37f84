"""Epochs read from two lanes in turn, so that no decoder waits on an epoch boundary.

A lane is one Ray dataset of the training stream (pipelines/data/stream.py: `training_stream`
makes two over one datasource). Epoch e is one execution of lane e % 2; once its first batch
is out, epoch e+1's execution starts on the other lane. This module is the consumer's side
(the train loop, the ingest benchmark): it needs nothing of the data modules.
"""
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray

NAMES = ("train_even_epochs", "train_odd_epochs")  # the lanes' dataset names in Ray Train


def __getattr__(name: str):
    """`DTYPES`, the torch dtypes of the batches' columns, made on first use: the stream's
    planning processes import this module and need no torch."""
    if name == "DTYPES":
        import torch
        return {"image": torch.uint8, "label": torch.int64, "skipped": torch.int8, "position": torch.int64}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Lanes:
    """Datasets over one datasource, read in turn epoch after epoch (epoch e on lane e % 2);
    `key`: the name their plans go under in the job's ledger (pipelines/data/skips.py)."""
    datasets: tuple
    key: str


class EpochStreams:
    """Epoch after epoch of a training stream with no gap between them: epoch e is read from
    lane e % 2, and once its first batch is out, epoch e+1 starts on the other lane (the
    lane's execution begins: its read tasks decode up to its budget ahead), so the first
    blocks of e+1 are decoded while the last of e are trained on. Each epoch stays one
    execution of its lane: its own order and crops, its own skip count, its end where the
    lane's iterator ends.

    `lanes`: the two datasets of `training_stream`, or a train worker's shards of them
    (anything with `iter_torch_batches`, whose keyword arguments `batches` holds). `plans`:
    whether this process writes each epoch's plan for the lanes' read tasks (exactly one
    process per job: rank 0); see pipelines/data/skips.py."""

    def __init__(self, lanes, key: str, ledger, plans: bool, **batches):
        self.lanes, self.key, self.ledger, self.plans, self.batches = lanes, key, ledger, plans, batches
        self.ahead: _Started | None = None

    def epoch(self, epoch: int, first_iteration: int = 0, following: int | None = None,
              trained: list | None = None) -> Iterator[dict]:
        """Epoch `epoch`'s batches; once the first is out, epoch `following` starts ahead. A
        resumed epoch (from micro-batch `first_iteration`): with `trained`, the runs of
        positions already trained, it is the same order, whose
        trained images are read but not decoded (their rows are blank; the train loop drops
        them); without, the rest of the epoch is drawn anew."""
        started, self.ahead = self.ahead, None
        if started is None:
            started = self._start(epoch, first_iteration, trained)
        elif started.epoch != epoch:
            raise RuntimeError(f"epoch {started.epoch} was started ahead, not epoch {epoch}")
        first = started.first()
        if following is not None:
            self.ahead = self._start(following, 0)
        if first is not None:
            yield first
            yield from started.rest

    def close(self) -> None:
        """Stop the epoch started ahead, if any (its lane's execution ends)."""
        started, self.ahead = self.ahead, None
        if started is not None:
            started.thread.join()
            if started.rest is not None:
                started.rest.close()

    def _start(self, epoch: int, first_iteration: int, trained: list | None = None) -> "_Started":
        lane, started = epoch % 2, _Started(epoch)

        def begin():
            try:
                if self.plans:
                    ray.get(self.ledger.plan.remote(self.key, lane, epoch, first_iteration, trained))
                started.rest = iter(self.lanes[lane].iter_torch_batches(**self.batches))
                started.head = next(started.rest, None)  # waits at the split's barrier, then for the first batch
            except BaseException as e:  # raised where the epoch is read
                started.error = e

        started.thread = threading.Thread(target=begin, name=f"epoch-{epoch}-start", daemon=True)
        started.thread.start()
        return started


@dataclass
class _Started:
    """An epoch whose lane was asked for its first batch by a thread of its own."""
    epoch: int
    thread: threading.Thread | None = None
    rest: Iterator | None = None
    head: dict | None = None
    error: BaseException | None = None

    def first(self) -> dict | None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.head


# Positions: each row of an epoch carries `position`, the place of its image in that epoch's
# order (pipelines/data/stream.py). A set of positions travels as runs, [start, end) pairs,
# sorted and merged: the images trained so far in an epoch are a few runs whatever its size.

def runs_of(positions) -> list[list[int]]:
    """The runs of a collection of positions (ints, any order, repeats allowed)."""
    p = np.unique(np.asarray(positions, dtype=np.int64))
    if not len(p):
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts, ends = p[np.r_[0, breaks]], p[np.r_[breaks - 1, len(p) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def merge_runs(*many) -> list[list[int]]:
    """The union of lists of runs, as runs."""
    out = []
    for a, b in sorted((int(a), int(b)) for runs in many for a, b in runs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def within(positions, runs) -> np.ndarray:
    """Whether each of `positions` lies in one of `runs` (a bool array)."""
    positions = np.asarray(positions, dtype=np.int64)
    if not runs:
        return np.zeros(positions.shape, dtype=bool)
    starts, ends = np.array([a for a, _ in runs]), np.array([b for _, b in runs])
    k = np.searchsorted(starts, positions, side="right") - 1
    return (k >= 0) & (positions < ends[np.maximum(k, 0)])
