"""The middle frame of a DICOM video (MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265), decoded by FFmpeg.

Endoscopes and ultrasound cine loops store video, for which pydicom has no decoder. The whole
stream sits in the pixel data's fragments after the Basic Offset Table; FFmpeg, as OpenCV's
build of it ships in opencv-python-headless (LGPL, decoders only), finds the stream's container
(a program or transport stream, or bare video) itself and decodes it. PyAV would do as well, but
its wheel bundles GPL encoders (x264, x265), and cbir is MIT licensed.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from pydicom import uid
from pydicom.encaps import generate_fragments

from cbir.errors import ImageError
from cbir.images.pixels import check_frame_size

VIDEO_SYNTAXES = frozenset(uid.MPEGTransferSyntaxes)


def middle_frame(dataset, where: str, pixel_limit: int | None) -> np.ndarray:
    """The frame a viewer would pause on in the middle of the video (``NumberOfFrames`` in the
    header says where), as ``uint8`` RGB (H, W, 3); a stream whose frames have more than
    ``pixel_limit`` pixels is refused before it is decoded. The frames before the middle one are
    decoded too: seeking needs an index of key frames, which a bare stream does not have."""
    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        import cv2
    except ImportError as exc:
        raise ImageError(f"{where}: cannot decode its {syntax.name} video (needs opencv-python-headless: "
                         f"{exc})") from exc
    # Its warnings (a stream it cannot open, say) would go to stderr beside the run's own one-line reasons.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    fragments = generate_fragments(dataset.PixelData)
    next(fragments, None)  # the Basic Offset Table, the first item by the standard (PS3.5 A.4)
    stream = b"".join(fragments)
    wanted = int(dataset.get("NumberOfFrames") or 1) // 2
    with tempfile.TemporaryDirectory(prefix="cbir-video-") as folder:  # OpenCV's FFmpeg reads files only
        path = os.path.join(folder, "stream")
        with open(path, "wb") as file:
            file.write(stream)
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        frame = None
        try:
            # The stream's own size: the header's was checked, but the stream is what is decoded.
            check_frame_size(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                             pixel_limit, where)
            for _ in range(wanted + 1):  # a stream shorter than its header says gives its last frame
                read, picture = capture.read()
                if not read:
                    break
                frame = picture
        finally:
            capture.release()
    if frame is None:
        raise ImageError(f"{where}: cannot decode its {syntax.name} video (FFmpeg found no frame in its "
                         f"{len(stream):,} bytes)")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
