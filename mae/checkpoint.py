"""Checkpoint (de)serialisation. Loading never executes code from the file."""
import argparse
import os
import tempfile
from pathlib import Path

import torch

# Official MAE checkpoints store `args` as an argparse.Namespace; nothing else is allowed
# beyond what `weights_only=True` already accepts (tensors, containers, primitives).
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def model_state(ckpt: dict) -> dict:
    """The model state dict inside a checkpoint of ours or of the official release."""
    return ckpt["model"] if "model" in ckpt else ckpt


def load_mae_state(model, state: dict, strict: bool = False) -> list[str]:
    """Load an MAE state dict (full, or encoder-only as `mae_pretrain_vit_*.pth`) into
    `model`; returns the keys the checkpoint lacked (decoder and mask token only)."""
    missing, unexpected = model.load_state_dict(state, strict=strict)
    if unexpected or any(not (k.startswith("decoder") or k == "mask_token") for k in missing):
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    return missing


def architecture_of(state: dict) -> str:
    """The registered preset whose shapes the state dict has (patch size, widths, depths)."""
    from mae.model import MaskedAutoencoderViT, list_models, preset

    def dims(sd: dict) -> tuple:
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        dec_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
        dec_dim = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else None
        return sd["patch_embed.proj.weight"].shape[-1], sd["cls_token"].shape[-1], depth, dec_dim, dec_depth

    want = dims(state)
    for name in list_models():
        with torch.device("meta"):
            candidate = dims(MaskedAutoencoderViT(**{**preset(name), "img_size": want[0] * 2}).state_dict())
        has_decoder = want[3] is not None
        if candidate[:3] == want[:3] and (not has_decoder or candidate[3:] == want[3:]):
            return name
    raise ValueError(f"no registered model has these shapes (patch, width, depth, decoder width, decoder depth) "
                     f"= {want}; registered: {list_models()}")


def model_from_checkpoint(ckpt: dict, norm_pix_loss: bool | None = None, require_decoder: bool = True):
    """Build and load the MAE a checkpoint holds: ours (the config names the preset) or an
    official one (preset found from the shapes; image size from the position embedding).

    Encoder-only checkpoints (`mae_pretrain_vit_*.pth`) load their encoder only, and only
    when `require_decoder` is False. Returns (model, preset name)."""
    from mae.model import create_model

    state = model_state(ckpt)
    config = ckpt.get("config", {}).get("model", {}) if isinstance(ckpt.get("config"), dict) else {}
    name = config.get("name") or architecture_of(state)
    patch = state["patch_embed.proj.weight"].shape[-1]
    img_size = int((state["pos_embed"].shape[1] - 1) ** 0.5) * patch
    if norm_pix_loss is None:
        norm_pix_loss = bool(config.get("norm_pix_loss", False))
    model = create_model(name, img_size=img_size, norm_pix_loss=norm_pix_loss)
    has_decoder = "decoder_embed.weight" in state
    if require_decoder and not has_decoder:
        raise ValueError("this checkpoint holds only an encoder (no decoder_* keys), so it cannot reconstruct "
                         "images; use a full checkpoint (ours, mae_pretrain_vit_*_full.pth or mae_visualize_vit_*.pth)")
    load_mae_state(model, state, strict=has_decoder)
    return model, name
