"""Who a training worker is, and what the driver hands every one of them: one typed value (Ray Train's
`train_loop_config` carries it under `JOB`), never a dict read key by key."""
from dataclasses import dataclass, field

import torch

from cluster.storage import Storage
from pipelines.common.config import Config

JOB = "job"  # its key in train_loop_config
VAL = "val"  # the validation stream's dataset name in Ray Train (fine-tuning, linear probing)
FIGURE_IMAGES = 8  # held-out images in each epoch's reconstructions (pretraining)


@dataclass(frozen=True)
class WorkerJob:
    cfg: Config  # the resolved config (it holds no credentials: config.CREDENTIAL_KEYS are never values)
    num_images: int  # training images per epoch, as listed by the driver
    storage: Storage  # the run directory
    stream: str  # the lanes' key in the skip ledger (pipelines/data/lanes.py)
    held_out: list[bytes] = field(default_factory=list)  # encoded candidates for the reconstructions' images
    num_classes: int | None = None  # the classifier's classes (fine-tuning, linear probing)
    val: bool = False  # a validation stream is the dataset VAL


@dataclass(frozen=True)
class Worker:
    """This training worker: its rank among `world` workers and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes the run files, the figures and the checkpoint."""
        return self.rank == 0
