"""The pixel and byte budget of every decode path, on real crafted files: JPEGs and a PNG whose
headers claim far more pixels than their few kilobytes hold."""
import functools
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import AvifImagePlugin, IcnsImagePlugin, IcoImagePlugin, Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from mae.transforms import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, PRETRAIN, _jpeg_region, check_limits,
                            decode_crop_batch, decode_rgb, eval_crops, eval_view, image_size, jpeg_crop_flip)
from crafted import FORMAT_BOMBS, avif_claim, icns_png, ico_png, tiff_tile
from test_transforms import _needs_region_decode

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64  # the ordinary image: 3072 pixels


def _photo(h=H, w=W, mode="RGB") -> Image.Image:
    arr = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def _encode(img: Image.Image, fmt="JPEG", **opts) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **opts)
    return buf.getvalue()


def _claim(jpeg: bytes, height: int, width: int) -> bytes:
    """A real JPEG with its SOF0 height and width fields rewritten; nothing else changes."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def png_15000() -> bytes:
    """A complete, valid 15000x15000 1-bit grayscale PNG: every row filter 0 and zero pixels,
    compressed in chunks of rows (the raw 28 MB never exist at once); about 27 KB."""
    n, row_bytes = 15000, 1 + 15000 // 8
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(bytes(row_bytes * 1000)) for _ in range(n // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", n, n, 1, 0, 0, 0, 0)  # width, height, bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def good() -> bytes:
    return _encode(_photo())


def bomb_65500() -> bytes:
    return _claim(good(), 65500, 65500)


def jpeg_15000() -> bytes:
    return _claim(good(), 15000, 15000)


def test_crafted_files_are_what_they_claim():
    """Read by PIL's own parsers (the plugin classes, not `Image.open`, which would refuse them)."""
    assert len(bomb_65500()) < 4096 and len(png_15000()) < 64 * 1024
    assert JpegImagePlugin.JpegImageFile(io.BytesIO(bomb_65500())).size == (65500, 65500)
    assert JpegImagePlugin.JpegImageFile(io.BytesIO(jpeg_15000())).size == (15000, 15000)
    assert PngImagePlugin.PngImageFile(io.BytesIO(png_15000())).size == (15000, 15000)
    if _jpeg_region is not None:
        assert _jpeg_region.size(bomb_65500()) == (65500, 65500, True)


def _with_thumbnail() -> bytes:
    """A JPEG whose APP1 segment holds a whole 10x20 JPEG, with its own frame header, first."""
    return _encode(_photo(37, 53), exif=b"Exif\x00\x00" + _encode(_photo(10, 20)))


FILES = {
    "jpeg": lambda: _encode(_photo(37, 53)),
    "jpeg progressive": lambda: _encode(_photo(37, 53), progressive=True),
    "jpeg grayscale": lambda: _encode(_photo(37, 53, "L")),
    "jpeg cmyk": lambda: _encode(_photo(37, 53, "CMYK")),
    "jpeg exif thumbnail": _with_thumbnail,
    "png": lambda: _encode(_photo(37, 53), "PNG"),
    "png 16-bit": lambda: _encode(_photo(37, 53, "I;16"), "PNG"),
    "bmp": lambda: _encode(_photo(37, 53), "BMP"),
    "webp": lambda: _encode(_photo(37, 53), "WEBP"),
    "gif": lambda: _encode(_photo(37, 53), "GIF"),
}


@pytest.mark.parametrize("kind", FILES)
def test_image_size_reads_real_files_as_pil_and_the_decoder_do(kind):
    data = FILES[kind]()
    width, height = Image.open(io.BytesIO(data)).size
    assert (width, height) == (53, 37)
    assert image_size(data) == (37, 53)
    assert tuple(decode_rgb(data).shape) == (3, 37, 53)


