"""The paper's optimisation recipe as pure functions: lr scaling, lr at a point in time,
parameter groups, AdamW."""
import math

import torch
import torch.nn as nn


def scaled_lr(blr: float, effective_batch: int) -> float:
    """`lr = blr * effective_batch / 256`, effective_batch = batch per worker x accum_iter x workers."""
    return blr * effective_batch / 256


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


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer a ViT parameter belongs to for layer-wise lr decay: 0 for the embeddings,
    i + 1 for block i, `num_layers` for what follows the blocks (norms, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float, no_weight_decay: set[str] = frozenset(),
                     layer_decay: float = 0.75) -> list[dict]:
    """Parameter groups with layer-wise lr decay (BEiT's, as the official fine-tuning code
    groups them): group `layer_<id>_{decay,no_decay}` scales the lr by layer_decay **
    (num_layers - id), with num_layers = blocks + 1; 1-D parameters and `no_weight_decay`
    (e.g. `model.no_weight_decay()`) get no weight decay; frozen parameters are left out.
    Groups come in the order of their first parameter; each has `name`, `lr_scale`,
    `weight_decay` and `params` (set_lr applies the scale)."""
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_weight_decay)
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(key, {"name": key, "lr_scale": layer_decay ** (num_layers - layer),
                                        "weight_decay": weight_decay if decay else 0.0, "params": []})
        group["params"].append(param)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as the official linear probe
    uses it: for every parameter of more than one dimension the update (gradient plus weight
    decay) is scaled by trust_coefficient * ||p|| / ||update|| (1 where either norm is 0);
    biases and norms take the plain update. torch and timm have no optimizer that does
    exactly this (timm's `Lars` adapts every parameter or none, with another ratio)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                update = p.grad
                if update is None:
                    continue
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    ratio = torch.where(param_norm > 0.0, torch.where(
                        update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one), one)
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
