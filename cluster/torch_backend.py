"""Ray Train's torch backend with one step added: before the process group is created,
every worker imports its accelerator's plugin and sets its device (Ray's own helpers only
know CUDA)."""
from dataclasses import dataclass

import ray.train
from ray.train.torch import TorchConfig

from cluster.accelerators import Accelerator, prepare_device
from cluster.ray_compat import TorchBackend, run_on_workers


def _prepare_worker(row: Accelerator) -> str:
    return str(prepare_device(row, ray.train.get_context().get_local_rank()))


class _AcceleratorBackend(TorchBackend):
    def on_start(self, worker_group, backend_config: "AcceleratorTorchConfig"):
        run_on_workers(worker_group, _prepare_worker, backend_config.accelerator)
        super().on_start(worker_group, backend_config)


@dataclass
class AcceleratorTorchConfig(TorchConfig):
    accelerator: Accelerator | None = None

    def __post_init__(self):
        if self.backend is None and self.accelerator is not None:
            self.backend = self.accelerator.backend

    @property
    def backend_cls(self):
        return _AcceleratorBackend