def test_format_bombs_are_what_they_claim():
    """Read by Pillow's own parsers: each header claims a small image, each decoder allocates
    the large one."""
    tiff = TiffImagePlugin.TiffImageFile(io.BytesIO(tiff_tile()))
    assert tiff.size == (16, 16) and (tiff.tag_v2[322], tiff.tag_v2[323]) == (16384, 16384)  # tile width, length
    ico = IcoImagePlugin.IcoFile(io.BytesIO(ico_png()))
    assert ico.entry[0].dim == (256, 256) and image_size(ico_png()[22:]) == (9500, 9500)  # its PNG
    icns = IcnsImagePlugin.IcnsFile(io.BytesIO(icns_png()))
    assert icns.itersizes() == [(512, 512, 1)] and image_size(icns_png()[16:]) == (9500, 9500)
    assert AvifImagePlugin.AvifImageFile(io.BytesIO(avif_claim())).size == (16, 16)  # encoded at 2048 x 2048
    assert max(len(make()) for make in FORMAT_BOMBS.values()) < 800 * 2**10


@pytest.mark.parametrize("name", FORMAT_BOMBS)
def test_formats_the_readers_do_not_take_are_refused_by_their_content(name):
    """Named .JPEG, as they would be in a folder of JPEGs: refused by what they are, by every
    decode path, before anything is decoded."""
    data = FORMAT_BOMBS[name]()
    what = name.split("_")[0].split(".")[0].upper()
    message = f"not a decodable image: {what} content; the readers take JPEG, PNG, BMP, WEBP, GIF"
    for decode in (image_size, decode_rgb, lambda d: eval_view(d, 32)):
        with pytest.raises(ValueError, match=message):
            decode(data)
    for augment in (PRETRAIN, None):
        _, ok, errors = decode_crop_batch([good(), data], 32, np.random.default_rng(0), augment=augment)
        assert ok == [0] and errors[1] == message
    plain_tiff = _encode(_photo(37, 53), "TIFF")  # an ordinary TIFF too: not a format the readers take
    with pytest.raises(ValueError, match="TIFF content"):
        decode_rgb(plain_tiff)


def gif_beyond_its_screen(side: int = 1000) -> bytes:
    """A GIF whose logical screen says 16x16 and whose first frame is side x side: Pillow
    grows the image to the frame while opening it."""
    data = _encode(Image.new("P", (side, side)), "GIF")
    return data[:6] + struct.pack("<HH", 16, 16) + data[10:]


def test_pillows_own_limit_follows_the_budget_while_it_opens_and_decodes():
    data = gif_beyond_its_screen()
    assert data[6:10] == struct.pack("<HH", 16, 16) and Image.open(io.BytesIO(data)).size == (1000, 1000)
    with pytest.raises(ValueError, match=r"image over data\.max_pixels=100000 as Pillow reads it"):
        decode_rgb(data, max_pixels=100_000)
    _, ok, errors = decode_crop_batch([data], 32, np.random.default_rng(0), max_pixels=100_000)
    assert ok == [] and "data.max_pixels=100000" in errors[0]
    assert decode_rgb(data, max_pixels=1_000_000).shape == (3, 1000, 1000)  # at the budget exactly
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default is back after each decode


def test_image_size_steps_over_fill_bytes_and_standalone_markers():
    """libjpeg accepts 0xFF fill bytes, TEM and RSTn between segments, and skips bytes that
    are not a marker; the size it decodes is the size read here."""
    jpeg = _encode(_photo(37, 53))
    for inserted in [b"\xff\xff\xff\x01", b"\xff\x01\xff\xd0\xff\xd7", b"\xff\x00", b"junk"]:
        data = jpeg[:2] + inserted + jpeg[2:]
        assert image_size(data) == (37, 53), inserted
        if _jpeg_region is not None:
            assert _jpeg_region.size(data)[:2] == (37, 53)
    assert tuple(decode_rgb(jpeg[:2] + b"\xff\xff\xff\x01" + jpeg[2:]).shape) == (3, 37, 53)


def test_image_size_refuses_truncated_and_malformed_headers():
    jpeg = _encode(_photo(37, 53))
    sof = jpeg.index(b"\xff\xc0")
    for end in [2, 3, 4, 5, 20, sof, sof + 2, sof + 4, sof + 8]:  # every cut before the width's last byte
        with pytest.raises(ValueError, match="not a decodable image"):
            image_size(jpeg[:end])
    assert image_size(jpeg[:sof + 9]) == (37, 53)  # the frame header's size fields are all it needs
    png = _encode(_photo(37, 53), "PNG")
    cases = [b"", b"junk", b"\xff", png[:8], png[:23], jpeg[:2] + b"\xff\xe0\x00\x01" + jpeg[2:],  # length 1
             jpeg[:2] + b"\xff\xd9" + jpeg[2:], jpeg[:2] + b"\xff\xda\x00\x08" + jpeg[2:],  # EOI, SOS first
             _claim(jpeg, 0, 53), png[:16] + bytes(8) + png[24:]]  # zero height, zero width and height
    for data in cases:
        with pytest.raises(ValueError, match="not a decodable image"):
            image_size(data)


