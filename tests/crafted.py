"""Crafted image files whose header's size is not the size their decoder allocates: real
bytes in each format, built field by field (the PNGs are valid, their rows compressed in
steps so the raw pixels never exist here)."""
import functools
import io
import struct
import zlib


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_gray1(n: int) -> bytes:
    """A complete, valid n x n 1-bit grayscale PNG of zero pixels (every row filter 0)."""
    row, step = 1 + (n + 7) // 8, 500
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(bytes(row * step)) for _ in range(n // step))
    idat += z.compress(bytes(row * (n % step))) + z.flush()
    ihdr = struct.pack(">IIBBBBB", n, n, 1, 0, 0, 0, 0)  # width, height, bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@functools.cache
def tiff_tile(tile: int = 16384, claim: int = 16) -> bytes:
    """A little-endian RGB TIFF whose IFD claims claim x claim pixels, stored as one deflate
    tile of tile x tile (libtiff decodes whole tiles: tile * tile * 3 bytes)."""
    z = zlib.compressobj(9)
    rows = bytes(tile * 3) * 256
    data = b"".join(z.compress(rows) for _ in range(tile // 256)) + z.flush()
    entries = [(256, claim), (257, claim), (258, None), (259, 8), (262, 2), (277, 3), (284, 1),
               (322, tile), (323, tile), (324, None), (325, len(data))]  # 259: deflate, 262: RGB
    bits_at = 8 + 2 + len(entries) * 12 + 4  # BitsPerSample's three values, after the IFD
    data_at = bits_at + 6
    ifd = struct.pack("<H", len(entries))
    for tag, value in entries:
        if tag == 258:
            ifd += struct.pack("<HHII", tag, 3, 3, bits_at)
        elif tag in (324, 325):  # TileOffsets, TileByteCounts: LONG
            ifd += struct.pack("<HHII", tag, 4, 1, data_at if tag == 324 else value)
        else:
            ifd += struct.pack("<HHIHH", tag, 3, 1, value, 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + data


@functools.cache
def ico_png(n: int = 9500) -> bytes:
    """An ICO whose one entry says 256x256 and holds an n x n PNG (Pillow decodes it while
    opening the file)."""
    png = png_gray1(n)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # 0 x 0 means 256 x 256
    return struct.pack("<HHH", 0, 1, 1) + entry + png


@functools.cache
def icns_png(n: int = 9500) -> bytes:
    """An ICNS whose one entry, ic09, is a 512x512 icon by its type and an n x n PNG inside."""
    entry = b"ic09" + struct.pack(">I", 8) + png_gray1(n)
    entry = entry[:4] + struct.pack(">I", len(entry)) + entry[8:]
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


@functools.cache
def avif_claim(real: int = 2048, claim: int = 16) -> bytes:
    """A real AVIF of real x real pixels (Pillow's encoder) whose image-size box (ispe) is
    rewritten to claim x claim."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (real, real), (40, 80, 120)).save(buf, "AVIF", speed=10, quality=30)
    data = buf.getvalue()
    at = data.index(b"ispe") + 8  # box type, then version and flags
    assert struct.unpack(">II", data[at:at + 8]) == (real, real)
    return data[:at] + struct.pack(">II", claim, claim) + data[at + 8:]


FORMAT_BOMBS = {"tiff_tile.JPEG": tiff_tile, "ico.JPEG": ico_png, "icns.JPEG": icns_png, "avif.JPEG": avif_claim}
