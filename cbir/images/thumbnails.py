"""Small pictures of stored images, kept in Redis beside their vectors, so that a page can show
neighbours without access to the original files."""
from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_SIDE = 128  # pixels, the longer side
# WebP at method 0: the encoder's fastest effort, still smaller than JPEG (docs/PERFORMANCE.md).
WEBP_OPTIONS = {"format": "WEBP", "quality": 75, "method": 0}
MEDIA_TYPE = "image/webp"


def thumbnail(image: Image.Image) -> bytes:
    """``image`` (decoded, RGB or grey) at most THUMBNAIL_SIDE pixels on its longer side, as WebP bytes."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    small.save(buffer, **WEBP_OPTIONS)
    return buffer.getvalue()
