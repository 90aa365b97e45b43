"""Small pictures of stored images, kept in Redis beside their vectors, so that a page can show
neighbours without access to the original files."""
from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_SIDE = 128  # pixels, the longer side
# JPEG: a few KB at this size, and half WebP's encoding time, which every `add` pays per image
# (docs/PERFORMANCE.md).
JPEG_OPTIONS = {"format": "JPEG", "quality": 80}
MEDIA_TYPE = "image/jpeg"


def thumbnail(image: Image.Image) -> bytes:
    """``image`` (decoded, RGB or grey) at most THUMBNAIL_SIDE pixels on its longer side, as JPEG bytes."""
    scale = THUMBNAIL_SIDE / max(image.size)
    if scale < 1:  # a new image: the caller's is left as it is
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, **JPEG_OPTIONS)
    return buffer.getvalue()
