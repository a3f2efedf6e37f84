import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import Normalize, ToTensor

from mae.transforms import (REGION_DECODE, _jpeg_region, decodable, decode_crop_batch, decode_rgb, eval_resize_crop,
                            eval_short_side, jpeg_crop_flip, normalize_on_device, random_crop_flip,
                            random_resized_crop_params)


def _encode(img: Image.Image, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _photo(h=48, w=64) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr)


def _official_eval_transform(input_size: int):
    """The evaluation transform of the official MAE code (util/datasets.py build_transform,
    is_train=False), up to its ToTensor/Normalize."""
    from torchvision import transforms
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return size, transforms.Compose([transforms.Resize(size, interpolation=Image.BICUBIC),
                                     transforms.CenterCrop(input_size)])


@pytest.mark.parametrize("size", [32, 224, 384, 448])
def test_eval_view_is_the_official_one_at_every_size(size):
    official_short, official = _official_eval_transform(size)
    assert eval_short_side(size) == official_short  # 36, 256, 384, 448
    photo = _photo(375, 500)
    theirs = np.asarray(official(photo))
    ours = eval_resize_crop(torch.from_numpy(np.array(photo)).permute(2, 0, 1), size).numpy()
    assert ours.shape == theirs.shape == (size, size, 3) and ours.dtype == np.uint8
    # the same pixels: PIL's and torch's antialiased bicubic differ by rounding; another short
    # side or crop offset (round(size / 0.875) everywhere: 37, 439, 512) gives noise vs noise
    blur = [np.asarray(Image.fromarray(a).filter(ImageFilter.BoxBlur(1)), dtype=np.float32) for a in (ours, theirs)]
    assert np.abs(blur[0] - blur[1]).mean() < 2.0


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_decode_to_rgb(mode):
    data = _encode(_photo().convert(mode))
    img = decode_rgb(data)
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 64)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - expected).mean() < 3


def test_png_saved_as_jpeg_decodes():
    img = decode_rgb(_encode(_photo(), "PNG"))
    assert img.shape == (3, 48, 64)
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(np.asarray(_photo())))


@pytest.mark.parametrize("data", [b"", b"not an image", _encode(_photo())[:200]])
def test_undecodable_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_rgb(data)


def test_held_out_images_are_picked_from_those_that_decode_evenly_spaced():
    """The figures' images, from the driver's undecoded candidates (Source.held_out)."""
    good = [_encode(_photo().rotate(k)) for k in range(6)]
    candidates = [b"junk", good[0], good[1], b"", good[2], good[3], good[4][:200], good[4], good[5]]
    assert decodable(candidates, 3) == [good[0], good[2], good[4]]
    assert decodable(candidates, 10) == good and decodable([b"junk"], 8) == []


