"""The demo dataset: scikit-learn's 1,797 real handwritten digits (shipped inside the
package, no download), written as JPEG files in the ImageFolder layout.

    python pipelines/demo_data.py data/digits
"""
import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

COMPLETE_MARKER = ".complete"


def write_digits(root: str | os.PathLike, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write `<root>/{train,val}/<digit>/<n>.JPEG` (RGB, `size` px); idempotent."""
    from sklearn.datasets import load_digits

    root = Path(root)
    if (root / COMPLETE_MARKER).exists():
        return root
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_val = int(len(order) * val_fraction)
    for rank, idx in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = root / split / str(digits.target[idx])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 8x8, 0..16
        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        img.save(folder / f"{idx:04d}.JPEG", quality=95)
    (root / COMPLETE_MARKER).write_text(f"{len(order) - n_val} train, {n_val} val\n")
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    args = ap.parse_args()
    print(f"demo dataset at {write_digits(args.root)}")


if __name__ == "__main__":
    main()
