"""Where a training worker computes: one row per accelerator kind. Adding an accelerator is
adding a row.

`prepare_device` runs in every training worker before its process group is created: it
imports the row's torch plugin (which registers the device type and the distributed
backend) and sets the worker's device from its local rank.
"""
import dataclasses
import importlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    name: str
    device_type: str
    """torch device type of a worker's device ("cpu", "cuda", "sdaa", "npu")."""
    backend: str
    """torch.distributed backend."""
    resource: str | None
    """Ray resource each worker requests one unit of (None: CPUs only)."""
    amp_dtypes: tuple[str, ...]
    """`train.precision` values the device can run."""
    plugin: str | None = None
    """Module to import before the device or process group is used (torch_sdaa, torch_npu)."""
    visible_devices: str | None = None
    """Environment variable that restricts the devices a process sees."""
    scaler: str = "torch.amp.GradScaler"
    """Gradient scaler class for fp16 (called with the device type where it is torch.amp's)."""
    compiles: bool = True
    """Whether torch.compile supports the device; `train.compile` falls back to eager where not."""

    def device_module(self):
        """torch.cuda, torch.sdaa, torch.npu (after the plugin import); None for the CPU."""
        return None if self.device_type == "cpu" else getattr(torch, self.device_type)

    def make_scaler(self, enabled: bool):
        module, _, cls = self.scaler.rpartition(".")
        scaler_cls = getattr(importlib.import_module(module), cls)
        if self.scaler == "torch.amp.GradScaler":
            return scaler_cls(self.device_type, enabled=enabled)
        return scaler_cls(enabled=enabled)

    def supports_bf16(self) -> bool:
        module = self.device_module()
        return module is None or not hasattr(module, "is_bf16_supported") or module.is_bf16_supported()

    def worker_resources(self, cpus: float) -> dict[str, float]:
        """The Ray resources of one training worker holding `cpus` CPUs and one device."""
        return {"CPU": cpus, **({self.resource: 1} if self.resource else {})}

    def with_device_type(self, device_type: str) -> "Accelerator":
        """This row scheduled on the same Ray resource but computing on another device type
        (e.g. cpu, to test scheduling on `sdaa` nodes without the hardware): no plugin, and
        the backend and precisions of that device type's own row."""
        own = next(row for row in ACCELERATORS.values() if row.device_type == device_type)
        return dataclasses.replace(own, name=self.name, resource=self.resource)


ACCELERATORS: dict[str, Accelerator] = {row.name: row for row in [
    Accelerator("cpu", "cpu", "gloo", None, ("fp32", "bf16")),
    Accelerator("cuda", "cuda", "nccl", "GPU", ("fp32", "bf16", "fp16"), visible_devices="CUDA_VISIBLE_DEVICES"),
    # Tecorigin SDAA: one T100 card shows as 4 devices; bf16 only where torch.sdaa.is_bf16_supported()
    Accelerator("sdaa", "sdaa", "tccl", "sdaa", ("fp32", "fp16", "bf16"), plugin="torch_sdaa",
                visible_devices="SDAA_VISIBLE_DEVICES", scaler="torch.sdaa.amp.GradScaler", compiles=False),
    # Huawei Ascend
    Accelerator("npu", "npu", "hccl", "NPU", ("fp32", "fp16", "bf16"), plugin="torch_npu",
                visible_devices="ASCEND_RT_VISIBLE_DEVICES", scaler="torch.npu.amp.GradScaler", compiles=False),
]}

def resolve(name: str, device_type: str | None = None) -> Accelerator:
    row = ACCELERATORS[name]
    return row.with_device_type(device_type) if device_type and device_type != row.device_type else row


def prepare_device(row: Accelerator, local_rank: int) -> torch.device:
    """Import the plugin and set this worker's device (local rank modulo the devices this
    process sees). Idempotent; call it before init_process_group."""
    if row.plugin:
        try:
            importlib.import_module(row.plugin)
        except ImportError as e:
            raise RuntimeError(f"scaling.accelerator={row.name}: cannot import its torch plugin "
                               f"{row.plugin!r} on this node ({e})") from None
    module = row.device_module()
    if module is None:
        device = torch.device("cpu")
    else:
        count = module.device_count()
        if count == 0:
            visible = os.environ.get(row.visible_devices or "", "unset")
            raise RuntimeError(f"scaling.accelerator={row.name}: no {row.device_type} device visible to this "
                               f"worker ({row.visible_devices}={visible})")
        device = torch.device(row.device_type, local_rank % count)
        module.set_device(device)
    return device