def test_crop_params_within_bounds_and_scale():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        top, left, h, w = random_resized_crop_params(375, 500, rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        areas.append(h * w / (375 * 500))
    assert 0.19 <= min(areas) < 0.3 and max(areas) > 0.9


def test_crop_flip_gives_uint8_hwc_and_batch_skips_bad_files():
    good = _encode(_photo())
    images, ok, errors = decode_crop_batch([good, b"junk", good], 32, np.random.default_rng(0))
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    assert ok == [0, 2] and list(errors) == [1]
    # full-image crop without flip is a bicubic resize; flips happen about half the time
    img = decode_rgb(good)
    flips = [torch.equal(random_crop_flip(img, 16, np.random.default_rng(s), scale=(1.0, 1.0)),
                         random_crop_flip(img, 16, np.random.default_rng(s), scale=(1.0, 1.0)).flip(1))
             for s in range(20)]
    assert not any(flips)  # same seed, same result: never equal to its own mirror image


def test_normalize_on_device_equals_totensor_normalize():
    arr = (np.random.default_rng(1).random((2, 8, 8, 3)) * 255).astype(np.uint8)
    ours = normalize_on_device(torch.from_numpy(arr), torch.device("cpu"))
    norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ref = torch.stack([norm(ToTensor()(a)) for a in arr])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_normalize_on_device_writes_into_a_given_tensor():
    arr = torch.from_numpy((np.random.default_rng(2).random((2, 8, 8, 3)) * 255).astype(np.uint8))
    out = torch.full((2, 3, 8, 8), float("nan"))
    ours = normalize_on_device(arr, torch.device("cpu"), out=out)
    assert ours.data_ptr() == out.data_ptr()
    torch.testing.assert_close(ours, normalize_on_device(arr, torch.device("cpu")), rtol=0, atol=0)
    wrong_shape = torch.empty((3, 3, 8, 8))  # a last, smaller batch: a new tensor, the given one untouched
    assert normalize_on_device(arr, torch.device("cpu"), out=wrong_shape).shape == (2, 3, 8, 8)


def _needs_region_decode():
    """The compiled module is optional for users, required in CI (.ci/run sets
    MAE_REQUIRE_JPEG_REGION) so a broken build cannot pass unnoticed."""
    if not REGION_DECODE:
        if os.environ.get("MAE_REQUIRE_JPEG_REGION"):
            pytest.fail("mae_jpeg_region is not built (setup.py: a C compiler and libjpeg's headers)")
        pytest.skip("mae_jpeg_region is not built")


def _scene(h=150, w=200) -> Image.Image:
    """Smooth colour gradients plus noise: chroma that varies between neighbouring pixels,
    so any difference in chroma upsampling at a region's edge shows."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1) + rng.normal(0, 40, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


JPEG_KINDS = {"4:2:0": dict(subsampling=2), "4:2:2": dict(subsampling=1), "4:4:4": dict(subsampling=0),
              "progressive": dict(subsampling=2, progressive=True), "grayscale": dict(mode="L")}


@pytest.mark.parametrize("kind", JPEG_KINDS)
def test_region_decode_gives_the_pixels_of_the_whole_image(kind):
    _needs_region_decode()
    opts = dict(JPEG_KINDS[kind])
    img = _scene().convert(opts.pop("mode", "RGB"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **opts)
    data = buf.getvalue()
    whole = decode_rgb(data).permute(1, 2, 0)
    assert _jpeg_region.size(data) == (150, 200, True)
    windows = [(0, 0, 150, 200), (0, 0, 1, 1), (149, 199, 1, 1), (7, 9, 30, 41), (17, 33, 100, 150),
               (40, 160, 110, 40), (120, 0, 30, 17)]
    for top, left, h, w in windows:
        region = torch.empty((h, w, 3), dtype=torch.uint8)
        assert _jpeg_region.decode_region(data, top, left, h, w, region.numpy()) is True
        assert torch.equal(region, whole[top:top + h, left:left + w]), (top, left, h, w)
    for seed in range(30):  # the crop and flip of the whole-image path, draw for draw
        fast = jpeg_crop_flip(data, 64, np.random.default_rng(seed))
        assert torch.equal(fast, random_crop_flip(decode_rgb(data), 64, np.random.default_rng(seed))), seed


def test_region_decode_leaves_other_files_to_the_whole_image_path():
    _needs_region_decode()
    rng = np.random.default_rng(0)
    jpeg = _encode(_scene())
    for data in [_encode(_scene().convert("CMYK")), _encode(_scene(), "PNG"), jpeg[:-2], jpeg[:300], b"", b"junk"]:
        assert jpeg_crop_flip(data, 32, rng) is None
    with pytest.raises(ValueError, match="outside the image"):
        _jpeg_region.decode_region(jpeg, 140, 0, 20, 10, bytearray(20 * 10 * 3))
    with pytest.raises(ValueError, match="height \\* width \\* 3"):
        _jpeg_region.decode_region(jpeg, 0, 0, 20, 10, bytearray(5))
    with pytest.raises(ValueError, match="JPEG header"):
        _jpeg_region.size(b"\xff\xd8junk")
    # the batch path still decodes those files whole (CMYK, PNG) or skips them
    images, ok, errors = decode_crop_batch([_encode(_scene().convert("CMYK")), jpeg[:300], jpeg], 32, rng)
    assert ok == [0, 2] and list(errors) == [1]


def test_region_decode_refuses_negative_out_of_range_and_wrapping_arguments():
    """Each of these once reached libjpeg: "I" parsing took -1 as 4294967295 and 2**32 + 10
    as 10, and top + height wrapped in 32 bits, so the region passed the bounds check."""
    _needs_region_decode()
    jpeg = _encode(_scene())  # 150 x 200
    cases = {  # (top, left, height, width, out bytes) -> what the error names
        (-1, 0, 10, 10, 300): ">= 0", (0, -1, 10, 10, 300): ">= 0", (0, 0, 0, 10, 0): "> 0",
        (0, 0, 10, -3, 300): "> 0",
        (2**32 - 5, 0, 10, 10, 300): "outside the image",  # 32-bit top + height wraps to 5
        (0, 2**32 - 1, 10, 1, 30): "outside the image",
        (0, 0, 2**32 + 10, 10, 300): "outside the image",  # taken as 10 rows by "I"
        (0, 0, 2**31, 2**31, 300): "outside the image",  # larger than any JPEG, refused before the product
        (2**64, 0, 10, 10, 300): "fit in a Py_ssize_t", (1.5, 0, 10, 10, 300): "fit in a Py_ssize_t",
        (140, 0, 20, 10, 600): "outside the image", (0, 190, 10, 20, 600): "outside the image",
        (0, 0, 10, 10, 299): "height \\* width \\* 3",
    }
    for (top, left, h, w, size), message in cases.items():
        with pytest.raises(ValueError, match=message):
            _jpeg_region.decode_region(jpeg, top, left, h, w, bytearray(size))
    with pytest.raises(ValueError, match="empty"):
        _jpeg_region.decode_region(b"", 0, 0, 1, 1, bytearray(3))


FUZZ = """
import io, json, sys
import numpy as np
from PIL import Image
import mae_jpeg_region as region
from mae.transforms import decode_crop_batch

rng = np.random.default_rng(int(sys.argv[1]))
y, x = np.mgrid[0:96, 0:128]
scene = np.stack([x * 2, y * 2, (x + y)], -1) + rng.normal(0, 40, (96, 128, 3))
photos = []
for opts in (dict(subsampling=2), dict(subsampling=0), dict(subsampling=2, progressive=True), dict()):
    buf = io.BytesIO()
    img = Image.fromarray(scene.clip(0, 255).astype(np.uint8))
    (img.convert("L") if not opts else img).save(buf, format="JPEG", quality=90, **opts)
    photos.append(buf.getvalue())
outcomes = {"decoded": 0, "refused": 0}
for n in range(int(sys.argv[2])):
    data = bytearray(photos[n % len(photos)])
    for _ in range(int(rng.integers(1, 12))):  # flipped bytes anywhere, header included
        data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
    if rng.random() < 0.3:
        data = data[:int(rng.integers(2, len(data)))] + (b"\\xff\\xd9" if rng.random() < 0.5 else b"")
    data = bytes(data)
    try:
        height, width, _ = region.size(data)
    except ValueError:
        height, width = 96, 128
    for _ in range(4):  # windows inside the header's size, and past it
        h, w = int(rng.integers(1, height + 20)), int(rng.integers(1, width + 20))
        top, left = int(rng.integers(0, height + 10)), int(rng.integers(0, width + 10))
        out = np.full((h, w, 3), 7, dtype=np.uint8)
        try:
            assert region.decode_region(data, top, left, h, w, out) in (True, False)
            outcomes["decoded"] += 1
        except ValueError:
            outcomes["refused"] += 1
    decode_crop_batch([data], 32, rng)  # the stream's path: decoded (region or whole) or skipped
print(json.dumps(outcomes))
"""


def test_region_decode_survives_mutated_jpegs():
    """Hundreds of seeded random mutations of real JPEGs (flipped bytes, truncations), each
    decoded in windows inside and outside its header's size, in a child process, so that a
    crash fails this test instead of the suite. Every call gives a result or a ValueError."""
    _needs_region_decode()
    from conftest import ROOT
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", FUZZ, "0", "400"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 100  # both paths were exercised
