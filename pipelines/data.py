"""Local image folders for evaluation and figures (the training stream is in sources.py)."""
import os
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from mae.transforms import decode_rgb, eval_resize_crop
from pipelines.sources import IMAGE_EXTENSIONS, DataError, evenly_spaced
from pipelines.sources import list_imagefolder as _list_files_and_classes

__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageFolder", "evenly_spaced", "eval_crops", "list_imagefolder"]


@dataclass(frozen=True)
class ImageFolder:
    """The file listing of `<root>/<split>/<class>/<image>`, classes sorted by name."""
    root: str
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_imagefolder(root: str, split: str = "train") -> ImageFolder:
    paths, classes = _list_files_and_classes(pafs.LocalFileSystem(), os.path.abspath(root), split)
    index = {c: i for i, c in enumerate(classes)}
    return ImageFolder(root, paths, [index[p.rsplit("/", 2)[-2]] for p in paths], classes)


def eval_crops(images: list, size: int) -> torch.Tensor:
    """Local image files (paths) or encoded bytes -> uint8 [N, size, size, 3], resized and
    centre-cropped."""
    crops = []
    for item in images:
        if isinstance(item, str):
            with open(item, "rb") as f:
                item = f.read()
        crops.append(eval_resize_crop(decode_rgb(item), size))
    return torch.stack(crops)
