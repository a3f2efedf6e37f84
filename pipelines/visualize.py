"""Reconstruction figure from any MAE checkpoint (ours or the official release's).

    python pipelines/visualize.py --checkpoint runs/demo --images data/digits/val --out reconstructions.png \\
        [--mask-ratio 0.75] [--seed 0]

--checkpoint is a checkpoint file or a run directory (its latest checkpoint), local or on S3
(s3://bucket/prefix, with --s3-endpoint for MinIO or Ceph, --s3-credentials-file or the usual
AWS environment for the keys).

One row per image (at most --max-images, spread evenly over the sorted files; folders are
searched recursively), four columns: original, masked input, reconstruction, reconstruction with the
visible patches pasted back. With norm_pix_loss the prediction is un-normalised with each
patch's own mean and variance. Our checkpoints record norm_pix_loss; for official ones pass
--norm-pix-loss true for the `*_full.pth` pretraining weights (the `mae_visualize_*` ones
were trained without it, the default).
"""
import argparse
import os
import sys

import pyarrow.fs as pafs
import torch

from mae.checkpoint import model_from_checkpoint
from mae.transforms import eval_crops, normalize_on_device
from mae.view import evenly_spaced
from mae.visualize import grid_png, reconstruct
from pipelines.common.checkpoints import add_checkpoint_options, read_checkpoint
from pipelines.data.reading import IMAGE_EXTENSIONS, list_images, read_file


def image_files(sources: list[str], limit: int) -> list[str]:
    files = []
    for src in sources:
        if os.path.isdir(src):
            files += list_images(pafs.LocalFileSystem(), os.path.abspath(src))
        elif os.path.isfile(src):
            files.append(src)
        else:
            raise ValueError(f"--images: no such file or folder {src!r}")
    if not files:
        raise ValueError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {sources}")
    return evenly_spaced(files, limit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_options(ap, "checkpoint.pth (ours or official) or a run directory")
    ap.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--max-images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="seed of the masks")
    ap.add_argument("--norm-pix-loss", choices=["true", "false"], default=None,
                    help="override what the checkpoint records (official checkpoints record nothing)")
    args = ap.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint, args.s3_endpoint, args.s3_region, args.s3_credentials_file)
    except (ValueError, OSError) as e:  # missing, unreadable (S3), or a credentials file refused
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        norm_pix = None if args.norm_pix_loss is None else args.norm_pix_loss == "true"
        model, name = model_from_checkpoint(ckpt, norm_pix)
        files = image_files(args.images, args.max_images)
        size = model.patch_embed.img_size[0]
        crops = eval_crops([read_file(pafs.LocalFileSystem(), os.path.abspath(f)) for f in files], size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    imgs = normalize_on_device(crops, torch.device("cpu"))
    noise = torch.rand(len(imgs), model.patch_embed.num_patches, generator=torch.Generator().manual_seed(args.seed))
    panels = reconstruct(model.eval(), imgs, args.mask_ratio, noise)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(grid_png(panels, title=f"{name}, mask ratio {args.mask_ratio}"))
    print(f"wrote {args.out}: {len(files)} images, {name} at {size}px, norm_pix_loss={model.norm_pix_loss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
