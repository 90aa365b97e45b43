"""Decoding untrusted image files and arrays into 8-bit RGB (or grey) images, with clear errors.

Every format goes to a maintained decoder: Pillow, and pydicom (with GDCM, pylibjpeg, imagecodecs)
for DICOM.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from cbir.errors import ImageError
from cbir.images.dicom.frames import MAGIC_END as DICOM_MAGIC_END
from cbir.images.dicom.frames import SUFFIXES as DICOM_SUFFIXES
from cbir.images.dicom.frames import dicom_header, dicom_image, is_dicom
from cbir.images.pixels import check_frame_size, to_8_bits


def decode_image(data: bytes, where: str, keep_grey: bool = False) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image, or raise ImageError naming ``where``.

    With ``keep_grey``, an image found grey may come back as one band (mode L) instead, for a
    caller that handles that (:class:`cbir.models.preprocess.Preprocess`) and would otherwise find out again.

    Any format Pillow reads, and DICOM files (recognised by their content, not their name) as a
    viewer displays them (:mod:`cbir.images.dicom.frames`).

    An image of more pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
    89 million unless the application changes it) is refused before its pixels are decoded. No
    global state is touched, so threads may decode at the same time.
    """
    if not data:
        raise ImageError(f"{where}: empty file")
    try:
        return _decoded(data, where, keep_grey)
    except MemoryError:
        raise ImageError(f"{where}: not enough memory to decode it{_memory_needed(data)}") from None


def _memory_needed(data: bytes) -> str:
    """How much memory the pixels of ``data`` take once decoded, as its header says (where Pillow
    reads the header: DICOM's decoders need more than the pixels anyway)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height, bands = image.width, image.height, len(image.getbands())
    except Exception:  # no header Pillow reads
        return ""
    return f": needs {width * height * max(bands, 3) / 2**20:,.0f} MB for {width} x {height} pixels"


def _decoded(data: bytes, where: str, keep_grey: bool) -> Image.Image:
    if is_dicom(data):
        return dicom_image(data, where, Image.MAX_IMAGE_PIXELS)
    try:
        image = Image.open(io.BytesIO(data))
        # Pillow itself only warns up to twice its limit; a warning is not a refusal.
        check_frame_size(image.width, image.height, Image.MAX_IMAGE_PIXELS, where)
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: refused, too many pixels ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        if where.lower().endswith(DICOM_SUFFIXES):
            return dicom_image(data, where, Image.MAX_IMAGE_PIXELS, headerless=True)
        raise ImageError(f"{where}: not an image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{where}: unreadable or truncated image ({exc})") from exc
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the pixels
    except Exception:  # a broken EXIF block must not cost the image; keep its stored orientation
        pass
    return _finished(image, where, keep_grey)


# An image array: (H, W) or (H, W, C), channels last, of any number type (bool, int, uint, float).
IMAGE_SHAPES = "(H, W) or (H, W, C) with C = 1, 3 or 4"


NUMBER_KINDS = "biuf"


def is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))


def array_image(array: np.ndarray, where: str, keep_grey: bool = False) -> Image.Image:
    """An image array as 8-bit RGB (or L, as :func:`decode_image` says): 8-bit arrays as they
    are, others stretched from their range."""
    if not is_image_shape(array.shape) or array.dtype.kind not in NUMBER_KINDS:
        raise ImageError(f"{where}: an array of shape {array.shape} and type {array.dtype} is no image "
                         f"(expected numbers of shape {IMAGE_SHAPES})")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = to_8_bits(array)
    return _finished(Image.fromarray(array), where, keep_grey)


def check_header(path: str) -> None:
    """Read only the header of the image file at ``path``, a cheap check of many files before long
    work; raise ImageError naming the file and the reason."""
    try:
        with open(path, "rb") as file:
            start = file.read(DICOM_MAGIC_END)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if is_dicom(start):
        dicom_header(path, path, Image.MAX_IMAGE_PIXELS, defer_size="64 KB")
        return
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.UnidentifiedImageError:
        if not path.lower().endswith(DICOM_SUFFIXES):
            raise ImageError(f"{path}: not an image file") from None
        dicom_header(path, path, Image.MAX_IMAGE_PIXELS, defer_size="64 KB", headerless=True)
    except Exception as exc:  # Pillow raises many types for broken files
        raise ImageError(f"{path}: not an image file, or a damaged one ({type(exc).__name__})") from exc


def _finished(image: Image.Image, where: str, keep_grey: bool) -> Image.Image:
    return image if keep_grey and image.mode == "L" else _to_rgb(image, where)


def _to_rgb(image: Image.Image, where: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(to_8_bits(np.asarray(image))).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{where}: unsupported pixel format {mode}") from exc

