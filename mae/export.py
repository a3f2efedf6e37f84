"""Export a pretrained MAE encoder for fine-tuning elsewhere: timm's `VisionTransformer`.

MAE's encoder is a standard ViT (class token, learned-shape position embedding holding the
fixed sin-cos values, pre-norm timm `Block`s, final `norm`), so its keys are already timm's;
exporting selects them and leaves out the decoder, `mask_token` and any head. Leaving out
`mask_token` also matters to timm itself: its ViT checkpoint filter takes a state dict with a
`mask_token` for a DINOv2 one and would rename the keys.

The weights load into timm's token-pooled ViTs (`global_pool='token'`: `norm`, then `head`).
With `global_pool='avg'` (the MAE paper's fine-tuning recipe) timm uses a fresh `fc_norm` in
place of `norm`, as the official fine-tuning code does.

Pure PyTorch, timm and safetensors; never imports ray.
"""
import os

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

ENCODER_PARAMETERS = ("cls_token", "pos_embed")
ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")
REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "norm.weight", "norm.bias")

# Our paper presets and timm's architecture of the same shapes (the image size is appended).
TIMM_ARCHITECTURES = {
    "mae_vit_base_patch16": "vit_base_patch16",
    "mae_vit_large_patch16": "vit_large_patch16",
    "mae_vit_huge_patch14": "vit_huge_patch14",
}


def _is_encoder_key(key: str) -> bool:
    return key in ENCODER_PARAMETERS or key.startswith(ENCODER_PREFIXES)


def encoder_state_for_timm(state: dict) -> dict:
    """The timm `VisionTransformer` state dict (no head) of an MAE state dict: ours or an official
    release's, with or without the decoder. Tensors are contiguous copies, safe to save."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing or not any(k.startswith("blocks.") for k in state):
        raise ValueError(f"not an MAE state dict: missing {missing or ['blocks.*']}")
    return {k: v.detach().clone(memory_format=torch.contiguous_format)
            for k, v in state.items() if _is_encoder_key(k)}


def timm_model_name(preset_name: str, img_size: int) -> str:
    """The registered timm model with the architecture of an MAE preset at `img_size`, e.g.
    `mae_vit_large_patch16`, 224 -> `vit_large_patch16_224`."""
    from timm import list_models

    name = f"{TIMM_ARCHITECTURES.get(preset_name)}_{img_size}"
    if preset_name not in TIMM_ARCHITECTURES or name not in list_models(name):
        raise ValueError(f"preset {preset_name!r} at {img_size}px has no timm counterpart "
                         f"(timm has the architectures of {', '.join(TIMM_ARCHITECTURES)})")
    return name


def timm_load_example(model_name: str | None, path: str | os.PathLike) -> str:
    """The Python line that builds a timm classifier from an exported file.

    The overlay's `num_classes=0` says the file has no head, so timm drops the head from the
    strict load (a 1000-class default config would otherwise demand `head.*`); the mean and std
    are the ImageNet ones MAE was trained with (timm's defaults for these ViTs are 0.5)."""
    name = model_name or "vit_<size>_patch<p>_<img_size>"
    return (f'timm.create_model("{name}", pretrained=True, num_classes=1000, '
            f'pretrained_cfg_overlay=dict(file="{os.fspath(path)}", num_classes=0, '
            f'mean={IMAGENET_DEFAULT_MEAN}, std={IMAGENET_DEFAULT_STD}))')


def save_timm_encoder(state: dict, path: str | os.PathLike) -> None:
    """Write a state dict from `encoder_state_for_timm` as safetensors, which timm loads
    without unpickling (`pretrained_cfg_overlay=dict(file=...)`)."""
    from safetensors.torch import save_file

    save_file(state, os.fspath(path), metadata={"format": "pt"})
