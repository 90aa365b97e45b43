"""cbir.png against the PNG specification's filters, Pillow's decoder, and damaged files."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cbir import png

NONE, SUB, UP, AVERAGE, PAETH = range(5)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _filtered(pixels: np.ndarray, kinds: list[int]) -> bytes:
    """Rows filtered as the PNG specification defines each filter, computed on whole rows."""
    height = pixels.shape[0]
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, -1).astype(np.int64)
    previous = np.zeros_like(rows[0])
    out = b""
    for row, kind in zip(rows, kinds):
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int64), previous[:-bpp]])
        estimate = left + previous - up_left
        to_left, to_up, to_up_left = abs(estimate - left), abs(estimate - previous), abs(estimate - up_left)
        paeth = np.where((to_left <= to_up) & (to_left <= to_up_left), left,
                         np.where(to_up <= to_up_left, previous, up_left))
        predicted = {SUB: left, UP: previous, AVERAGE: (left + previous) // 2, PAETH: paeth}.get(kind, 0)
        out += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()
        previous = row
    return out


def _png(pixels: np.ndarray, kinds: list[int], idat_parts: int = 1, **header) -> bytes:
    height, width = pixels.shape[:2]
    fields = {"depth": 8, "colour": 0 if pixels.ndim == 2 else 2, "interlace": 0, **header}
    ihdr = struct.pack(">IIBBBBB", width, height, fields["depth"], fields["colour"], 0, 0, fields["interlace"])
    stream = zlib.compress(_filtered(pixels, kinds))
    cuts = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    idats = b"".join(_chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts, cuts[1:]))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idats + _chunk(b"IEND", b"")


def _pillows(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("bands", [1, 3])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 5), (3, 4), (9, 1), (16, 33)])
def test_every_filter_in_any_order_gives_the_pixels(bands, shape):
    rng = np.random.default_rng(sum(shape) * bands)
    pixels = rng.integers(0, 256, shape + ((bands,) if bands > 1 else ()), dtype=np.uint8)
    # Runs of Paeth rows (undone two at a time) broken by every other filter, and each filter first.
    for first in range(5):
        kinds = [first] + list(rng.choice([NONE, SUB, UP, AVERAGE, PAETH, PAETH, PAETH], shape[0] - 1))
        data = _png(pixels, kinds)
        decoded = png.decode(data)
        np.testing.assert_array_equal(decoded, pixels)
        np.testing.assert_array_equal(decoded, _pillows(data))


def test_rgb_with_equal_bands_comes_back_as_one_band_and_one_odd_pixel_keeps_three():
    grey = np.random.default_rng(5).integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = np.dstack([grey] * 3)
    decoded = png.decode(_png(rgb, [PAETH] * 20))
    assert decoded.shape == (20, 30)
    np.testing.assert_array_equal(decoded, grey)
    rgb[19, 29, 2] ^= 1  # the last byte of the image
    np.testing.assert_array_equal(png.decode(_png(rgb, [PAETH] * 20)), rgb)


def test_image_data_split_over_several_chunks_is_joined():
    pixels = np.random.default_rng(6).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    np.testing.assert_array_equal(png.decode(_png(pixels, [PAETH] * 12, idat_parts=4)), pixels)


def test_every_busi_image_decodes_to_pillows_pixels(busi):
    for file in sorted(busi.glob("*/*.png"))[::4]:
        data = file.read_bytes()
        decoded = png.decode(data)
        pillows = _pillows(data)
        np.testing.assert_array_equal(decoded, pillows[..., 0] if decoded.ndim == 2 else pillows)


def _damaged(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


_PIXELS = np.random.default_rng(7).integers(0, 256, (6, 5, 3), dtype=np.uint8)
_GOOD = _png(_PIXELS, [PAETH] * 6)
_IDAT = 33  # where the IDAT chunk starts: after the signature (8 bytes) and IHDR (25)


def _zlib_damaged() -> bytes:
    """A byte of the compressed data flipped, under a right CRC: only zlib's own check can tell."""
    data = _damaged(_GOOD, _IDAT + 8 + 4)
    end = len(data) - 12 - 4
    return data[:end] + struct.pack(">I", zlib.crc32(data[_IDAT + 4:end])) + data[end + 4:]


@pytest.mark.parametrize("data", [
    _damaged(_GOOD, len(_GOOD) - 13),  # IDAT's CRC
    _damaged(_GOOD, 29),  # IHDR's CRC
    _zlib_damaged(),
    _GOOD[:-12],  # no IEND
    _GOOD[:_IDAT + 20],  # cut inside IDAT
    _GOOD[:_IDAT] + _GOOD[-12:],  # no IDAT
    _png(_PIXELS, [PAETH] * 5 + [5]),  # a filter type PNG does not define
    _png(_PIXELS[:5], [NONE] * 5)[:_IDAT] + _GOOD[_IDAT:],  # the header says fewer rows than the data holds
    _png(_PIXELS, [NONE] * 6)[:_IDAT] + _png(_PIXELS[:5], [NONE] * 5)[_IDAT:],  # and more
    _png(_PIXELS, [NONE] * 6, depth=16),
    _png(_PIXELS, [NONE] * 6, colour=6),
    _png(_PIXELS, [NONE] * 6, interlace=1),
    b"not a png at all",
], ids=["idat crc", "ihdr crc", "zlib stream", "no end", "cut", "no data", "unknown filter", "too much data",
        "too little data", "16 bits", "rgba", "interlaced", "not png"])
def test_files_it_does_not_trust_are_left_to_the_caller(data):
    assert png.decode(data) is None
