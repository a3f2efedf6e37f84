"""Everything about checkpoint files: their name and folder pattern, (de)serialising them,
and recovering the model a state dict holds (preset, image size). Loading never executes
code from the file. Finding a run's latest checkpoint goes through the run storage (local or
S3), so it lives in pipelines/common/checkpoints.py.

A run directory holds one folder per checkpoint, `checkpoint_epoch_EEEE_step_SSSSSSSSS/`
(epoch and optimizer steps, zero-padded so that names sort in time order), each with one
`checkpoint.pth`.
"""
import argparse
import os
import re

import torch

CHECKPOINT_FILE = "checkpoint.pth"
CHECKPOINT_DIR = re.compile(r"checkpoint_epoch_(\d{4,})_step_(\d{9,})")

# Official MAE checkpoints store `args` as an argparse.Namespace; nothing else is allowed
# beyond what `weights_only=True` already accepts (tensors, containers, primitives).
SAFE_GLOBALS = [argparse.Namespace]


def checkpoint_dir_name(epoch: int, step: int) -> str:
    """The folder of the checkpoint taken in `epoch` after `step` optimizer steps."""
    return f"checkpoint_epoch_{epoch:04d}_step_{step:09d}"


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint file whole or not at all: into a temporary file beside it, fsynced,
    then renamed; a failure (a full disk, an object that does not pickle) leaves neither."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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


def image_size_of(state: dict) -> int:
    """The square input size a state dict was trained at, from its position embedding."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    return int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * patch


def recorded_preset(ckpt: dict) -> str | None:
    """The preset name a checkpoint records: ours in `config` and `args`, one trained with the
    official code in `args.model` (a Namespace). The released files record none."""
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict) and config["model"].get("name"):
        return config["model"]["name"]
    args = ckpt.get("args")
    name = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    return name if isinstance(name, str) else None


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
    from mae.model import create_model, list_models

    state = model_state(ckpt)
    config = ckpt.get("config", {}).get("model", {}) if isinstance(ckpt.get("config"), dict) else {}
    name = recorded_preset(ckpt)
    if name not in list_models():
        name = architecture_of(state)
    if norm_pix_loss is None:
        norm_pix_loss = bool(config.get("norm_pix_loss", False))
    model = create_model(name, img_size=image_size_of(state), norm_pix_loss=norm_pix_loss)
    has_decoder = "decoder_embed.weight" in state
    if require_decoder and not has_decoder:
        raise ValueError("this checkpoint holds only an encoder (no decoder_* keys), so it cannot reconstruct "
                         "images; use a full checkpoint (ours, mae_pretrain_vit_*_full.pth or mae_visualize_vit_*.pth)")
    load_mae_state(model, state, strict=has_decoder)
    return model, name
