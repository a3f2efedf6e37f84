"""How much does decoding only the crop save, per image, on one core?

    python benchmarks/jpeg_region.py --data IMAGEFOLDER [--images 600] [--size 224] [--repeats 3]

In one process, on one torch thread, over the same JPEG bytes (read into memory first)
and the same crop and flip draws, it times:
  (a) the baseline: decode the whole image (`torchvision.io.decode_image`), then
      RandomResizedCrop(scale=(0.2, 1.0), bicubic) + flip on uint8 (`random_crop_flip`);
  (b) ours: draw the crop from the JPEG header, decode only its rows and columns
      (`csrc/jpeg_region.c`), resize + flip (`jpeg_crop_flip`); files it does not take
      are decoded whole, as the stream does.
It checks that both give the same crops, and prints ms per image for each (best of
`--repeats` passes). Last line: JSON with `baseline_ms_per_image`, `ours_ms_per_image`
and `ratio` = baseline / ours (the speed-up).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae.transforms import REGION_DECODE, decode_rgb, jpeg_crop_flip, random_crop_flip  # noqa: E402
from pipelines.data.reading import list_images, read_file  # noqa: E402


def per_image_ms(crop, blobs: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for data in blobs:
            crop(data, rng)
        best = min(best, time.perf_counter() - start)
    return best / len(blobs) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an ImageFolder root (<data>/train/<class>/<file>) or a folder of JPEGs")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not REGION_DECODE:
        sys.exit("mae_jpeg_region is not built: see setup.py (a C compiler and libjpeg's headers)")
    fs = pafs.LocalFileSystem()
    files = [f for f in list_images(fs, os.path.abspath(args.data)) if f.lower().endswith((".jpg", ".jpeg"))]
    if not files:
        sys.exit(f"--data: no .jpg/.jpeg files under {args.data}")
    blobs = [read_file(fs, f) for f in files[:args.images]]
    torch.set_num_threads(1)

    def whole(data, rng):
        return random_crop_flip(decode_rgb(data), args.size, rng)

    def region(data, rng):  # as decode_crop_batch does: the whole image where the region path does not apply
        crop = jpeg_crop_flip(data, args.size, rng)
        return crop if crop is not None else whole(data, rng)

    pairs = ((whole(d, np.random.default_rng(i)), jpeg_crop_flip(d, args.size, np.random.default_rng(i)))
             for i, d in enumerate(blobs))
    fits = [(a, b) for a, b in pairs if b is not None]
    if not fits:
        sys.exit(f"--data: none of the {len(blobs)} files is a JPEG the region decoder takes")
    assert all(torch.equal(a, b) for a, b in fits), "region and whole-image crops differ"
    base = per_image_ms(whole, blobs, args.repeats)
    print(f"(a) whole image + RandomResizedCrop + flip: {base:.3f} ms/image ({len(blobs)} files from {args.data})")
    ours = per_image_ms(region, blobs, args.repeats)
    print(f"(b) crop's region only + resize + flip:     {ours:.3f} ms/image "
          f"({len(fits)} of {len(blobs)} took this path, the same crops)")
    print(json.dumps({"baseline_ms_per_image": base, "ours_ms_per_image": ours, "ratio": base / ours}))


if __name__ == "__main__":
    main()
