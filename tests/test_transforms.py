import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import Normalize, ToTensor

from mae.transforms import (decode_crop_batch, decode_rgb, normalize_on_device, random_crop_flip,
                            random_resized_crop_params)


def _encode(img: Image.Image, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _photo(h=48, w=64) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr)


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
