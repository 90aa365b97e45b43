"""DICOM files: real scans shipped with pydicom, and hand-made ones whose display values are known."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys

import imagecodecs
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    HEVCMP51,
    JPEG2000MC,
    MPEG2MPML,
    MPEG2MPMLF,
    MPEG4HP41,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cbir.errors import ImageError
from cbir.images.decode import check_header, decode_image
from cbir.images.dicom import jpeg as dicom_jpeg
from cbir.images.sources import load_items
from cbir.pipeline.ingest import index_images
from cbir.pipeline.model import register_model
from cbir.pipeline.retrieve import Retriever

from .conftest import ROOT


def real_file(name: str) -> bytes:
    """A file of the test set inside pydicom's wheel (get_testdata_file would download any other)."""
    with open(get_testdata_file(name), "rb") as file:
        return file.read()


def grey(data: bytes, where: str = "scan.dcm") -> np.ndarray:
    image = np.asarray(decode_image(data, where))
    assert (image == image[..., :1]).all(), "a grey DICOM is grey in all three channels"
    return image[..., 0]


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> bytes:
    """A DICOM file in the standard's format holding ``pixels`` (frames first when 3-D and grey)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.Modality = "CT"
    dataset.set_pixel_data(pixels, photometric_interpretation=photometric,
                           bits_stored=8 * pixels.dtype.itemsize)
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# With the CT rescale below: -1024 (air), -160, 40, 240, 976 and 2976 Hounsfield units.
STORED = np.array([[0, 864], [1064, 1264], [2000, 4000]], dtype=np.uint16)


def test_the_window_of_the_file_is_applied_to_hounsfield_units():
    # A soft-tissue window, 40 +/- 200 HU: black up to -160 HU, mid-grey at 40, white from 240.
    data = dicom_bytes(STORED, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    assert grey(data).tolist() == [[0, 0], [127, 255], [255, 255]]
    wide = dicom_bytes(STORED, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=976, WindowWidth=2001)
    assert grey(wide).tolist() == [[0, 0], [8, 33], [127, 255]]


def test_a_window_no_viewer_could_apply_is_an_error_naming_the_file():
    with pytest.raises(ImageError, match=r"^flat.dcm: DICOM display values unusable \(ValueError: The \(0028,1051\) "
                                         r"Window Width must be greater than or equal to 1"):
        decode_image(dicom_bytes(STORED, WindowCenter=40, WindowWidth=0), "flat.dcm")


def test_without_a_window_the_used_range_is_stretched():
    assert grey(dicom_bytes(STORED)).tolist() == [[0, 55], [67, 80], [127, 255]]


def test_monochrome1_is_inverted_so_that_white_means_the_same_as_in_monochrome2():
    assert (grey(dicom_bytes(STORED, photometric="MONOCHROME1")) == 255 - grey(dicom_bytes(STORED))).all()


def test_a_voi_lut_sequence_maps_the_values_through_its_table():
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]  # four entries, the first for stored value 0, 16-bit output
    lut.LUTData = np.array([0, 65535, 65535, 65535], dtype="<u2").tobytes()
    data = dicom_bytes(np.array([[0, 1], [2, 3]], dtype=np.uint16), VOILUTSequence=[lut])
    assert grey(data).tolist() == [[0, 255], [255, 255]]


def test_a_multi_frame_object_is_represented_by_its_middle_frame():
    frames = np.zeros((5, 4, 4), dtype=np.uint8)
    for index in range(5):
        frames[index, index % 4, 0] = 255  # each frame lights its own row
    image = grey(dicom_bytes(frames, NumberOfFrames=5))
    assert image[:, 0].tolist() == [0, 0, 255, 0]


def test_real_scans_decode_alike_in_every_encoding_pydicom_reads():
    """The same MR slice, stored as explicit and implicit VR, big endian, RLE, JPEG 2000 and JPEG-LS."""
    reference = grey(real_file("MR_small.dcm"))
    assert reference.shape == (64, 64) and reference.max() == 255
    for encoding in ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                     "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]:
        assert (grey(real_file(encoding)) == reference).all(), encoding
    ct = grey(real_file("CT_small.dcm"))
    assert ct.shape == (128, 128) and ct.min() == 0 and ct.max() == 255


def test_irregularities_pydicom_reads_past_print_no_warning_a_file():
    """pydicom warns of, say, excess padding after the pixel data; an add of many such files must
    not print a warning for each. (Run apart: pytest resets warning filters around each test.)"""
    decode = ("from pydicom.data import get_testdata_file; from cbir.images.decode import decode_image; "
              "from pathlib import Path; path = get_testdata_file('MR_small_padded.dcm'); "
              "decode_image(Path(path).read_bytes(), path)")
    run = subprocess.run([sys.executable, "-W", "default", "-c", decode], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "Warning" not in run.stderr, run.stderr


def test_colour_dicom_becomes_rgb_whatever_its_colour_space_or_depth():
    rgb = np.asarray(decode_image(real_file("SC_rgb_rle.dcm"), "x.dcm"))
    assert rgb.shape == (100, 100, 3) and not (rgb == rgb[..., :1]).all()
    inverse = np.asarray(decode_image(real_file("SC_rgb_rle_2frame.dcm"), "x.dcm")).astype(int)
    assert (inverse == 255 - rgb).all(), "the second of two frames (its inverse) is the middle one"
    for same_picture in ["SC_rgb_rle_16bit.dcm", "SC_rgb_gdcm_KY.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle_32bit.dcm",
                         "SC_ybr_full_422_uncompressed.dcm"]:
        other = np.asarray(decode_image(real_file(same_picture), "x.dcm")).astype(int)
        assert np.abs(other - rgb).mean() < 1, same_picture  # YBR 4:2:2 differs a little at edges
    palette = np.asarray(decode_image(real_file("examples_palette.dcm"), "x.dcm"))
    assert palette.shape == (350, 800, 3) and not (palette == palette[..., :1]).all()


@pytest.mark.parametrize("name, reason", [
    ("rtplan.dcm", "a DICOM file with no image (modality RTPLAN)"),
    ("MR_truncated.dcm", "unreadable or truncated DICOM"),
    ("no_meta.dcm", "not an image file, nor a DICOM file (no 'DICM' after a 128-byte preamble, and read as a bare "
                    "DICOM data set it holds no image)"),
])
def test_a_dicom_that_cannot_be_shown_is_one_error_naming_file_and_reason(name, reason):
    with pytest.raises(ImageError) as error:
        decode_image(real_file(name), f"cases/{name}")
    assert str(error.value).startswith(f"cases/{name}: ") and reason in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_12_bit_jpeg_is_decoded_without_a_gpl_decoder(name):
    """pydicom's reference pixels (GDCM and Pillow refuse 12 bits; pylibjpeg-libjpeg is not installed)."""
    shown = grey(real_file(name))  # registers cbir's plugin with pydicom
    assert shown.shape == (1024, 256) and shown.min() == 0 and shown.max() == 255
    assert "pylibjpeg" not in pydicom.pixels.get_decoder(JPEGExtended12Bit).available_plugins
    samples = pydicom.pixels.pixel_array(pydicom.dcmread(io.BytesIO(real_file(name))))
    assert samples.dtype == np.uint16 and samples[420, 140] == 244 and samples[230, 120] == 95


