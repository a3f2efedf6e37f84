"""Image transforms of the recipe, split where the data crosses to the accelerator.

CPU side (data workers): decode encoded bytes to RGB, RandomResizedCrop(scale=(0.2, 1.0),
bicubic) and horizontal flip on uint8, giving uint8 HWC crops. Device side (train worker):
uint8 -> float, /255, ImageNet mean/std, NCHW.

A plain JPEG is cropped before it is decoded: the crop is drawn from the header's size and
only its rows and columns are decoded (`csrc/jpeg_region.c`), with the pixels of decoding
the whole image and cropping. Without that compiled module, or for other files, the whole
image is decoded.

Every decode path first reads the image's size from its header (`image_size`) and refuses,
with a ValueError, a file over the pixel or byte budget (`check_limits`), so a small file that
claims a huge image never gets its pixels allocated. Only the formats the readers take
(`FORMATS`) are read at all: formats whose decoded size is not the header's (a TIFF's tiles, an
ICO's or ICNS's embedded PNG, an AVIF's size box) are refused by their content, whatever the
file's name; Pillow's own limit is `data.max_pixels` while it opens and decodes.
"""
import io
import math
import random
import re
import struct
import warnings
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mae.view import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, PRETRAIN, Augment,  # noqa: F401 (this module's too)
                      evenly_spaced)

try:
    import mae_jpeg_region as _jpeg_region
except ImportError:  # not built: setup.py needs a C compiler and libjpeg's headers
    _jpeg_region = None
