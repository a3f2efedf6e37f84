"""One optimizer step on a training worker: the model wrapped once (torch.compile, DDP), a
micro-batch's forward and backward, and the optimizer's step."""
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from mae.transforms import normalize_on_device

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepConfig:
    """What one micro-step needs. `objective(model, images, labels)`: the loss of a
    classification task (pipelines/worker/tasks.py); None: the MAE's own at `mask_ratio`.
    `inputs`: a float [N, 3, H, W] tensor on the device to normalise each batch into (reused
    from step to step on the CPU, where allocating it anew costs more than normalising)."""
    device: torch.device
    mask_ratio: float
    accum_iter: int
    amp_dtype: torch.dtype | None = None
    objective: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    inputs: torch.Tensor | None = None


def wrap_model(model: torch.nn.Module, compile: bool, world: int) -> torch.nn.Module:
    """torch.compile (in place, so state-dict keys stay the official ones), then DDP. Every
    parameter is used every step, so DDP looks for no unused ones. A graph that fails to
    compile runs eager (cluster/torch_compat.py: the train loop runs under its fallback)."""
    if compile:
        model.compile()
    if world > 1:
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    return model


def micro_step(model: torch.nn.Module, images: torch.Tensor, step: StepConfig, scaler: torch.amp.GradScaler,
               sync_grads: bool = True, noise: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Forward + backward of one micro-batch of uint8 [N, H, W, 3] images (and their
    `labels`, for a classification objective); returns the detached loss. With
    `sync_grads=False` a DDP model skips its all-reduce (`no_sync`)."""
    imgs = normalize_on_device(images, step.device, out=step.inputs)
    no_sync = not sync_grads and isinstance(model, DistributedDataParallel)
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with torch.autocast(step.device.type, dtype=step.amp_dtype, enabled=step.amp_dtype is not None):
            if step.objective is None:
                loss, _, _ = model(imgs, mask_ratio=step.mask_ratio, noise=noise)
            else:
                loss = step.objective(model, imgs, labels.to(step.device, non_blocking=True))
        scaler.scale(loss / step.accum_iter).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