def encapsulated(picture: np.ndarray, syntax: str, frames: list[bytes], fragments_per_frame: int = 1,
                 **elements) -> bytes:
    """A DICOM file of compressed ``frames`` in ``syntax``, each in ``fragments_per_frame`` fragments,
    whose header describes ``picture`` (the size and type of a frame) and holds ``elements``."""
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(picture, "RGB" if picture.ndim == 3 else "MONOCHROME2")))
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.NumberOfFrames = len(frames)
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def colour_12_bit_jpeg(frames: list[np.ndarray], photometric: str, **encoding) -> bytes:
    """A JPEG Extended DICOM file of 12-bit RGB ``frames``, encoded by libjpeg-turbo as ``encoding`` says."""
    return encapsulated(frames[0], JPEGExtended12Bit,
                        [imagecodecs.jpeg8_encode(rgb, level=95, bitspersample=12, **encoding) for rgb in frames],
                        BitsStored=12, HighBit=11, PhotometricInterpretation=photometric)


ROWS, COLUMNS = np.mgrid[0:48, 0:64]
RGB_12_BITS = np.stack([COLUMNS * 65, ROWS * 87, np.full_like(ROWS, 1000)], axis=-1).astype(np.uint16)  # to 4095
COLOUR_ENCODINGS = pytest.mark.parametrize("photometric, encoding", [
    ("YBR_FULL_422", {"subsampling": "422"}),
    ("YBR_FULL", {"subsampling": "444"}),
    ("RGB", {"colorspace": "RGB", "outcolorspace": "RGB"}),  # stored without a colour transform
])


@COLOUR_ENCODINGS
def test_colour_12_bit_jpeg_is_shown_in_its_colours(photometric, encoding):
    data = colour_12_bit_jpeg([RGB_12_BITS], photometric, **encoding)
    error = np.abs(np.asarray(decode_image(data, "endoscopy.dcm")) - RGB_12_BITS / 4095 * 255)
    assert error.mean() < 1 and error.max() <= 3  # lossy JPEG at quality 95
    # Asked for the samples as stored, pydicom gets them unconverted: luma first for YBR.
    stored = pydicom.pixels.pixel_array(pydicom.dcmread(io.BytesIO(data)), as_rgb=False).astype(float)
    first = RGB_12_BITS[..., 0] if photometric == "RGB" else RGB_12_BITS @ [0.299, 0.587, 0.114]
    assert np.abs(stored[..., 0] - first).mean() < 8


