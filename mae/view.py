"""What a decoder makes of an image, as plain data: the training view's parameters, the
decode budget, and which images a figure shows (`evenly_spaced`). No torch here: Ray Data's
planning processes (the split coordinators, the dataset manager) unpickle a stream that holds
these, and need not load torch for it; the pixels are made in `mae.transforms`.
"""
from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 90_000_000  # height * width; well above any ImageNet image
DEFAULT_MAX_BYTES = 64 * 2**20  # size of the encoded file


@dataclass(frozen=True)
class Augment:
    """The random training view the decoders make of an image: RandomResizedCrop (bicubic,
    area fraction in `scale`, aspect ratio 3/4 to 4/3), horizontal flip, then timm's
    RandAugment `rand_augment` (e.g. rand-m9-mstd0.5-inc1) on the crop, with the hyper-
    parameters timm's `create_transform` gives it (translation 45% of the side, fill the
    ImageNet mean, bicubic)."""
    scale: tuple[float, float] = (0.2, 1.0)
    rand_augment: str | None = None


PRETRAIN = Augment()  # the MAE paper's pretraining view


def evenly_spaced(items, n: int) -> list:
    """At most `n` items spread over the whole sequence (so a sorted listing shows several classes)."""
    items = list(items)
    k = min(n, len(items))
    return [items[i * len(items) // k] for i in range(k)]
