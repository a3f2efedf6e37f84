"""The driver's console: the run's own lines, not Ray's internals.

By default (`run.verbose=false`) the driver does not forward the output of Ray's worker
processes (`ray.init(log_to_driver=False)`): Ray's own chatter (core worker errors about
optional features, Ray Data's execution plans, Ray Train's per-report dumps) stays in Ray's
log files under the session's `logs/`. What concerns the user travels instead through the
Ray job's actor (cluster/actors.py): rank 0's progress and epoch lines, and the warnings and
errors of this project's code on any worker or decode task (a skipped image, a lost shard, a
retry), each tagged with where it happened; the driver prints them as they come.
`run.verbose=true` (or `--verbose`) forwards everything, as Ray does by default.
"""
import logging
import threading

import ray

from cluster.actors import job_actor

OUR_LOGGERS = ("mae", "pipelines", "cluster")  # "mae.train" and the modules' __name__ loggers


class ConsoleLines:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def console_lines():
    """This Ray job's console lines (a part of its actor: cluster/actors.py)."""
    return job_actor(ConsoleLines)


class ForwardToDriver(logging.Handler):
    """Sends this process's records of our loggers to the driver's console: INFO and above
    where `everything` (rank 0), WARNING and above elsewhere, tagged with `where`."""

    def __init__(self, where: str, everything: bool):
        super().__init__(logging.INFO if everything else logging.WARNING)
        self.where, self.actor, self.last = where, console_lines(), None
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
            tag = f" [{self.where}]" if self.where and record.levelno >= logging.WARNING else ""
            self.last = self.actor.write.remote(f"{prefix}{self.format(record)}{tag}")
        except Exception:  # the console is a view: never a reason to fail the work
            self.handleError(record)


_forwarding: dict[str, ForwardToDriver] = {}


def forward_to_driver(where: str, everything: bool = False) -> None:
    """Forward our loggers' records from this process to the driver's console (once per
    process and tag; a decode worker process runs many tasks)."""
    if where in _forwarding:
        return
    handler = _forwarding[where] = ForwardToDriver(where, everything)
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))


def flush_to_driver() -> None:
    """Wait until the lines this process forwarded have reached the job's actor (before a
    worker returns, so that its last lines are printed before the driver's summary)."""
    for handler in _forwarding.values():
        if handler.last is not None:
            try:
                ray.get(handler.last, timeout=10)
            except Exception:
                pass


class Follow:
    """The driver's side: prints the console lines as they come, from a daemon thread,
    until stopped (then prints what is left)."""

    def __init__(self, interval: float = 0.5):
        self.actor, self.interval = console_lines(), interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Follow":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _print(self) -> None:
        try:
            for line in ray.get(self.actor.take.remote(), timeout=30):
                print(line, flush=True)
        except Exception:
            pass

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self._print()
        self._print()