@COLOUR_ENCODINGS
def test_every_frame_of_a_colour_12_bit_jpeg_is_rgb(photometric, encoding):
    """pydicom decoding all frames, with cbir's plugin (cbir itself decodes the middle one)."""
    frames = [RGB_12_BITS, 4095 - RGB_12_BITS, RGB_12_BITS // 2]
    dataset = pydicom.dcmread(io.BytesIO(colour_12_bit_jpeg(frames, photometric, **encoding)))
    dicom_jpeg.register()
    decoded = pydicom.pixels.pixel_array(dataset).astype(float)
    assert decoded.shape == (3, 48, 64, 3)
    assert all(np.abs(decoded[index] - frame).mean() < 8 for index, frame in enumerate(frames))


def test_a_12_bit_jpeg_no_decoder_reads_names_each_decoders_reason():
    damaged = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    damaged.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(100)])  # a JPEG cut short in its first table
    buffer = io.BytesIO()
    damaged.save_as(buffer)
    with pytest.raises(ImageError) as error:
        decode_image(buffer.getvalue(), "cr.dcm")
    assert str(error.value) == (
        "cr.dcm: cannot decode its JPEG Extended (Process 2 and 4) pixel data (gdcm: GDCM does not support 'JPEG "
        "Extended' for samples with 12-bit precision; pillow: Pillow does not support 'JPEG Extended' for samples "
        "with 12-bit precision; imagecodecs: Bogus marker length; plugins not available: pylibjpeg (requires "
        "pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1))")


def test_a_compression_pydicom_has_no_decoder_for_is_named():
    relabelled = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    relabelled.file_meta.TransferSyntaxUID = JPEG2000MC
    buffer = io.BytesIO()
    relabelled.save_as(buffer)
    with pytest.raises(ImageError, match=r"^mr.dcm: cannot decode its JPEG 2000 Part 2 Multi-component Image "
                                         r"Compression pixel data \(pydicom has no decoder for it\)$"):
        decode_image(buffer.getvalue(), "mr.dcm")


def test_high_throughput_jpeg_2000_is_decoded_to_the_same_picture():
    htj2k = (ROOT / "tests" / "data" / "mr_small_htj2k.dcm").read_bytes()  # made by OpenJPH: tests/data/README.md
    assert pydicom.dcmread(io.BytesIO(htj2k)).file_meta.TransferSyntaxUID.name.startswith("High-Throughput JPEG 2000")
    assert (grey(htj2k) == grey(real_file("MR_small.dcm"))).all()


def video_frames(count: int) -> list[np.ndarray]:
    """RGB frames told apart by their green level: 20, 45, 70, ..."""
    return [np.broadcast_to(np.array([0, 20 + 25 * index, 100], np.uint8), (48, 64, 3)).copy()
            for index in range(count)]


def mpeg2_stream(frames: list[np.ndarray], folder, container: str) -> bytes:
    """``frames`` encoded by FFmpeg's MPEG-2 encoder: in a program stream (".mpg") or bare (".m2v")."""
    import cv2

    path = folder / f"video{container}"
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mpg2"), 25, (64, 48))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path.read_bytes()


def green_level(image) -> float:
    return float(np.asarray(image)[..., 1].mean())


@pytest.mark.parametrize("source, syntax, fragments", [
    (".mpg", MPEG2MPML, 1),  # in a program stream
    (".m2v", MPEG2MPML, 1),  # a bare stream
    (".mpg", MPEG2MPMLF, 3),  # the fragmentable syntax, the stream split over fragments
    ("cine_9_frames.h264", MPEG4HP41, 1),  # made by x264 and x265 from the same frames: tests/data/README.md
    ("cine_9_frames.hevc", HEVCMP51, 1),
])
def test_a_dicom_video_is_shown_by_its_middle_frame(tmp_path, source, syntax, fragments):
    frames = video_frames(9)
    if source.startswith("."):
        stream = mpeg2_stream(frames, tmp_path, source)
    else:
        stream = (ROOT / "tests" / "data" / source).read_bytes()
    video = encapsulated(frames[0], syntax, [stream], fragments, NumberOfFrames=9,
                         PhotometricInterpretation="YBR_PARTIAL_420")
    shown = decode_image(video, "cine.dcm")
    assert shown.size == (64, 48) and abs(green_level(shown) - green_level(frames[4])) < 4
    # A header that counts more frames than the stream holds gives the stream's last frame.
    longer = encapsulated(frames[0], syntax, [stream], fragments, NumberOfFrames=30,
                          PhotometricInterpretation="YBR_PARTIAL_420")
    assert abs(green_level(decode_image(longer, "cine.dcm")) - green_level(frames[8])) < 4


