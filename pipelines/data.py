"""Ray Data streams of training images: encoded bytes in, uint8 HWC crops out."""
import logging
import os
from dataclasses import dataclass

import numpy as np
import ray.data

import torch

from mae.transforms import decode_crop_batch, decode_rgb, eval_resize_crop

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageFolder:
    """The file listing of `<root>/<split>/<class>/<image>`, classes sorted by name."""
    root: str
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


class DataError(ValueError):
    """The data path does not hold what the config says it holds."""


def list_imagefolder(root: str, split: str = "train") -> ImageFolder:
    top = os.path.join(root, split)
    if not os.path.isdir(top):
        raise DataError(f"data.path: {root!r} has no {split}/ folder (expected {top}/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(top) if e.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(os.path.join(top, name)) if e.is_file())
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(top, name, f))
                labels.append(label)
    if not paths:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {top}/<class>/")
    return ImageFolder(root, paths, labels, classes)


def evenly_spaced(items: list, n: int) -> list:
    """At most `n` items spread over the whole list (so a sorted listing shows several classes)."""
    return [items[i * len(items) // n] for i in range(min(n, len(items)))]


def held_out_images(root: str, size: int, n: int = 8) -> torch.Tensor:
    """A fixed set of `n` images for reconstruction figures: from `val/` when the dataset
    has one (else `train/`), evenly spaced over the sorted listing so several classes show.
    Returns uint8 [n, size, size, 3] (resize + centre crop)."""
    split = "val" if os.path.isdir(os.path.join(root, "val")) else "train"
    paths = list_imagefolder(root, split).paths
    return eval_crops(evenly_spaced(paths, n), size)


def eval_crops(paths: list[str], size: int) -> torch.Tensor:
    """Local image files -> uint8 [N, size, size, 3], resized and centre-cropped."""
    crops = []
    for path in paths:
        with open(path, "rb") as f:
            crops.append(eval_resize_crop(decode_rgb(f.read()), size))
    return torch.stack(crops)


class DecodeCrop:
    """Fused decode + RandomResizedCrop + flip of a batch of encoded images.

    Each call draws fresh crops from OS entropy, so every epoch sees new crops. Files that
    do not decode are logged with their path and dropped.
    """

    def __init__(self, size: int, class_index: dict[str, int]):
        self.size = size
        self.class_index = class_index

    def __call__(self, batch: dict) -> dict:
        images, ok, errors = decode_crop_batch(batch["bytes"], self.size, np.random.default_rng())
        for i, msg in errors.items():
            logger.warning("skipping %s: %s", batch["path"][i], msg)
        paths = [batch["path"][i] for i in ok]
        labels = np.array([self.class_index[os.path.basename(os.path.dirname(p))] for p in paths],
                          dtype=np.int64)
        return {"image": images, "label": labels}


def imagefolder_stream(folder: ImageFolder, input_size: int, seed: int,
                       decode_batch_size: int) -> ray.data.Dataset:
    """File order reshuffled every epoch (seeded by `seed` and the epoch's execution),
    bytes read by Ray, decoded and cropped in one `map_batches` step on CPU."""
    ds = ray.data.read_binary_files(
        folder.paths, include_paths=True,
        shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True))
    class_index = {name: i for i, name in enumerate(folder.classes)}
    return ds.map_batches(DecodeCrop(input_size, class_index), batch_size=decode_batch_size,
                          batch_format="numpy")
