"""Checkpoint (de)serialisation. Loading never executes code from the file."""
import argparse
import os
import tempfile
from pathlib import Path

import torch

# Official MAE checkpoints store `args` as an argparse.Namespace; nothing else is allowed
# beyond what `weights_only=True` already accepts (tensors, containers, primitives).
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def model_state(ckpt: dict) -> dict:
    """The model state dict inside a checkpoint of ours or of the official release."""
    return ckpt["model"] if "model" in ckpt else ckpt
