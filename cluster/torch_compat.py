"""Every use of PyTorch's private APIs, in one place (as cluster/ray_compat.py for Ray).

Each use names the public API it stands in for and the versions it was tested on. Where a
later torch lacks the name, the use is skipped with a warning rather than failing the run:
what it buys is a fallback, not correctness.
"""
import contextlib
import logging

import torch

logger = logging.getLogger(__name__)
TESTED_TORCH = "2.14.1"  # the versions the uses below were tested on (pyproject.toml allows >=2.2,<3)


@contextlib.contextmanager
def eager_fallback():
    """Within the block, a graph that torch.compile cannot compile runs eager with a warning
    instead of raising: a run on a device or model dynamo does not fully support trains on,
    slower, rather than dying at its first step. Stands in for a per-module
    `torch.compile(..., on_error="eager")` that torch does not have: `torch._dynamo.config`
    is private (tested on torch 2.14.1; present since 2.0). Scoped to the block (the train
    loop), not set for the whole process."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is None or not hasattr(config, "suppress_errors"):
        logger.warning("torch %s has no torch._dynamo.config.suppress_errors (tested on %s): a graph that fails "
                       "to compile stops the run; set train.compile=false to run eager", torch.__version__,
                       TESTED_TORCH)
        yield
        return
    with config.patch(suppress_errors=True):
        yield