def test_a_video_stream_larger_than_its_header_says_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    frames = video_frames(3)
    small_header = encapsulated(frames[0][:8, :8], MPEG2MPML, [mpeg2_stream(frames, tmp_path, ".mpg")],
                                NumberOfFrames=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the header's 8 x 8 passes
    with pytest.raises(ImageError, match=r"^cine.dcm: refused, too many pixels \(64 x 48, more than the limit of "
                                         r"1,000\)$"):
        decode_image(small_header, "cine.dcm")


def test_a_video_whose_fragments_are_damaged_is_unreadable():
    damaged = pydicom.dcmread(io.BytesIO(encapsulated(video_frames(1)[0], MPEG2MPML, [b"stream"], NumberOfFrames=1)))
    damaged.PixelData = damaged.PixelData[:12] + bytes(8)  # the Basic Offset Table, then no item where one must be
    buffer = io.BytesIO()
    damaged.save_as(buffer)
    with pytest.raises(ImageError, match=r"^cine.dcm: unreadable or truncated DICOM \(ValueError: Unexpected tag"):
        decode_image(buffer.getvalue(), "cine.dcm")


def test_a_video_ffmpeg_finds_no_frame_in_is_one_error_naming_file_and_reason():
    damaged = encapsulated(video_frames(1)[0], MPEG4HP41, [bytes(range(256)) * 8], NumberOfFrames=9)
    with pytest.raises(ImageError) as error:
        decode_image(damaged, "cases/endoscopy.dcm")
    assert str(error.value) == ("cases/endoscopy.dcm: cannot decode its MPEG-4 AVC/H.264 High Profile / Level 4.1 "
                                "video (FFmpeg found no frame in its 2,048 bytes)")


def bare_data_set(name: str, implicit_vr: bool) -> bytes:
    """The data set of pydicom's file ``name`` alone: no preamble, no file meta header."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
    write_dataset(buffer, pydicom.dcmread(get_testdata_file(name)))
    return buffer.getvalue()


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_a_bare_data_set_named_dcm_is_read_as_the_same_picture(tmp_path, implicit_vr):
    bare = bare_data_set("CT_small.dcm", implicit_vr)
    assert bare[128:132] != b"DICM"
    assert (grey(bare, "old export/ct.dcm") == grey(real_file("CT_small.dcm"))).all()
    (tmp_path / "ct.dcm").write_bytes(bare)
    check_header(str(tmp_path / "ct.dcm"))
    with pytest.raises(ImageError, match=r"^ct.png: not an image file$"):
        decode_image(bare, "ct.png")  # only a DICOM name makes a file without the preamble worth reading as one


def test_the_header_check_names_a_dcm_that_holds_no_image(tmp_path):
    (tmp_path / "notes.dcm").write_bytes(b"a text saved under a DICOM name")
    with pytest.raises(ImageError, match=r"notes.dcm: not an image file, nor a DICOM file"):
        check_header(str(tmp_path / "notes.dcm"))


def test_the_pixel_limit_refuses_a_huge_dicom_before_its_pixels_are_decoded(monkeypatch):
    data = dicom_bytes(np.zeros((4, 4), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15)
    with pytest.raises(ImageError, match=r"huge.dcm: refused, too many pixels \(4 x 4, more than the limit of 15\)"):
        decode_image(data, "huge.dcm")


def test_the_header_check_before_training_reads_dicom_too(tmp_path):
    scan, report = tmp_path / "scan.dcm", tmp_path / "report.dcm"
    scan.write_bytes(real_file("CT_small.dcm"))
    report.write_bytes(real_file("test-SR.dcm"))
    check_header(str(scan))
    with pytest.raises(ImageError, match="report.dcm: a DICOM file with no image"):
        check_header(str(report))


def test_a_folder_of_dicom_scans_is_indexed_and_each_scan_retrieves_itself(store, tmp_path, extractor):
    folder = tmp_path / "scans"
    for label, names in {"ct": ["CT_small.dcm", "693_J2KI.dcm"],
                         "mr": ["MR_small.dcm", "examples_overlay.dcm"],
                         "us": ["examples_ybr_color.dcm", "examples_rgb_color.dcm"]}.items():
        (folder / label).mkdir(parents=True)
        for name in names:
            shutil.copy(get_testdata_file(name), folder / label / name)
    items = load_items(folder)
    register_model(store, extractor)
    report = index_images(store, items, extractor, batch_size=4, workers=1, progress=False)
    assert report.new == 6 and not report.failures
    retrievals, failures = Retriever(store, extractor).query(items, k=2)
    assert not failures
    for item, retrieval in zip(items, retrievals):
        top = retrieval.neighbours[0]
        assert (top.name, top.label) == (item.name, item.label)
        assert top.score == pytest.approx(1.0, abs=1e-4)
