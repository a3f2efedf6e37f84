"""Export the encoder of an MAE checkpoint (ours or the official release's) for fine-tuning.

    python pipelines/export.py --checkpoint runs/demo --to timm --out encoder.safetensors

--checkpoint is a checkpoint file (ours or an official MAE .pth) or a run directory (its
latest checkpoint).

Writes timm `VisionTransformer` weights without a head (safetensors) and prints the timm model
to build with them when the checkpoint records a paper preset (ours record it; the official
release files do not: pick the `vit_*` model of the same size), e.g.

    timm.create_model("vit_large_patch16_224", pretrained=True, num_classes=1000,
                      pretrained_cfg_overlay=dict(file="encoder.safetensors", num_classes=0, ...))
"""
import argparse
import os
import sys

from mae.checkpoint import image_size_of, latest_checkpoint, load_checkpoint, model_state, recorded_preset
from mae.export import encoder_state_for_timm, save_timm_encoder, timm_load_example, timm_model_name


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint.pth of ours, an official MAE .pth, or a run directory")
    ap.add_argument("--to", choices=["timm"], default="timm", help="target library")
    ap.add_argument("--out", required=True, help="file to write (.safetensors)")
    return ap.parse_args(argv)


def timm_name_or_none(ckpt: dict, img_size: int) -> str | None:
    """The timm model of the preset the checkpoint records, if it has one."""
    preset_name = recorded_preset(ckpt)
    try:
        return timm_model_name(preset_name, img_size) if preset_name else None
    except ValueError:
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ckpt = load_checkpoint(latest_checkpoint(args.checkpoint))
        state = model_state(ckpt)
        encoder = encoder_state_for_timm(state)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_timm_encoder(encoder, args.out)
    img_size = image_size_of(state)
    name = timm_name_or_none(ckpt, img_size)
    print(f"wrote {args.out}: {len(encoder)} tensors, a timm VisionTransformer encoder at {img_size}px "
          + (f"for timm model {name}" if name else "(the checkpoint records no preset with a timm model)"))
    print(f"load it with: {timm_load_example(name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
