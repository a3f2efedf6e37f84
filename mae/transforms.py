"""Image transforms of the recipe, split where the data crosses to the accelerator.

CPU side (data workers): decode encoded bytes to RGB, RandomResizedCrop(scale=(0.2, 1.0),
bicubic) and horizontal flip on uint8, giving uint8 HWC crops. Device side (train worker):
uint8 -> float, /255, ImageNet mean/std, NCHW.

A plain JPEG is cropped before it is decoded: the crop is drawn from the header's size and
only its rows and columns are decoded (`csrc/jpeg_region.c`), with the pixels of decoding
the whole image and cropping. Without that compiled module, or for other files, the whole
image is decoded.
"""
import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

try:
    import mae_jpeg_region as _jpeg_region
except ImportError:  # not built: setup.py needs a C compiler and libjpeg's headers
    _jpeg_region = None
REGION_DECODE = _jpeg_region is not None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB (grayscale, CMYK and PNG included).

    Raises ValueError when the bytes are not a decodable image.
    """
    if not data:
        raise ValueError("not a decodable image: empty file")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:  # formats libjpeg-turbo / libpng refuse but PIL reads
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"not a decodable image: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's RandomResizedCrop draws them."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: central crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop_flip(img: torch.Tensor, size: int, rng: np.random.Generator,
                     scale=(0.2, 1.0)) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [size, size, 3]: RandomResizedCrop (bicubic) + random h-flip."""
    top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], rng, scale)
    return _resize_flip(img[:, top:top + h, left:left + w], size, rng)


def _resize_flip(crop: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    out = TF.resize(crop, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if rng.random() < 0.5:
        out = out.flip(-1)
    return out.permute(1, 2, 0)


def jpeg_crop_flip(data: bytes, size: int, rng: np.random.Generator, scale=(0.2, 1.0)) -> torch.Tensor | None:
    """`random_crop_flip(decode_rgb(data), ...)` for a complete RGB or grayscale JPEG,
    decoding only the crop (the rows below it are never read, the inverse DCT of the rows
    above and the columns beside it is skipped): the same draws from `rng`, the same pixels.
    None where it does not apply (module not built, CMYK, no end-of-image marker, a libjpeg
    warning or error); the caller then decodes the whole image (the draws made here are
    spent)."""
    if _jpeg_region is None or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    try:
        height, width, fits = _jpeg_region.size(data)
        if not fits:
            return None
        top, left, h, w = random_resized_crop_params(height, width, rng, scale)
        region = torch.empty((h, w, 3), dtype=torch.uint8)
        if not _jpeg_region.decode_region(data, top, left, h, w, region.numpy()):
            return None
    except ValueError:
        return None
    return _resize_flip(region.permute(2, 0, 1), size, rng)


def decode_crop_batch(blobs, size: int, rng: np.random.Generator, scale=(0.2, 1.0), augment: bool = True):
    """Decode + crop + flip a batch of encoded images (`augment=False`: resize + centre
    crop instead, the evaluation view).

    Returns (uint8 array [B_ok, size, size, 3], indices of the blobs that decoded, errors
    as {index: message} for the ones that did not).
    """
    images = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    ok, errors = [], {}
    for i, data in enumerate(blobs):
        crop = jpeg_crop_flip(data, size, rng, scale) if augment else None
        try:
            if crop is None:
                crop = random_crop_flip(decode_rgb(data), size, rng, scale) if augment else eval_view(data, size)
        except ValueError as e:
            errors[i] = str(e)
            continue
        torch.from_numpy(images[len(ok)]).copy_(crop)
        ok.append(i)
    images = images[:len(ok)]
    return images, ok, errors


def normalize_on_device(images: torch.Tensor, device: torch.device, dtype=torch.float32,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] (any device) -> normalised float [N, 3, H, W] on `device`:
    one copy into the output (uint8 -> float, NHWC -> NCHW), then two in-place passes.

    `out`, when it has the output's shape, dtype and device, is written instead of a new
    tensor. On the CPU that matters: every fresh page of a new batch-sized tensor is a page
    fault, which costs more than the arithmetic of normalising it."""
    x = images.to(device, non_blocking=True)
    shape = (x.shape[0], 3, x.shape[1], x.shape[2])
    if out is None or out.shape != shape or out.dtype != dtype or out.device != torch.device(device):
        out = torch.empty(shape, device=device, dtype=dtype)
    out.copy_(x.permute(0, 3, 1, 2))
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1) * 255)
    return out.sub_(mean).mul_(inv_std)


def eval_resize_crop(img: torch.Tensor, size: int, crop_pct: float = 224 / 256) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [size, size, 3]: resize the short side to size / crop_pct
    (bicubic), centre crop; the deterministic view used for evaluation and figures."""
    short = int(round(size / crop_pct))
    out = TF.resize(img, short, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(out, [size, size]).permute(1, 2, 0)


def eval_view(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 [size, size, 3]: the evaluation view (`eval_resize_crop`
    of the decoded image), as figures, evaluation and the stream's `augment=False` show it.
    Raises ValueError when the bytes are not a decodable image."""
    return eval_resize_crop(decode_rgb(data), size)


def eval_crops(blobs, size: int) -> torch.Tensor:
    """`eval_view` of each of a list of encoded images -> uint8 [N, size, size, 3]."""
    return torch.stack([eval_view(data, size) for data in blobs])
