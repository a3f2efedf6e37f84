"""Export an MAE checkpoint (ours or the official release's) for use elsewhere.

    python pipelines/export.py --checkpoint runs/demo --to timm --out encoder.safetensors
    python pipelines/export.py --checkpoint runs/demo --to hf --out vit-mae-demo/

`--to hf` writes a folder (config.json + model.safetensors) that Hugging Face transformers
loads with `ViTMAEForPreTraining.from_pretrained(folder)`: encoder and decoder, the same
loss and reconstructions for the same `noise`; `run.resume_from` reads such a folder back
(ours or one from the hub, e.g. a download of facebook/vit-mae-base).

--checkpoint is a checkpoint file (ours or an official MAE .pth) or a run directory (its
latest checkpoint).

A fine-tuned or linear-probe classifier of ours (pipelines/finetune.py, linprobe.py; e.g.
runs/demo_finetune/best/checkpoint.pth) exports whole, head included, as the timm
`VisionTransformer` with the same pooling (global_pool="avg" after fine-tuning, "token" after
linear probing, whose BatchNorm is folded into the head): the same logits, e.g.

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=1000, global_pool="avg",
                      pretrained_cfg_overlay=dict(file="classifier.safetensors", num_classes=1000, ...))

Writes timm `VisionTransformer` weights without a head (safetensors) and prints the timm model
to build with them when the checkpoint records a paper preset (ours record it; the official
release files do not: pick the `vit_*` model of the same size), e.g.

    timm.create_model("vit_large_patch16_224", pretrained=True, num_classes=1000,
                      pretrained_cfg_overlay=dict(file="encoder.safetensors", num_classes=0, ...))
"""
import argparse
import os
import sys

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mae.checkpoint import (image_size_of, latest_checkpoint, load_checkpoint, model_from_checkpoint, model_state,
                            recorded_preset)
from mae.export import encoder_state_for_timm, save_hf, save_timm_encoder, timm_load_example, timm_model_name
from mae.model import preset


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint.pth of ours, an official MAE .pth, or a run directory")
    ap.add_argument("--to", choices=["timm", "hf"], default="timm",
                    help="timm: the encoder as a VisionTransformer (.safetensors); hf: the whole model as "
                         "transformers' ViTMAEForPreTraining (a folder)")
    ap.add_argument("--out", required=True, help="file (timm, .safetensors) or folder (hf) to write")
    ap.add_argument("--norm-pix-loss", choices=["true", "false"], default=None,
                    help="hf: the config's norm_pix_loss for an official checkpoint, which does not record it "
                         "(ours do); true for the *_full.pth pretraining weights")
    return ap.parse_args(argv)


def timm_name_or_none(ckpt: dict, img_size: int) -> str | None:
    """The timm model of the preset the checkpoint records, if it has one."""
    preset_name = recorded_preset(ckpt)
    try:
        return timm_model_name(preset_name, img_size) if preset_name else None
    except ValueError:
        return None


def export_hf(ckpt: dict, out: str, norm_pix_loss: bool | None) -> str:
    """Write the Hugging Face folder of a checkpoint (with its decoder); a line saying what."""
    model, name = model_from_checkpoint(ckpt, norm_pix_loss=norm_pix_loss, require_decoder=True)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    mask_ratio = config.get("model", {}).get("mask_ratio", 0.75)
    img_size = image_size_of(model_state(ckpt))
    save_hf(model.state_dict(), preset(name), img_size, model.norm_pix_loss, out, mask_ratio)
    return (f"wrote {out}: transformers ViTMAEForPreTraining ({name}, {img_size}px, norm_pix_loss="
            f"{model.norm_pix_loss}); load it with ViTMAEForPreTraining.from_pretrained({out!r})")


def classifier_task(ckpt: dict) -> str | None:
    """"finetune" or "linprobe" for a classifier checkpoint of ours, else None (an MAE)."""
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    task = config.get("train", {}).get("task", "pretrain")
    return task if task in ("finetune", "linprobe") else None


def export_classifier(ckpt: dict, task: str, out: str) -> list[str]:
    """Write a classifier checkpoint as timm safetensors; the lines saying what, and how to load it."""
    from mae.classifier import create_classifier, timm_state

    m = ckpt["config"]["model"]
    state = model_state(ckpt)
    num_classes = state["head.1.weight" if task == "linprobe" else "head.weight"].shape[0]
    model = create_classifier(m["name"], m["input_size"], num_classes, task, global_pool=m["global_pool"])
    model.load_state_dict(state)
    pool = "avg" if task == "finetune" and m["global_pool"] else "token"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_timm_encoder(timm_state(model), out)
    name = timm_name_or_none(ckpt, m["input_size"]) or "vit_<size>_patch<p>_<img_size>"
    return [f"wrote {out}: a timm VisionTransformer classifier ({m['name']} encoder, {num_classes} classes, "
            f"global_pool={pool!r}{', its BatchNorm folded into the head' if task == 'linprobe' else ''})",
            f"load it with: timm.create_model(\"{name}\", pretrained=True, num_classes={num_classes}, "
            f"global_pool=\"{pool}\", pretrained_cfg_overlay=dict(file=\"{out}\", num_classes={num_classes}, "
            f"mean={IMAGENET_DEFAULT_MEAN}, std={IMAGENET_DEFAULT_STD}))"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.to == "hf":
        try:
            if classifier_task(load_checkpoint(latest_checkpoint(args.checkpoint))) is not None:
                raise ValueError("--to hf: this is a classifier (fine-tuned or linear probe); it exports to timm "
                                 "(--to timm)")
            print(export_hf(load_checkpoint(latest_checkpoint(args.checkpoint)), args.out,
                            None if args.norm_pix_loss is None else args.norm_pix_loss == "true"))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        ckpt = load_checkpoint(latest_checkpoint(args.checkpoint))
        task = classifier_task(ckpt)
        if task is not None:
            print("\n".join(export_classifier(ckpt, task, args.out)))
            return 0
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
