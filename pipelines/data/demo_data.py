"""The demo dataset: scikit-learn's 1,797 real handwritten digits (shipped inside the
package, no download), written as JPEG files in the ImageFolder layout.

    python pipelines/data/demo_data.py data/digits
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


def write_photos(root: str | os.PathLike, num_images: int, num_classes: int = 4, size: tuple[int, int] = (500, 375),
                 quality: int = 90, noise: float = 10.0, seed: int = 0) -> Path:
    """Write `<root>/train/<class>/<n>.JPEG`: `num_images` photographs at ImageNet's typical
    size and quality, each a different random view (crop, flip, brightness) of
    scikit-learn's two bundled sample photos with sensor-like grain (`noise`, the std of
    Gaussian pixel noise) so that files weigh about what ImageNet's do (80 kB at
    500x375, q90; ImageNet averages about 110 kB); idempotent. For benchmarks and tests of the
    ingest path, where decode cost must be that of real photos."""
    from sklearn.datasets import load_sample_images

    root = Path(root)
    if (root / COMPLETE_MARKER).exists():
        return root
    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640x427 each
    rng = np.random.default_rng(seed)
    for n in range(num_images):
        photo = photos[n % len(photos)]
        scale = rng.uniform(0.55, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        view = photo.crop((left, top, left + w, top + h)).resize(size if n % 5 else size[::-1], Image.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(view, dtype=np.float32) * rng.uniform(0.8, 1.2)
        pixels += rng.normal(0.0, noise, pixels.shape)  # sensor grain: real photos' detail and file size
        view = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        folder = root / "train" / f"n{n % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        view.save(folder / f"{n:06d}.JPEG", quality=quality)
    (root / COMPLETE_MARKER).write_text(f"{num_images} train\n")
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    args = ap.parse_args()
    print(f"demo dataset at {write_digits(args.root)}")


if __name__ == "__main__":
    main()
