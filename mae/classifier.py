"""The classifier that fine-tuning and linear probing train: timm's `VisionTransformer` with
the encoder of an MAE preset, as the official `models_vit.py` builds it.

Fine-tuning pools the patch tokens (`global_pool=True`: their mean, then a fresh `fc_norm`;
the encoder's final `norm` is not used) and trains everything. Linear probing takes the class
token after `norm`, puts a BatchNorm without affine parameters before the linear head, and
trains the head only (`main_linprobe.py`). State-dict keys are timm's, which are the official
fine-tuned and linear-probe checkpoints' keys.

Pure PyTorch and timm; never imports ray.
"""
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from mae.export import encoder_state_for_timm
from mae.model import preset

HEAD_INIT_STD = {"finetune": 2e-5, "linprobe": 0.01}  # main_finetune.py / main_linprobe.py


def create_classifier(name: str, img_size: int, num_classes: int, task: str = "finetune",
                      drop_path: float = 0.0, global_pool: bool = True) -> VisionTransformer:
    """The classifier on the encoder of MAE preset `name`. `task`: "finetune" (all weights
    train) or "linprobe" (class token, BatchNorm head, only the head trains)."""
    arch = preset(name)
    pool = "avg" if global_pool and task == "finetune" else "token"
    model = VisionTransformer(img_size=img_size, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                              depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch.get("mlp_ratio", 4.0),
                              qkv_bias=True, num_classes=num_classes, global_pool=pool,
                              drop_path_rate=drop_path if task == "finetune" else 0.0)
    if task == "linprobe":
        model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
        for p in model.parameters():
            p.requires_grad = False
        for p in model.head.parameters():
            p.requires_grad = True
    return model


def linear_head(model: VisionTransformer) -> nn.Linear:
    """The linear layer of the head (after the BatchNorm of a linear probe)."""
    return model.head[-1] if isinstance(model.head, nn.Sequential) else model.head


def load_pretrained(model: VisionTransformer, mae_state: dict, task: str = "finetune") -> list[str]:
    """Start `model` from a pretrained MAE's encoder (ours or an official .pth, full or
    encoder-only), as `main_finetune.py` / `main_linprobe.py` do: the position embedding
    resampled to the model's grid where it differs, the head drawn anew (truncated normal,
    std `HEAD_INIT_STD[task]`). Returns the keys newly initialised; raises ValueError when
    the encoder does not fit."""
    state = encoder_state_for_timm(mae_state)
    grid = model.patch_embed.grid_size
    if state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1,
                                                    interpolation="bicubic", antialias=False)  # as the official
    if isinstance(model.fc_norm, nn.LayerNorm):  # global pooling: the encoder's final norm is not used
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = {k for k in model.state_dict() if k.startswith(("head.", "fc_norm."))}
    if unexpected or not set(missing) <= fresh:
        raise ValueError(f"the pretrained encoder does not fit {type(model).__name__}: missing "
                         f"{sorted(set(missing) - fresh)}, unexpected {sorted(unexpected)}")
    with torch.no_grad():
        trunc_normal_(linear_head(model).weight, std=HEAD_INIT_STD[task])
    return sorted(missing)


def timm_state(model: VisionTransformer) -> dict:
    """The state dict of a plain timm `VisionTransformer` with the same logits: a linear
    probe's BatchNorm (no affine parameters, running statistics) is folded into the linear
    layer, W' = W / s and b' = b - W' mu with s = sqrt(var + eps)."""
    state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    if not isinstance(model.head, nn.Sequential):
        return state
    bn, fc = model.head
    scale = torch.sqrt(bn.running_var.double() + bn.eps)
    weight = fc.weight.double() / scale
    bias = fc.bias.double() - weight @ bn.running_mean.double()
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state["head.weight"], state["head.bias"] = weight.to(fc.weight.dtype), bias.to(fc.bias.dtype)
    return state
