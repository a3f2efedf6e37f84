"""Export a pretrained MAE for use elsewhere: the encoder as timm's `VisionTransformer`, the
whole model as Hugging Face transformers' `ViTMAEForPreTraining` (and read the latter back).

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
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # where a file is exported: not on import
    name = model_name or "vit_<size>_patch<p>_<img_size>"
    return (f'timm.create_model("{name}", pretrained=True, num_classes=1000, '
            f'pretrained_cfg_overlay=dict(file="{os.fspath(path)}", num_classes=0, '
            f'mean={IMAGENET_DEFAULT_MEAN}, std={IMAGENET_DEFAULT_STD}))')


def save_timm_encoder(state: dict, path: str | os.PathLike) -> None:
    """Write a state dict from `encoder_state_for_timm` as safetensors, which timm loads
    without unpickling (`pretrained_cfg_overlay=dict(file=...)`)."""
    from safetensors.torch import save_file

    save_file(state, os.fspath(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------
# Hugging Face transformers: ViTMAEForPreTraining
# --------------------------------------------------------------------------------------

HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"

# Inside a block: ours (timm's) -> transformers' names, as the facebook/vit-mae-* checkpoints
# spell them (transformers 5 renames them on load; 4.x uses them as they are). The qkv
# projection is split in three.
_HF_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_TOP = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
           "patch_embed.proj": "vit.embeddings.patch_embeddings.projection", "norm": "vit.layernorm",
           "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed",
           "decoder_embed": "decoder.decoder_embed", "decoder_norm": "decoder.decoder_norm",
           "decoder_pred": "decoder.decoder_pred"}
_HF_STACKS = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
# transformers 5's own names for the same tensors (in memory, and as its save_pretrained writes
# the decoder's), accepted on import
_HF5 = (("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),
        ("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"))


def hf_config(arch: dict, img_size: int, norm_pix_loss: bool, mask_ratio: float = 0.75) -> dict:
    """The `ViTMAEConfig` (as config.json) of a preset's constructor arguments `arch`."""
    mlp = arch.get("mlp_ratio", 4.0)
    return {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
            "image_size": img_size, "patch_size": arch["patch_size"], "num_channels": 3,
            "hidden_size": arch["embed_dim"], "num_hidden_layers": arch["depth"],
            "num_attention_heads": arch["num_heads"], "intermediate_size": int(arch["embed_dim"] * mlp),
            "decoder_hidden_size": arch["decoder_embed_dim"], "decoder_num_hidden_layers": arch["decoder_depth"],
            "decoder_num_attention_heads": arch["decoder_num_heads"],
            "decoder_intermediate_size": int(arch["decoder_embed_dim"] * mlp),
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "mask_ratio": mask_ratio,
            "norm_pix_loss": norm_pix_loss}


def arch_of_hf_config(config: dict) -> dict:
    """Our constructor arguments of a `ViTMAEConfig`; ValueError for what ours cannot build
    (another activation, no qkv bias, encoder and decoder MLPs of different ratios)."""
    if config.get("model_type") != "vit_mae":
        raise ValueError(f"{HF_CONFIG}: model_type is {config.get('model_type')!r}, not 'vit_mae'")
    mlp = config["intermediate_size"] / config["hidden_size"]
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True) \
            or config["decoder_intermediate_size"] / config["decoder_hidden_size"] != mlp:
        raise ValueError(f"{HF_CONFIG}: gelu, qkv bias and one MLP ratio for encoder and decoder are needed "
                         "(the MAE architecture)")
    return {"img_size": config["image_size"], "patch_size": config["patch_size"],
            "embed_dim": config["hidden_size"], "depth": config["num_hidden_layers"],
            "num_heads": config["num_attention_heads"], "decoder_embed_dim": config["decoder_hidden_size"],
            "decoder_depth": config["decoder_num_hidden_layers"],
            "decoder_num_heads": config["decoder_num_attention_heads"], "mlp_ratio": mlp}