def test_check_limits_names_the_limit():
    with pytest.raises(ValueError, match=r"^image is 2\.\d KB but claims 65500x65500 \(4290\.\d MP\), "
                                         r"over data\.max_pixels=90000000$"):
        check_limits(bomb_65500(), DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    with pytest.raises(ValueError, match=r"claims 15000x15000 \(225\.0 MP\), over data\.max_pixels=90000000"):
        check_limits(png_15000(), DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    over = bytes(80 * 2**20)  # the size is checked before the header: zeros are not read
    with pytest.raises(ValueError, match=r"^encoded image is 80\.0 MB, over data\.max_image_bytes=67108864$"):
        check_limits(over, DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    check_limits(good(), H * W, len(good()))  # at both limits exactly: accepted


@pytest.mark.parametrize("augment", [PRETRAIN, None])
def test_batch_keeps_the_good_images_and_names_the_limit_of_the_rest(augment):
    big = _encode(_photo(256, 256), quality=95)  # an ordinary image, over a 50 KB byte limit
    assert len(big) > 50_000
    blobs = [good(), bomb_65500(), png_15000(), good(), big, b"\x00garbage" * 10, jpeg_15000(), None]
    images, ok, errors = decode_crop_batch(blobs, 32, np.random.default_rng(0), augment=augment,
                                           max_bytes=50_000)
    assert ok == [0, 3] and sorted(errors) == [1, 2, 4, 5, 6, 7]
    assert "claims 65500x65500" in errors[1] and "data.max_pixels=90000000" in errors[1]
    assert "claims 15000x15000" in errors[2] and "data.max_pixels" in errors[2]
    assert "data.max_image_bytes=50000" in errors[4]
    assert errors[5].startswith("not a decodable image")
    assert "claims 15000x15000" in errors[6]
    assert errors[7].startswith("TypeError: ")  # not bytes at all: any exception is one image's error
    # refused files spend no draws: the good ones come out as they do on their own
    alone, _, _ = decode_crop_batch([good(), good()], 32, np.random.default_rng(0), augment=augment)
    assert images.shape == (2, 32, 32, 3) and np.array_equal(images, alone)


@pytest.mark.parametrize("bomb", [bomb_65500, jpeg_15000, png_15000])
def test_decode_rgb_eval_view_and_eval_crops_refuse_bombs(bomb):
    for decode in (decode_rgb, lambda d: eval_view(d, 32), lambda d: eval_crops([good(), d], 32)):
        with pytest.raises(ValueError, match="over data.max_pixels=90000000"):
            decode(bomb())


def test_the_pixel_and_byte_limits_are_exact_on_an_ordinary_image():
    for data in (good(), _encode(_photo(), "PNG"), _encode(_photo(), "BMP")):
        with pytest.raises(ValueError, match="over data.max_pixels=3071"):  # ours, or Pillow's for the BMP
            decode_rgb(data, max_pixels=H * W - 1)
        assert decode_rgb(data, max_pixels=H * W).shape == (3, H, W)
        with pytest.raises(ValueError, match=f"over data.max_image_bytes={len(data) - 1}"):
            eval_view(data, 16, max_bytes=len(data) - 1)
        assert eval_view(data, 16, max_pixels=H * W, max_bytes=len(data)).shape == (16, 16, 3)
        for augment in (PRETRAIN, None):
            _, ok, errors = decode_crop_batch([data], 16, np.random.default_rng(0), augment=augment,
                                              max_pixels=H * W - 1)
            assert ok == [] and "data.max_pixels=3071" in errors[0]
            _, ok, errors = decode_crop_batch([data], 16, np.random.default_rng(0), augment=augment,
                                              max_pixels=H * W, max_bytes=len(data))
            assert ok == [0] and errors == {}


def test_an_animated_gif_decodes_its_first_frame_only():
    """torchvision would decode every frame ([N, 3, H, W]); the budget is for one."""
    frames = [_photo().rotate(90 * i) for i in range(4)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(decode_rgb(data).permute(1, 2, 0), torch.from_numpy(first))
    _, ok, _ = decode_crop_batch([data], 32, np.random.default_rng(0))
    assert ok == [0]


def _c_calls(fn):
    """The C functions `fn` calls, as the profiler sees them: real calls, nothing replaced."""
    seen = []
    sys.setprofile(lambda frame, event, arg: seen.append(arg) if event == "c_call" else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_region_decode_never_sees_a_bomb():
    _needs_region_decode()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    for bomb in (bomb_65500(), jpeg_15000()):
        calls = _c_calls(lambda: jpeg_crop_flip(bomb, 32, rng))
        assert _jpeg_region.size in calls and _jpeg_region.decode_region not in calls  # libjpeg's header, refused
        assert jpeg_crop_flip(bomb, 32, rng) is None and rng.bit_generator.state == state  # no draws spent
        calls = _c_calls(lambda: decode_crop_batch([bomb], 32, rng))
        assert _jpeg_region.size not in calls and _jpeg_region.decode_region not in calls
    # the control: an ordinary JPEG goes through both, and through neither at one pixel over the budget
    calls = _c_calls(lambda: decode_crop_batch([good()], 32, rng))
    assert _jpeg_region.size in calls and _jpeg_region.decode_region in calls
    assert jpeg_crop_flip(good(), 32, rng, max_pixels=H * W - 1) is None
    assert jpeg_crop_flip(good(), 32, rng, max_pixels=H * W).shape == (32, 32, 3)


PEAK = """
import json, sys
import numpy as np
from mae.transforms import PRETRAIN, decode_crop_batch, decode_rgb, eval_view

def peak_mb():
    # the peak RSS since the last reset_peak (VmHWM)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

good, *bombs = [open(p, "rb").read() for p in sys.argv[1:]]
rng = np.random.default_rng(0)
for augment in (PRETRAIN, None):  # load every library the decode paths use before the baseline
    decode_crop_batch([good, b"junk"], 32, rng, augment=augment)
reset_peak()
base = peak_mb()
refused = 0
for augment in (PRETRAIN, None):
    _, ok, errors = decode_crop_batch([good] + bombs * 4, 32, rng, augment=augment)
    refused += len(errors)
for bomb in bombs:
    for decode in (decode_rgb, lambda d: eval_view(d, 32)):
        try:
            decode(bomb)
        except ValueError:
            refused += 1
bombs_peak = peak_mb()
reset_peak()
base_control = peak_mb()
unbudgeted = decode_rgb(bombs[-1], max_pixels=10**12).shape  # the control: what the budget prevents
print(json.dumps(dict(base=base, bombs=bombs_peak - base, unbudgeted=peak_mb() - base_control, refused=refused,
                      shape=list(unbudgeted))))
"""


def test_a_batch_of_bombs_stays_within_a_few_megabytes(tmp_path):
    """Peak RSS in a child process: decoding bombs (12.9 GB, 675 MB and 675 MB of pixels
    claimed; a TIFF tile of 805 MB, an ICO's and an ICNS's PNG of 271 MB each, an AVIF, and a
    GIF's frame beyond its screen over the budget) adds next to nothing, while the one PNG
    decoded without the budget adds its 675 MB, which shows the measure sees a full decode."""
    paths = []
    over_screen = gif_beyond_its_screen(10_000)  # 100 MP, over the default 90
    for name, data in [("good.jpg", good()), ("b65500.jpg", bomb_65500()), ("j15000.jpg", jpeg_15000()),
                       *[(name, make()) for name, make in FORMAT_BOMBS.items()], ("gif.jpg", over_screen),
                       ("p15000.png", png_15000())]:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    out = subprocess.run([sys.executable, "-c", PEAK, *paths], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refused"] == 10 * (len(paths) - 1)  # each bomb 4 times in 2 batches, then on its own twice
    assert result["bombs"] < 50, result
    assert result["shape"] == [3, 15000, 15000] and result["unbudgeted"] > 600, result
