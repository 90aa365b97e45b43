"""cbir.resample against the installed Pillow, pixel for pixel."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cbir.resample import resize

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _pillows(band: np.ndarray, size: tuple[int, int], interpolation: str, reducing_gap: float | None = None):
    return np.asarray(Image.fromarray(band).resize(size, FILTERS[interpolation], reducing_gap=reducing_gap))


@pytest.mark.parametrize("interpolation", FILTERS)
def test_any_sizes_give_pillows_pixels(interpolation):
    rng = np.random.default_rng(0)
    for _ in range(150):
        height, width, out_height, out_width = (int(n) for n in rng.integers(1, 500, 4))
        band = rng.integers(0, 256, (height, width), dtype=np.uint8)
        if rng.random() < 0.5:  # hard edges: the sums overshoot and get clipped
            band = band // 128 * 255
        np.testing.assert_array_equal(resize(band, (out_width, out_height), interpolation),
                                      _pillows(band, (out_width, out_height), interpolation),
                                      err_msg=f"{width}x{height} -> {out_width}x{out_height}")


@pytest.mark.parametrize("shape,size", [
    ((300, 300), (224, 224)),  # both shrink alike: Pillow goes along x first
    ((300, 100), (224, 224)),  # the height shrinks, the width grows: along y first
    ((528, 85), (217, 162)),
    ((256, 256), (300, 224)),
    ((256, 256), (256, 224)),  # one axis only
    ((256, 256), (224, 256)),
    ((256, 256), (256, 256)),  # nothing to do
    ((1, 1), (224, 224)),
    ((224, 224), (1, 1)),
])
@pytest.mark.parametrize("interpolation", FILTERS)
def test_each_order_of_passes_and_each_single_pass_gives_pillows_pixels(shape, size, interpolation):
    band = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(resize(band, size, interpolation), _pillows(band, size, interpolation))


def test_what_pillow_shrinks_by_a_whole_factor_first_is_left_to_it():
    band = np.random.default_rng(2).integers(0, 256, (1500, 1400), dtype=np.uint8)
    reduced = resize(band, (224, 224), reducing_gap=3.0)
    np.testing.assert_array_equal(reduced, _pillows(band, (224, 224), "bicubic", 3.0))
    assert reduced.flags.writeable  # for torch.from_numpy
    np.testing.assert_array_equal(resize(band, (224, 224)), _pillows(band, (224, 224), "bicubic"))


def test_a_strided_band_of_an_rgb_array_is_resized_like_a_contiguous_one():
    rgb = np.random.default_rng(3).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    green = rgb[:, :, 1]
    np.testing.assert_array_equal(resize(green, (64, 64)), _pillows(np.ascontiguousarray(green), (64, 64), "bicubic"))
