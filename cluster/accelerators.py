"""Where a training worker computes: one row per accelerator kind."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    device_type: str
    """torch device type of a worker's device."""
    backend: str
    """torch.distributed backend."""
    resource: str | None
    """Ray resource each worker requests one unit of (None: CPUs only)."""
    amp_dtypes: tuple[str, ...]
    """`train.precision` values this device supports."""
    compiles: bool
    """Whether torch.compile (inductor) supports the device; `train.compile` is ignored,
    with a warning, where it does not."""


ACCELERATORS: dict[str, Accelerator] = {
    "cpu": Accelerator("cpu", "gloo", None, ("fp32", "bf16"), compiles=True),
    "cuda": Accelerator("cuda", "nccl", "GPU", ("fp32", "bf16", "fp16"), compiles=True),
}
