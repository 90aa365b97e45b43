"""Pixel values of any range (16-bit scans, CT in Hounsfield units, DICOM windows) as 8 bits."""
from __future__ import annotations

import numpy as np

from cbir.errors import ImageError


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    """The lowest and highest finite value (NaN marks a mask, say); (0, 0) when there is none."""
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def to_8_bits(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """``values`` mapped linearly from ``low``..``high`` onto 0..255 (``uint8``), clipped at the ends;
    by default the used range is stretched rather than clipped. NaN is black; infinities are the
    ends. A range of one value makes everything above it white."""
    if low is None or high is None:
        low, high = _finite_range(values)
    if values.dtype == np.uint8 and (low, high) == (0, 255):
        return values
    values = values.astype(np.float64)
    with np.errstate(invalid="ignore"):
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.where(values > low, 255.0, 0.0)
    return np.nan_to_num(np.clip(scaled, 0, 255), nan=0.0).astype(np.uint8)


def check_frame_size(columns: int, rows: int, pixel_limit: int | None, where: str) -> None:
    """Refuse an image or frame of more than ``pixel_limit`` pixels (a decompression bomb) before
    decoding it."""
    if pixel_limit is not None and rows * columns > pixel_limit:
        raise ImageError(f"{where}: refused, too many pixels ({columns} x {rows}, more than the limit of "
                         f"{pixel_limit:,})")
