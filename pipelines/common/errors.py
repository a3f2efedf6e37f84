"""Errors that end a run at once: a restart from the last checkpoint would meet them again."""


class FatalError(RuntimeError):
    """What a restart from the last checkpoint would meet again: the run ends at once, with
    this message, however many restarts `run.max_failures` allows. Raised in a train worker,
    or in a Ray Data task of its stream (Ray re-raises it in the worker as a subclass)."""
