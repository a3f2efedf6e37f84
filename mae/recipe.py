"""The paper's optimisation recipe as pure functions: lr scaling, lr at a point in time,
parameter groups, AdamW."""
import math

import torch
import torch.nn as nn


def scaled_lr(blr: float, batch_per_worker: int, accum_iter: int, num_workers: int) -> float:
    """`lr = blr * effective_batch / 256` with effective_batch = batch * accum_iter * workers."""
    return blr * batch_per_worker * accum_iter * num_workers / 256


def fractional_epoch(epoch: int, iteration: int, iters_per_epoch: int) -> float:
    """The point in time the reference sets the lr from: `iteration / len(loader) + epoch`.

    `iteration` counts data batches (micro-steps) within the epoch; this is the one place
    where steps become epochs.
    """
    return epoch + iteration / iters_per_epoch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup to `lr`, then half-cycle cosine to `min_lr` at `epochs` (the reference's
    `adjust_learning_rate`)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and 1-D parameters (norms); frozen parameters (the sin-cos
    position embeddings) are left out. Same grouping and order as the reference (timm's
    `add_weight_decay`: no-decay group first), so optimizer states are interchangeable.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; `fused=True` runs the single-kernel implementation
    (CUDA), None lets PyTorch pick (foreach where it can)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)