REGION_DECODE = _jpeg_region is not None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What the readers take (`pipelines/data/reading.py`'s extensions, and GIF, whose first frame
# is decoded): in each of them the header's size is the size decoded.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_MARKER = re.compile(rb"\xff[^\xff]")  # the last 0xFF of a run (fill bytes) and the marker's code
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-SOF15 but DHT, JPG, DAC


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the first frame header (SOFn), stepping over the segments
    before it by their lengths (APPn segments, EXIF thumbnails included, are skipped whole).
    Bytes between segments that are not a marker are passed over, as libjpeg passes them."""
    pos = 2
    while True:
        m = _JPEG_MARKER.search(data, pos)
        if m is None:
            raise ValueError("not a decodable image: JPEG header ends before its frame header")
        code, pos = data[m.end() - 1], m.end()
        if code in (0x00, 0x01) or 0xD0 <= code <= 0xD7:  # stuffed zero, TEM, RSTn: no length
            continue
        if code in (0xD8, 0xD9, 0xDA):  # SOI, EOI, SOS before any frame header
            raise ValueError(f"not a decodable image: JPEG marker 0x{code:02X} before its frame header")
        if pos + 2 > len(data):
            raise ValueError("not a decodable image: JPEG header ends inside a segment")
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            raise ValueError(f"not a decodable image: JPEG segment length {length}")
        if code in _JPEG_SOF:  # length, precision, height, width, components
            if pos + 7 > len(data):
                raise ValueError("not a decodable image: JPEG header ends inside its frame header")
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return height, width
        pos += length


@contextmanager
def pil_budget(max_pixels: int | None):
    """Pillow's own pixel limit at `max_pixels` inside the block, an error (ValueError naming
    data.max_pixels) rather than a warning: it guards the sizes Pillow meets after the header
    (a GIF's first frame beyond its screen). None: Pillow's default limit, as an error too.
    One decode at a time per process, as Ray's data tasks run."""
    previous = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        limit = f"data.max_pixels={max_pixels}" if max_pixels is not None else "Pillow's limit"
        raise ValueError(f"image over {limit} as Pillow reads it: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _unaccepted(data: bytes) -> str:
    """The error for bytes in none of `FORMATS`, naming the format Pillow would have read."""
    def accepts(accept) -> bool:
        try:
            return bool(accept(data[:32]))
        except Exception:  # a plugin's check of a few bytes shorter than it reads
            return False
    Image.init()
    known = next((name for name, (_, accept) in Image.OPEN.items()
                  if accept is not None and name not in FORMATS and accepts(accept)), None)
    what = f"{known} content" if known else f"no accepted format starts {data[:8]!r}"
    return f"not a decodable image: {what}; the readers take {', '.join(FORMATS)}"


def image_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of encoded image bytes, from the header only: nothing is decoded.

    JPEG from its frame header, PNG from IHDR, BMP, WEBP and GIF from `PIL.Image.open`
    restricted to them, which reads the header lazily (a GIF's first frame header too, under
    `pil_budget(max_pixels)`). Raises ValueError ("not a decodable image: ...") when no size
    can be read or the bytes are in no accepted format (`FORMATS`), whatever the file's name."""
    if not data:
        raise ValueError("not a decodable image: empty file")
    if data[:2] == b"\xff\xd8":
        height, width = _jpeg_size(data)
    elif data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("not a decodable image: PNG without its IHDR chunk")
        width, height = struct.unpack(">II", data[16:24])
    else:
        try:
            with pil_budget(max_pixels), Image.open(io.BytesIO(data), formats=FORMATS[2:]) as im:
                width, height = im.size
        except Image.UnidentifiedImageError:
            raise ValueError(_unaccepted(data)) from None
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"not a decodable image: {e}") from None
    if height == 0 or width == 0:
        raise ValueError(f"not a decodable image: header gives {width}x{height}")
    return height, width


def _file_size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def check_limits(data: bytes, max_pixels: int, max_bytes: int) -> None:
    """Raise ValueError when the encoded file is over `max_bytes` or its header claims more
    than `max_pixels` (height * width), or has no readable size; before anything is decoded."""
    if len(data) > max_bytes:
        raise ValueError(f"encoded image is {_file_size(len(data))}, over data.max_image_bytes={max_bytes}")
    height, width = image_size(data, max_pixels)
    if height * width > max_pixels:
        raise ValueError(f"image is {_file_size(len(data))} but claims {width}x{height} "
                         f"({height * width / 1e6:.1f} MP), over data.max_pixels={max_pixels}")


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB (grayscale, CMYK and PNG included).

    Raises ValueError when the bytes are not a decodable image or are over the budget
    (`check_limits`).
    """
    check_limits(data, max_pixels, max_bytes)
    return _decode_rgb(data, max_pixels)


def _decode_rgb(data: bytes, max_pixels: int) -> torch.Tensor:
    """`decode_rgb` for bytes that passed `check_limits`: one of `FORMATS`, so torchvision's
    decoders (which pick one by the content) see JPEG, PNG or WEBP only, and Pillow the rest."""
    if data[:4] != b"GIF8":  # torchvision decodes every frame of a GIF, PIL the first only
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
        else:  # a 16-bit PNG decodes to uint16: scaled to 8 bits, never wrapped modulo 256
            return img if img.dtype == torch.uint8 else TF.to_dtype(img, torch.uint8, scale=True)
    try:  # formats libjpeg-turbo / libpng refuse but PIL reads
        with pil_budget(max_pixels), Image.open(io.BytesIO(data), formats=FORMATS) as im:
            arr = _pil_rgb(im)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"not a decodable image: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _pil_rgb(im: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image; high-bit grayscale (16-bit "I;16*", and "I", which
    Pillow gives 16-bit files) scaled from 16 bits to 8, where `convert("RGB")` would clip
    every value above 255 to white."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        gray = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


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


def jpeg_crop_flip(data: bytes, size: int, rng: np.random.Generator, scale=(0.2, 1.0),
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """`random_crop_flip(decode_rgb(data), ...)` for a complete RGB or grayscale JPEG,
    decoding only the crop (the rows below it are never read, the inverse DCT of the rows
    above and the columns beside it is skipped): the same draws from `rng`, the same pixels.
    None where it does not apply (module not built, CMYK, no end-of-image marker, libjpeg's
    header over `max_pixels`, a libjpeg warning or error); the caller then decodes the whole
    image, which `check_limits` guards (the draws made here are spent)."""
    if _jpeg_region is None or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    try:
        height, width, fits = _jpeg_region.size(data)
        if not fits or height * width > max_pixels:
            return None
        top, left, h, w = random_resized_crop_params(height, width, rng, scale)
        region = torch.empty((h, w, 3), dtype=torch.uint8)
        if not _jpeg_region.decode_region(data, top, left, h, w, region.numpy()):
            return None
    except ValueError:
        return None
    return _resize_flip(region.permute(2, 0, 1), size, rng)


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's `posterize` op, keeping 0 bits as Pillow < 13 did (a black image): Pillow 13
    refuses 0, which RandAugment's increasing posterize draws at magnitude 10 (m9 with
    mstd0.5 reaches it about 2% of the time it is chosen)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


@lru_cache(maxsize=8)
def rand_augment_op(policy: str, size: int):
    """timm's RandAugment of `policy` for `size` px crops (a PIL image in, one out) with the
    hyper-parameters timm's `create_transform` gives it; it draws from Python's `random` and
    numpy's global generator, as in timm's own pipeline. Its posterize keeps 0 bits
    (`posterize`) where Pillow 13 would raise."""
    from timm.data import auto_augment
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN),
               "interpolation": Image.BICUBIC}
    return with_zero_bit_posterize(auto_augment.rand_augment_transform(policy, hparams))


def with_zero_bit_posterize(rand_augment):
    """`rand_augment` (a timm RandAugment) with our `posterize` in place of timm's."""
    from timm.data import auto_augment
    for each in rand_augment.ops:
        if each.aug_fn is auto_augment.posterize:
            each.aug_fn = posterize
    return rand_augment


def apply_rand_augment(crop: torch.Tensor, policy: str) -> torch.Tensor:
    """uint8 [S, S, 3] -> uint8 [S, S, 3] through `rand_augment_op`."""
    out = rand_augment_op(policy, crop.shape[0])(Image.fromarray(crop.numpy()))
    return torch.from_numpy(np.array(out, dtype=np.uint8))


def decode_crop_batch(blobs, size: int, rng, augment: Augment | None = PRETRAIN,
                      max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES):
    """Decode + crop + flip (+ RandAugment) a batch of encoded images, the view `augment`
    (None: resize + centre crop instead, the evaluation view), each checked against the
    budget (`check_limits`) before it is decoded. `rng`: a numpy Generator for the whole
    batch, or one per image (the stream's: an image's view then depends on its own generator
    only). RandAugment, which draws from Python's `random` and numpy's global generator as
    timm's pipeline does, has both seeded from the image's generator first.

    Returns (uint8 array [B_ok, size, size, 3], indices of the blobs that decoded, errors
    as {index: message} for the ones that did not). Any exception of one image makes it an
    error, never the batch's.
    """
    images = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    ok, errors = [], {}
    rngs = rng if isinstance(rng, (list, tuple)) else [rng] * len(blobs)
    for i, (data, rng) in enumerate(zip(blobs, rngs, strict=True)):
        try:
            check_limits(data, max_pixels, max_bytes)
            crop = jpeg_crop_flip(data, size, rng, augment.scale, max_pixels) if augment else None
            if crop is None:
                img = _decode_rgb(data, max_pixels)
                crop = random_crop_flip(img, size, rng, augment.scale) if augment else eval_resize_crop(img, size)
            if augment and augment.rand_augment:
                seeds = rng.integers(2**32, size=2)
                random.seed(int(seeds[0]))
                np.random.seed(int(seeds[1]))
                crop = apply_rand_augment(crop, augment.rand_augment)
            torch.from_numpy(images[len(ok)]).copy_(crop)
        except ValueError as e:
            errors[i] = str(e)
            continue
        except Exception as e:  # MemoryError, a decoder's RuntimeError or OSError: one skipped file
            errors[i] = f"{type(e).__name__}: {e}"
            continue
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


def eval_short_side(size: int) -> int:
    """The short side the evaluation view resizes to before its centre crop, as the official
    `util/datasets.py` computes it: `int(size / crop_pct)`, crop_pct 224/256 up to 224 px
    (256 for 224, 36 for 32) and 1.0 above (384 and 448 resize to the input size, no crop)."""
    crop_pct = 224 / 256 if size <= 224 else 1.0
    return int(size / crop_pct)


def eval_resize_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [size, size, 3]: resize the short side to `eval_short_side`
    (bicubic), centre crop; the deterministic view used for evaluation and figures."""
    short = eval_short_side(size)
    out = TF.resize(img, short, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(out, [size, size]).permute(1, 2, 0)


def eval_view(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
              max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Encoded image bytes -> uint8 [size, size, 3]: the evaluation view (`eval_resize_crop`
    of the decoded image), as figures, evaluation and the stream's `augment=False` show it.
    Raises ValueError when the bytes are not a decodable image or are over the budget."""
    return eval_resize_crop(decode_rgb(data, max_pixels, max_bytes), size)


def decodable(blobs, n: int) -> list[bytes]:
    """`n` of the encoded images `blobs`, evenly spaced over those that decode (`eval_view`):
    the figures' held-out images, picked where they are decoded from the candidates the
    driver read (pipelines/data/reading.py: `Source.held_out`)."""
    ok = []
    for data in blobs:
        try:
            eval_view(data, 32)
            ok.append(data)
        except ValueError:
            pass
    return evenly_spaced(ok, n)


def eval_crops(blobs, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """`eval_view` of each of a list of encoded images -> uint8 [N, size, size, 3]."""
    return torch.stack([eval_view(data, size, max_pixels, max_bytes) for data in blobs])
