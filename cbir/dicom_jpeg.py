"""A pydicom decoder plugin: grey 12-bit JPEG Extended (Process 2 and 4) by libjpeg-turbo, through imagecodecs.

Older CR, DX and CT archives store 12-bit lossy JPEG. Of pydicom's own plugins GDCM and Pillow
refuse 12-bit samples and pylibjpeg needs pylibjpeg-libjpeg, which is GPL-3.0 licensed (cbir is
MIT); libjpeg-turbo 3, BSD licensed and shipped in imagecodecs, decodes 8- and 12-bit JPEG.
:func:`register` adds this module to pydicom's decoder as its last plugin; the module holds what
pydicom asks of a plugin (``is_available``, ``DECODER_DEPENDENCIES`` and the decoding function).
"""
from __future__ import annotations

import threading

import imagecodecs
from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "imagecodecs"
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs",)}

_registering = threading.Lock()


def is_available(syntax: uid.UID) -> bool:
    return syntax in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's samples as the little-endian bytes pydicom expects of ``runner``'s pixel data."""
    if runner.samples_per_pixel != 1:
        # libjpeg-turbo would turn YCbCr into RGB, which pydicom would then convert again.
        raise NotImplementedError("cbir decodes grey 12-bit JPEG only, not colour")
    samples = imagecodecs.jpeg8_decode(src)
    return samples.astype(f"<u{(runner.bits_allocated + 7) // 8}", copy=False).tobytes()


def register() -> None:
    """Add this plugin to pydicom's JPEG Extended decoder, once (pydicom's add_plugin is not thread-safe)."""
    decoder = get_decoder(uid.JPEGExtended12Bit)
    with _registering:
        if LABEL not in decoder.available_plugins:
            decoder.add_plugin(LABEL, (__name__, decode_frame.__name__))
