"""Export an MAE checkpoint (ours or the official release's) for use elsewhere.

    python pipelines/export.py --checkpoint runs/demo --to timm --out encoder.safetensors
    python pipelines/export.py --checkpoint runs/demo --to hf --out vit-mae-demo/

`--to hf` writes a folder (config.json + model.safetensors) that Hugging Face transformers
loads with `ViTMAEForPreTraining.from_pretrained(folder)`: encoder and decoder, the same
loss and reconstructions for the same `noise`; `run.resume_from` reads such a folder back
(ours or one from the hub, e.g. a download of facebook/vit-mae-base).

--checkpoint is a checkpoint file (ours or an official MAE .pth) or a run directory (its
latest checkpoint), local or on S3 (s3://bucket/prefix, with --s3-endpoint for MinIO or Ceph,
--s3-credentials-file or the usual AWS environment for the keys).

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
import sys

from mae.checkpoint import image_size_of, model_from_checkpoint, model_state
from mae.export import save_hf
from mae.model import preset
from pipelines.common.checkpoints import add_checkpoint_options, read_checkpoint
from pipelines.worker.tasks import TASKS, recorded_task


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_options(ap, "checkpoint.pth of ours, an official MAE .pth, or a run directory")
    ap.add_argument("--to", choices=["timm", "hf"], default="timm",
                    help="timm: the encoder as a VisionTransformer (.safetensors); hf: the whole model as "
                         "transformers' ViTMAEForPreTraining (a folder)")
    ap.add_argument("--out", required=True, help="file (timm, .safetensors) or folder (hf) to write")
    ap.add_argument("--norm-pix-loss", choices=["true", "false"], default=None,
                    help="hf: the config's norm_pix_loss for an official checkpoint, which does not record it "
                         "(ours do); true for the *_full.pth pretraining weights")
    return ap.parse_args(argv)


def export_hf(ckpt: dict, out: str, norm_pix_loss: bool | None) -> str:
    """Write the Hugging Face folder of a checkpoint (with its decoder); a line saying what."""
    model, name = model_from_checkpoint(ckpt, norm_pix_loss=norm_pix_loss, require_decoder=True)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    mask_ratio = config.get("model", {}).get("mask_ratio", 0.75)
    img_size = image_size_of(model_state(ckpt))
    save_hf(model.state_dict(), preset(name), img_size, model.norm_pix_loss, out, mask_ratio)
    return (f"wrote {out}: transformers ViTMAEForPreTraining ({name}, {img_size}px, norm_pix_loss="
            f"{model.norm_pix_loss}); load it with ViTMAEForPreTraining.from_pretrained({out!r})")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint, args.s3_endpoint, args.s3_region, args.s3_credentials_file)
    except (ValueError, OSError) as e:  # missing, unreadable (S3), or a credentials file refused
        print(f"error: {e}", file=sys.stderr)
        return 2
    task = TASKS[recorded_task(ckpt)]
    try:
        if args.to == "hf" and task.classifies:
            raise ValueError("--to hf: this is a classifier (fine-tuned or linear probe); it exports to timm "
                             "(--to timm)")
        if args.to == "hf":
            print(export_hf(ckpt, args.out, None if args.norm_pix_loss is None else args.norm_pix_loss == "true"))
        else:
            print("\n".join(task.export_timm(ckpt, args.out)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
