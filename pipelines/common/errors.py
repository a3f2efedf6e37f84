"""Errors that end a run at once (a restart from the last checkpoint would meet them again),
and how any error is written into one log or console line."""


class FatalError(RuntimeError):
    """What a restart from the last checkpoint would meet again: the run ends at once, with
    this message, however many restarts `run.max_failures` allows. Raised in a train worker,
    or in a Ray Data task of its stream (Ray re-raises it in the worker as a subclass)."""


def one_line(e: object) -> str:
    """`e`'s message (an exception, or a reason given as text) on one line: a storage client's
    or Ray's message spans lines, which would break a log line and the one-line errors a run
    ends with."""
    return " ".join(str(e).split())
