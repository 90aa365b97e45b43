"""A pydicom decoder plugin: 12-bit JPEG Extended (Process 2 and 4) by libjpeg-turbo, through imagecodecs.

Older CR, DX and CT archives store grey 12-bit lossy JPEG, and some colour images (endoscopy,
microscopy) come the same way. Of pydicom's own plugins GDCM and Pillow refuse 12-bit samples
and pylibjpeg needs pylibjpeg-libjpeg, which is GPL-3.0 licensed (cbir is MIT); libjpeg-turbo 3,
BSD licensed and shipped in imagecodecs, decodes 8- and 12-bit JPEG.
:func:`register` adds this module to pydicom's decoder as its last plugin; the module holds what
pydicom asks of a plugin (``is_available``, ``DECODER_DEPENDENCIES`` and the decoding function).
"""
from __future__ import annotations

import threading

import imagecodecs
from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.common import PhotometricInterpretation as PI
from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "imagecodecs"
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs",)}

_CONVERTS_TO_RGB = "cbir_converts_ybr_to_rgb"  # a runner option of this plugin's own
_registering = threading.Lock()


def is_available(syntax: uid.UID) -> bool:
    return syntax in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's samples as the little-endian bytes pydicom expects of ``runner``'s pixel data."""
    if runner.samples_per_pixel == 1:
        samples = imagecodecs.jpeg8_decode(src)
    elif _converts_to_rgb(runner):
        samples = imagecodecs.jpeg8_decode(src, colorspace="YCBCR", outcolorspace="RGB")
    else:  # the samples as stored (RGB, or YBR asked for as it is)
        samples = imagecodecs.jpeg8_decode(src, colorspace="RGB", outcolorspace="RGB")
    return samples.astype(f"<u{(runner.bits_allocated + 7) // 8}", copy=False).tobytes()


def _converts_to_rgb(runner: DecodeRunner) -> bool:
    """Whether libjpeg-turbo turns this YBR data into RGB: where pydicom would convert it, as its own
    conversion is for 8-bit samples (an offset of 128, not 2048). The first frame decides for all;
    each one tells pydicom that its samples are RGB now, as pydicom reads a JFIF marker as YBR again
    before every frame."""
    converts = runner.get_option(_CONVERTS_TO_RGB, None)
    if converts is None:
        converts = (runner.photometric_interpretation in (PI.YBR_FULL, PI.YBR_FULL_422)
                    and runner.get_option("as_rgb", False))
        runner.set_option(_CONVERTS_TO_RGB, converts)
    if converts:
        runner.set_option("photometric_interpretation", PI.RGB)
    return converts


def register() -> None:
    """Add this plugin to pydicom's JPEG Extended decoder, once (pydicom's add_plugin is not thread-safe)."""
    decoder = get_decoder(uid.JPEGExtended12Bit)
    with _registering:
        if LABEL not in decoder.available_plugins:
            decoder.add_plugin(LABEL, (__name__, decode_frame.__name__))
