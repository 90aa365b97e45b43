"""DICOM files as images: the pixels a viewer shows by default, as 8-bit grey or RGB.

Scanners store what they measured (CT in Hounsfield units after the rescale, MR and X-ray in
12 or 16 bits, MONOCHROME1 with white as zero) and say how to display it (window centre and
width, a VOI LUT). Retrieval should compare what a reader of the image sees, so the display
pipeline of DICOM PS3.4 is applied: modality LUT (rescale), then the VOI window or LUT, then
MONOCHROME1 inverted; without a window the used range is stretched, as for 16-bit PNGs. A
multi-frame object (a cine loop, a stack) is represented by its middle frame, and only that
frame is decoded (of a video, the frames before it too: :mod:`cbir.images.dicom.video`). The header's
patient data is read by pydicom and never stored.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from cbir.errors import ImageError, in_one_line
from cbir.images.pixels import check_frame_size, to_8_bits

# A DICOM file (PS3.10) is a 128-byte preamble then these four bytes.
MAGIC_OFFSET, MAGIC = 128, b"DICM"
MAGIC_END = MAGIC_OFFSET + len(MAGIC)
SUFFIXES = (".dcm", ".dicom")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` (or at least its first :data:`MAGIC_END` bytes) is a DICOM file."""
    return data[MAGIC_OFFSET:MAGIC_END] == MAGIC


# pydicom warns of irregularities it has read past (excess padding, a VR other than the one
# declared); the image is read either way, and a warning a file would bury the run's summary. Set
# once here: changing filters around each decode is not safe with decoding threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _unreadable(where: str, exc: Exception) -> ImageError:
    return ImageError(f"{where}: unreadable or truncated DICOM ({in_one_line(exc, empty='no detail')})")


def _decoder_problem(exc: RuntimeError, syntax) -> str:
    """As one line: why each installed pydicom plugin failed to decode ``syntax``, and what the plugins
    pydicom would also try are missing."""
    from pydicom.pixels import get_decoder

    unavailable = get_decoder(syntax).missing_dependencies  # "pylibjpeg - requires pylibjpeg-libjpeg>=2.1"
    reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip() and line.strip() not in unavailable]
    if unavailable:
        reasons.append("plugins not available: " + ", ".join(
            f"{plugin} ({needs})" for plugin, _, needs in (line.partition(" - ") for line in unavailable)))
    return "; ".join(reasons) or str(exc).splitlines()[0]


def dicom_header(source: str | io.BytesIO, where: str, pixel_limit: int | None, defer_size: str | None = None,
                 headerless: bool = False):
    """The dataset of a DICOM file, checked to hold an image of at most ``pixel_limit`` pixels a frame;
    ``defer_size`` leaves larger values (the pixel data) unread until used.

    ``headerless`` reads a bare data set, as older exports write it: no preamble, no file meta
    header, so no transfer syntax named; it is taken as the uncompressed encoding pydicom found.
    """
    import pydicom  # here: most sources hold no DICOM, and pydicom takes time to import
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    try:
        dataset = pydicom.dcmread(source, defer_size=defer_size, force=headerless)
        if not any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS):
            if headerless:
                raise ImageError(f"{where}: not an image file, nor a DICOM file (no 'DICM' after a 128-byte "
                                 f"preamble, and read as a bare DICOM data set it holds no image)")
            modality = dataset.get("Modality")
            kind = (f"modality {modality}" if modality
                    else getattr(dataset.get("SOPClassUID"), "name", "no modality given"))
            raise ImageError(f"{where}: a DICOM file with no image ({kind})")
        if "TransferSyntaxUID" not in dataset.file_meta:
            implicit, little_endian = dataset.original_encoding
            dataset.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
                                                   if little_endian else ExplicitVRBigEndian)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise _unreadable(where, exc) from exc
    check_frame_size(columns, rows, pixel_limit, where)
    return dataset


def dicom_array(data: bytes, where: str, pixel_limit: int | None, headerless: bool = False) -> np.ndarray:
    """The display pixels of a DICOM file (a bare data set if ``headerless``): ``uint8``, (H, W) grey
    or (H, W, 3) RGB."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    from cbir.images.dicom import jpeg as dicom_jpeg
    from cbir.images.dicom import video as dicom_video
    dicom_jpeg.register()
    dataset = dicom_header(io.BytesIO(data), where, pixel_limit, headerless=headerless)
    syntax = dataset.file_meta.TransferSyntaxUID
    if syntax in dicom_video.VIDEO_SYNTAXES:
        try:
            return dicom_video.middle_frame(dataset, where, pixel_limit)
        except ImageError:
            raise
        except Exception as exc:  # pixel data that is not a sequence of fragments
            raise _unreadable(where, exc) from exc
    try:
        frames = int(dataset.get("NumberOfFrames") or 1)
        pixels = pixel_array(dataset, index=frames // 2 if frames > 1 else None)
    except NotImplementedError as exc:  # a compression pydicom has no decoder for (multi-component JPEG 2000)
        raise ImageError(f"{where}: cannot decode its {syntax.name} pixel data (pydicom has no decoder for "
                         f"it)") from exc
    except RuntimeError as exc:  # pydicom: no plugin decodes this compression, or none is installed
        raise ImageError(f"{where}: cannot decode its {syntax.name} pixel data "
                         f"({_decoder_problem(exc, syntax)})") from exc
    except Exception as exc:
        raise _unreadable(where, exc) from exc

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":
            coloured = apply_color_lut(pixels, dataset)
            return to_8_bits(coloured, 0, np.iinfo(coloured.dtype).max)
        if pixels.ndim == 3:  # RGB; pydicom has already turned YBR into RGB
            return to_8_bits(pixels, 0, 2 ** int(dataset.get("BitsStored") or 8) - 1)
        grey = _windowed(apply_modality_lut(pixels, dataset), dataset)
    except Exception as exc:  # a window of width 0 or without a centre, a LUT that does not fit the pixels
        raise ImageError(f"{where}: DICOM display values unusable ({type(exc).__name__}: {exc})") from exc
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _windowed(values: np.ndarray, dataset) -> np.ndarray:
    """The file's VOI LUT or window mapped onto 0-255 (a LUT first, as viewers do); without either,
    the used range."""
    from pydicom.pixels import apply_voi_lut, apply_windowing

    if dataset.get("VOILUTSequence"):
        if not np.issubdtype(values.dtype, np.integer):  # a rescale made floats; the table takes integers
            values = np.rint(np.nan_to_num(values)).astype(np.int64)
        # The table's entries have the bit depth of its descriptor's third value (PS3.3 C.11.2.1.1).
        depth = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        return to_8_bits(apply_voi_lut(values, dataset), 0, 2 ** depth - 1)
    if "WindowCenter" in dataset:
        # The window's output range is what it gives the lowest and highest possible input: pydicom
        # derives it from the bit depth and rescale, so ask it rather than repeat its rules.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        return to_8_bits(apply_windowing(values, dataset), low, high)
    return to_8_bits(values)


def dicom_image(data: bytes, where: str, pixel_limit: int | None, headerless: bool = False) -> Image.Image:
    return Image.fromarray(dicom_array(data, where, pixel_limit, headerless)).convert("RGB")