def state_to_hf(state: dict) -> dict:
    """Our (= the official) MAE state dict -> `ViTMAEForPreTraining`'s, contiguous copies."""
    out = {}
    for key, value in state.items():
        value = value.detach().clone(memory_format=torch.contiguous_format)
        head, _, leaf = key.rpartition(".")
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif head in _HF_TOP:
            out[f"{_HF_TOP[head]}.{leaf}"] = value
        elif key.split(".")[0] in _HF_STACKS:
            stack, index, inner = key.split(".", 2)
            prefix = f"{_HF_STACKS[stack]}.{index}"
            inner_head, _, leaf = inner.rpartition(".")
            if inner_head == "attn.qkv":
                for name, part in zip(_HF_QKV, value.chunk(3, dim=0)):
                    out[f"{prefix}.{name}.{leaf}"] = part.contiguous()
            else:
                out[f"{prefix}.{_HF_BLOCK[inner_head]}.{leaf}"] = value
        else:
            raise ValueError(f"no Hugging Face name for {key!r}")
    return out


def state_from_hf(hf_state: dict) -> dict:
    """`ViTMAEForPreTraining`'s state dict (the hub's names or transformers 5's) -> ours."""
    hf_state = {_legacy_hf_name(k): v for k, v in hf_state.items()}
    top = {v: k for k, v in _HF_TOP.items()}
    blocks = {v: k for k, v in _HF_BLOCK.items()}
    out, qkv = {}, {}
    for key, value in hf_state.items():
        head, _, leaf = key.rpartition(".")
        stack = next((s for s, hf in _HF_STACKS.items() if key.startswith(hf + ".")), None)
        if key in top:
            out[top[key]] = value
        elif head in top:
            out[f"{top[head]}.{leaf}"] = value
        elif stack is not None:
            index, inner = key[len(_HF_STACKS[stack]) + 1:].split(".", 1)
            inner_head, _, leaf = inner.rpartition(".")
            if inner_head in _HF_QKV:
                qkv.setdefault(f"{stack}.{index}.attn.qkv.{leaf}", {})[inner_head] = value
            elif inner_head in blocks:
                out[f"{stack}.{index}.{blocks[inner_head]}.{leaf}"] = value
            else:
                raise ValueError(f"unexpected Hugging Face ViTMAE weight {key!r}")
        else:
            raise ValueError(f"unexpected Hugging Face ViTMAE weight {key!r}")
    for key, parts in qkv.items():
        if set(parts) != set(_HF_QKV):
            raise ValueError(f"{key}: the Hugging Face weights lack some of query, key, value")
        out[key] = torch.cat([parts[name] for name in _HF_QKV], dim=0)
    return out


def _legacy_hf_name(key: str) -> str:
    for new, old in _HF5:
        key = key.replace(new, old)
    return key


def save_hf(state: dict, arch: dict, img_size: int, norm_pix_loss: bool, folder: str | os.PathLike,
            mask_ratio: float = 0.75) -> None:
    """Write `folder/config.json` and `folder/model.safetensors`, which
    `transformers.ViTMAEForPreTraining.from_pretrained(folder)` loads (transformers is not
    needed to write them)."""
    import json

    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, HF_CONFIG), "w") as f:
        json.dump(hf_config(arch, img_size, norm_pix_loss, mask_ratio), f, indent=2)
    save_file(state_to_hf(state), os.path.join(folder, HF_WEIGHTS), metadata={"format": "pt"})


def read_hf(config_json: bytes, weights: bytes) -> tuple[dict, dict, bool]:
    """(our state dict, our constructor arguments, norm_pix_loss) of a Hugging Face ViTMAE
    folder's two files. safetensors holds tensors only: loading it runs no code."""
    import json

    from safetensors.torch import load
    config = json.loads(config_json)
    return state_from_hf(load(weights)), arch_of_hf_config(config), bool(config.get("norm_pix_loss", False))
