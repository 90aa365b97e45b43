"""Image sources and robust decoding, on hand-made files of every awkward kind."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cbir.errors import DataSourceError, DataSourceWarning, ImageError
from cbir.images.decode import array_image, decode_image
from cbir.images.sources import (
    folder_items,
    load_items,
    npz_items,
    one_per_class,
    printable,
    query_items,
    split_project,
)

from .conftest import BREASTMNIST, SHARED_DATA


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16", "1", "CMYK"])
def test_every_pixel_format_becomes_rgb(mode):
    image = Image.new(mode if mode != "CMYK" else "CMYK", (10, 6))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = decode_image(buffer.getvalue(), "x")
    assert decoded.mode == "RGB" and decoded.size == (10, 6)
    kept = decode_image(buffer.getvalue(), "x", keep_grey=True)
    assert kept.mode == ("L" if mode == "L" else "RGB") and kept.size == (10, 6)


def test_grey_arrays_stay_one_band_when_the_caller_keeps_grey():
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    assert array_image(grey, "x").mode == "RGB"
    kept = array_image(grey[..., None], "x", keep_grey=True)
    assert kept.mode == "L" and np.array_equal(np.asarray(kept), grey)
    assert array_image(np.dstack([grey] * 3), "x", keep_grey=True).mode == "RGB"


def test_16_bit_range_is_stretched_not_clipped():
    array = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    decoded = np.asarray(decode_image(png_bytes(Image.fromarray(array)), "x"))
    assert decoded[0, 0, 0] == 0 and decoded[1, 1, 0] == 255


def test_transparent_pixels_become_black():
    image = Image.new("RGBA", (2, 2), (255, 255, 255, 0))
    assert np.asarray(decode_image(png_bytes(image), "x")).max() == 0


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return exif.tobytes()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "white")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=_rotated_exif())
    assert decode_image(buffer.getvalue(), "x").size == (20, 40)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_file(width: int, height: int, colour_type: int, interlace: int, rows: bytes) -> bytes:
    """An 8-bit PNG written chunk by chunk, ``rows`` being the image data before compression."""
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _png_with_size(width: int, height: int) -> bytes:
    return _png_file(width, height, colour_type=0, interlace=0, rows=b"\0")


def _interlaced_png(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (Pillow writes none): the seven passes, rows unfiltered."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    rows = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in rgb[y0::dy, x0::dx] if row.size)
    return _png_file(rgb.shape[1], rgb.shape[0], colour_type=2, interlace=1, rows=rows)


def _compressed_comment() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "ancillary chunks do not change the pixels", zip=True)
    return info


def test_pngs_decode_to_pillows_pixels(busi):
    files = sorted(busi.glob("*/*.png"))[::40]
    colour = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    grey = np.asarray(Image.open(files[0]).convert("L"))
    with_text = png_bytes(Image.fromarray(colour), pnginfo=_compressed_comment())
    for data in [f.read_bytes() for f in files] + [png_bytes(Image.fromarray(grey)), with_text]:
        pillows = Image.open(io.BytesIO(data)).convert("RGB")
        assert np.array_equal(np.asarray(decode_image(data, "x")), np.asarray(pillows))
        kept = decode_image(data, "x", keep_grey=True)
        assert np.array_equal(np.asarray(kept.convert("RGB")), np.asarray(pillows))


def _exif_rotated(image: Image.Image) -> bytes:
    return png_bytes(image, exif=_rotated_exif())


def _exif_text_rotated(image: Image.Image) -> bytes:
    """The EXIF as ImageMagick writes it into a PNG: hex in a compressed "Raw profile type exif" text chunk."""
    exif = _rotated_exif()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(exif):8d}\n{exif.hex()}", zip=True)
    return png_bytes(image, pnginfo=info)


@pytest.mark.parametrize("make", [
    lambda rgb: png_bytes(Image.fromarray(rgb), transparency=(0, 0, 0)),
    lambda rgb: png_bytes(Image.fromarray(rgb[..., 0]), transparency=0),
    lambda rgb: png_bytes(Image.fromarray(rgb).convert("P")),
    lambda rgb: png_bytes(Image.fromarray(rgb).convert("RGBA")),
    lambda rgb: png_bytes(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)),
    lambda rgb: png_bytes(Image.fromarray(rgb[..., 0]).convert("1")),
    lambda rgb: _exif_rotated(Image.fromarray(rgb)),
    lambda rgb: _exif_text_rotated(Image.fromarray(rgb)),
    lambda rgb: png_bytes(Image.fromarray(rgb), save_all=True, append_images=[Image.fromarray(255 - rgb)]),
    _interlaced_png,
    lambda rgb: png_bytes(Image.fromarray(rgb))[:-12],  # no IEND
], ids=["transparency", "grey transparency", "palette", "alpha", "16 bits", "1 bit", "exif", "exif text", "animated",
        "interlaced", "no end"])
def test_pngs_of_every_kind_decode(make):
    rgb = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    data = make(rgb)
    decoded = decode_image(data, "x")
    assert decoded.mode == "RGB" and decoded.size in ((17, 13), (13, 17))


@pytest.mark.parametrize("make", [_exif_rotated, _exif_text_rotated], ids=["exif chunk", "exif text"])
def test_a_png_whose_exif_says_rotate_is_decoded_rotated(make):
    decoded = decode_image(make(Image.new("RGB", (17, 13))), "x")
    assert decoded.size == (13, 17)


def test_a_png_with_a_damaged_colour_profile_is_decoded_without_a_line_on_stderr(capfd):
    data = png_bytes(Image.new("RGB", (8, 8)), icc_profile=bytes(200))  # libpng: "iCCP: too short"
    assert decode_image(data, "x").size == (8, 8)
    assert capfd.readouterr().err == ""


def test_an_interlaced_png_gives_the_pixels_of_a_plain_one():
    rgb = np.random.default_rng(1).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(_interlaced_png(rgb), "x")), rgb)


def _png_with_two_headers(first: tuple[int, int], second: tuple[int, int]) -> bytes:
    """A crafted PNG: two IHDR chunks, the image data made for the second one."""
    def header(width: int, height: int) -> bytes:
        return _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    rows = b"".join(b"\0" + bytes(second[0]) for _ in range(second[1]))
    return (b"\x89PNG\r\n\x1a\n" + header(*first) + header(*second) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _png_with_split_data(width: int, height: int, parts: int) -> bytes:
    """A grey PNG whose compressed image data is split over ``parts`` IDAT chunks."""
    data = zlib.compress(b"".join(b"\0" + bytes(range(width)) for _ in range(height)))
    step = -(-len(data) // parts)
    chunks = b"".join(_png_chunk(b"IDAT", data[i:i + step]) for i in range(0, len(data), step))
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunks + _png_chunk(b"IEND", b"")


def test_the_pixel_limit_reads_the_header_the_decoder_uses():
    """Two IHDR chunks: the pixel check and the decoding both take the last one (one decoder,
    Pillow's), so a file cannot pass the check at one size and decode at the other."""
    assert decode_image(_png_with_two_headers((20000, 20000), (8, 8)), "x").size == (8, 8)


def test_a_png_whose_data_is_split_over_many_chunks_decodes():
    decoded = np.asarray(decode_image(_png_with_split_data(16, 8, parts=5), "x"))
    assert decoded.shape == (8, 16, 3) and decoded[3, :, 0].tolist() == list(range(16))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"just some text\n", "not an image"),
    (png_bytes(Image.new("RGB", (64, 64), "red"))[:-40], "truncated"),
    (_png_with_size(40000, 40000), "too many pixels"),  # Pillow refuses: over twice its limit
    (_png_with_size(10000, 10000), "too many pixels"),  # Pillow only warns: over its limit
    (_png_with_two_headers((8, 8), (20000, 20000)), "too many pixels"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_raise_one_error_naming_the_file(data, reason):
    with pytest.raises(ImageError, match=reason) as error:
        decode_image(data, "/some/dir/bad file.png")
    assert str(error.value).startswith("/some/dir/bad file.png: ") and "\n" not in str(error.value)


def test_folder_source_names_labels_and_projects(tmp_path):
    for folder in ["camelyon_tumour", "camelyon_normal", ".hidden", "__MACOSX"]:
        (tmp_path / folder).mkdir()
    (tmp_path / "camelyon_tumour" / "a (1) é.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    for system_file in [".DS_Store", "Thumbs.db", "desktop.ini"]:  # file managers' files are no images
        (tmp_path / "camelyon_tumour" / system_file).write_bytes(b"junk")
    (tmp_path / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "camelyon_normal" / "sub").mkdir()
    (tmp_path / "camelyon_normal" / "sub" / "b.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    (tmp_path / "notes.txt").write_text("not a class")
    with pytest.warns(DataSourceWarning, match=r"1 file\(s\) beside the class folders belong to no class .*: notes.txt"):
        items = folder_items(tmp_path, projects_in_names=True)
    assert [(i.name, i.label, i.project) for i in items] == [
        ("camelyon_normal/sub/b.png", "normal", "camelyon"),
        ("camelyon_tumour/a (1) é.png", "tumour", "camelyon"),
    ]
    (tmp_path / "notes.txt").unlink()
    plain = folder_items(tmp_path)
    assert {i.label for i in plain} == {"camelyon_normal", "camelyon_tumour"}
    assert {i.project for i in plain} == {tmp_path.name}
    assert split_project("noproject") == ("", "noproject")


def test_a_label_given_covers_every_file_under_the_folder(tmp_path):
    folder = tmp_path / "malignant"
    for patient in ["patient 2", "patient 1", ".trash"]:
        (folder / patient).mkdir(parents=True)
        (folder / patient / "scan.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    (folder / "loose.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    items = load_items(folder, label="malignant, confirmed")
    assert [(i.name, i.label, i.project) for i in items] == [
        ("loose.png", "malignant, confirmed", "malignant"),
        ("patient 1/scan.png", "malignant, confirmed", "malignant"),
        ("patient 2/scan.png", "malignant, confirmed", "malignant"),
    ]
    with pytest.warns(DataSourceWarning, match="left out: loose.png"):  # without: one class per folder
        assert {i.label for i in load_items(folder)} == {"patient 1", "patient 2"}
    assert load_items(folder / "loose.png")[0].label == "malignant"
    with pytest.raises(DataSourceError, match="cannot go together"):
        load_items(folder, label="x", projects_in_names=True)
    with pytest.raises(DataSourceError, match="carries its own labels"):
        load_items(BREASTMNIST, label="x")


def test_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="no class sub-folders .* --label for all of them"):
        load_items(tmp_path)
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataSourceError, match="no class sub-folders"):
        load_items(tmp_path)
    (tmp_path / "loose.png").unlink()
    with pytest.raises(DataSourceError, match="the folder contains no files"):
        load_items(tmp_path, label="x")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataSourceError, match="contain no files"):
        load_items(tmp_path)
    with pytest.raises(DataSourceError, match="no such file"):
        load_items(tmp_path / "missing")


@pytest.mark.parametrize("path,message", [
    ("", "^the path of the images is empty$"),  # Path("") is the working folder: it was read whole
    ("  ", "^the path of the images is empty$"),
    ("https://example.org/scan.png", "^https://example.org/scan.png: a URL; download the file and give its path$"),
    ("no/such//scan.png", "^no/such//scan.png: no such file or folder$"),  # named as given
])
def test_paths_that_name_no_source_are_one_error(path, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    for read in (load_items, query_items):
        with pytest.raises(DataSourceError, match=message):
            read(path)


def test_npz_source_reads_medmnist_files():
    items = npz_items(BREASTMNIST, "test")
    assert len(items) == 156 and items[0].name == "test/000"
    assert {i.label for i in items} == {"malignant", "normal, benign"}
    image, sha = items[0].read()
    assert image.mode == "RGB" and image.size == (28, 28) and len(sha) == 64
    assert items[1].read()[1] != sha
    mednist = npz_items(SHARED_DATA / "mednist_12k.npz", "val")
    assert {i.label for i in mednist} == {"AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"}
    with pytest.raises(DataSourceError, match="no split 'bogus'"):
        npz_items(BREASTMNIST, "bogus")


def test_one_query_per_class_is_seeded():
    items = npz_items(BREASTMNIST, "val")
    first, again, other = one_per_class(items, 1), one_per_class(items, 1), one_per_class(items, 2)
    assert first == again and [i.label for i in first] == ["malignant", "normal, benign"]
    assert first != other


def test_query_sets_of_every_source(tmp_path):
    npz = query_items(BREASTMNIST, split="val", seed=1)
    assert npz.labelled and not npz.one_image
    assert [i.label for i in npz.items] == ["malignant", "normal, benign"]
    assert len(query_items(BREASTMNIST, split="val", count=5).items) == 5
    new_cases = tmp_path / "new cases"
    new_cases.mkdir()
    for name in ["b.png", "a.png", "c.png", ".hidden.png"]:
        (new_cases / name).write_bytes(png_bytes(Image.new("L", (4, 4))))
    unlabelled = query_items(new_cases)
    assert not unlabelled.labelled and not unlabelled.one_image
    assert [i.name for i in unlabelled.items] == ["a.png", "b.png", "c.png"]
    two = [i.name for i in query_items(new_cases, count=2, seed=0).items]
    assert len(set(two)) == 2 and two == [i.name for i in query_items(new_cases, count=2, seed=0).items]
    assert {tuple(i.name for i in query_items(new_cases, count=2, seed=s).items) for s in range(6)} != {tuple(two)}
    single = query_items(new_cases / "a.png")
    assert single.one_image and not single.labelled and len(single.items) == 1
    (new_cases / "patient 1").mkdir()  # a sub-folder makes a class tree, whose classes hold no files
    with pytest.raises(DataSourceError, match="class folders contain no files"):
        query_items(new_cases)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="the folder contains no files"):
        query_items(tmp_path / "empty")


def _npz(path, images) -> list:
    np.savez(path, train_images=images, train_labels=np.arange(len(images)) % 2)
    return npz_items(path, "train")


def test_npz_images_of_every_layout_and_number_type(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (2, 6, 5), dtype=np.uint8)
    expected = np.asarray(_npz(tmp_path / "grey.npz", grey)[1].read()[0])
    assert expected.shape == (6, 5, 3) and (expected[..., 0] == grey[1]).all()
    one_channel = _npz(tmp_path / "one.npz", grey[..., None])[1].read()[0]
    np.testing.assert_array_equal(np.asarray(one_channel), expected)
    hounsfield = np.full((2, 4, 4), 40, np.int16)  # CT: air -1000, bone 1000, soft tissue 40
    hounsfield[:, 0, 0], hounsfield[:, 0, 1] = -1000, 1000
    ct = np.asarray(_npz(tmp_path / "ct.npz", hounsfield)[0].read()[0])[..., 0]
    assert (ct[0, 0], ct[0, 1], ct[1, 1]) == (0, 255, 132)  # stretched, not clipped: 40 is 1040/2000 up
    masked = np.array([[[np.nan, 0.0], [1.0, 0.5]]], np.float32)  # NaN outside a mask
    pixels = np.asarray(_npz(tmp_path / "masked.npz", masked)[0].read()[0])[..., 0]
    assert pixels.tolist() == [[0, 0], [255, 127]]
    for images in (np.random.default_rng(1).random((2, 4, 4, 3), dtype=np.float32),
                   np.random.default_rng(2).integers(0, 65536, (2, 4, 4, 3)).astype(np.uint16),
                   np.eye(4, dtype=bool)[None].repeat(2, axis=0)):
        image = _npz(tmp_path / "x.npz", images)[0].read()[0]  # one file rewritten: read anew each time
        pixels = np.asarray(image)
        assert image.mode == "RGB" and image.size == (4, 4) and (pixels.min(), pixels.max()) == (0, 255)
        assert (pixels[..., 0] == pixels[..., 1]).all() == (images.ndim == 3)


def _damaged(good: bytes, how: str) -> bytes:
    if how == "not a zip":
        return b"PK\x03\x04 and nothing else"
    if how == "cut short":
        return good[: len(good) // 2]
    damaged = bytearray(good)
    damaged[200:208] = b"\xff" * 8  # inside the deflated images: zlib itself refuses the stream
    return bytes(damaged)


@pytest.mark.parametrize("how,reason", [
    ("not a zip", "not a MedMNIST-style .npz \\(File is not a zip file\\)"),
    ("cut short", "not a MedMNIST-style .npz \\(File is not a zip file\\)"),
    ("flipped bytes", "not a MedMNIST-style .npz \\(Error -3 while decompressing data"),  # was a zlib.error traceback
])
def test_a_damaged_npz_is_one_error(tmp_path, how, reason):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, train_images=np.random.default_rng(0).integers(0, 255, (50, 28, 28), np.uint8),
                        train_labels=np.zeros((50, 1), np.uint8))
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(_damaged(good.read_bytes(), how))
    with pytest.raises(DataSourceError, match=f"^{damaged}: {reason}"):
        load_items(damaged)


def test_a_npy_named_npz_is_one_error(tmp_path):
    """np.load reads a .npy whatever its name: a TypeError traceback before."""
    path = tmp_path / "images.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataSourceError, match=r"images.npz: one .npy array, not an .npz of named arrays"):
        load_items(path)


@pytest.mark.parametrize("shape,dtype,reason", [
    ((2, 3, 8, 8), np.uint8, r"shape \(2, 3, 8, 8\).*channels first\? np.moveaxis\(images, 1, -1\)"),
    ((2, 8, 8, 2), np.uint8, r"shape \(2, 8, 8, 2\); expected N images of shape \(H, W\) or \(H, W, C\) with C = 1, 3 or 4$"),
    ((2, 5, 8, 8), np.uint8, r"shape \(2, 5, 8, 8\); expected .* or 4$"),  # a volume per image
    ((2, 8, 8), np.complex64, "holds complex64 values, not numbers"),
])
def test_npz_arrays_that_are_no_images_are_one_error(tmp_path, shape, dtype, reason):
    with pytest.raises(DataSourceError, match=reason):
        _npz(tmp_path / "bad.npz", np.zeros(shape, dtype))


@pytest.mark.parametrize("arrays,reason", [
    ({"train_images": np.zeros((4, 8, 8), np.uint8), "train_labels": np.zeros((4, 14), np.uint8)},
     r"train_labels has shape \(4, 14\); one class per image is needed, shape \(N,\) or \(N, 1\) \(multi-label "
     r"sets such as ChestMNIST are not supported\)$"),
    ({"train_images": np.zeros((0, 8, 8), np.uint8), "train_labels": np.zeros((0, 1), np.uint8)},
     r"the train split holds no images$"),
    ({"train_images": np.zeros((4, 8, 8), np.uint8)}, r"train_images has no train_labels beside it$"),
])
def test_npz_labels_that_cannot_label_the_images_are_one_error(tmp_path, arrays, reason):
    """Multi-label rows were flattened into a list four times too long; an empty split was 'added'."""
    np.savez(tmp_path / "set.npz", **arrays)
    with pytest.raises(DataSourceError, match=rf"^{tmp_path / 'set.npz'}: {reason}"):
        load_items(tmp_path / "set.npz")


def test_links_are_followed_once_and_broken_ones_reported(tmp_path):
    pool = tmp_path / "pool"
    (pool / "scans").mkdir(parents=True)
    (pool / "scans" / "a.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    (pool / "scans" / "up").symlink_to(pool)  # a link back up its own path: not walked again
    data = tmp_path / "data"
    (data / "benign").mkdir(parents=True)
    (data / "benign" / "patient 1").symlink_to(pool / "scans")
    (data / "benign" / "gone.png").symlink_to(tmp_path / "missing.png")
    (data / "benign" / "circle.png").symlink_to(data / "benign" / "circle.png")
    (data / "malignant").symlink_to(pool)
    with pytest.warns(DataSourceWarning, match=r": a link back to a folder above it \(.*pool.*\), not followed again"):
        items = {i.name: i for i in folder_items(data)}
    assert sorted(items) == ["benign/circle.png", "benign/gone.png", "benign/patient 1/a.png",
                             "malignant/scans/a.png"]
    assert items["benign/patient 1/a.png"].location == str(pool / "scans" / "a.png")
    with pytest.raises(ImageError, match=r"benign/gone.png: cannot read \(No such file"):
        items["benign/gone.png"].read()
    with pytest.raises(ImageError, match=r"benign/circle.png: cannot read \(Too many levels of symbolic links"):
        items["benign/circle.png"].read()


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path):
    (tmp_path / "benign").mkdir()
    (tmp_path / "benign" / "a.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / ".DS_Store").write_bytes(b"")  # hidden: the folder holds no image
    with pytest.warns(DataSourceWarning, match=rf"^{tmp_path}: no files in the class folder normal: that class"):
        assert [item.name for item in folder_items(tmp_path)] == ["benign/a.png"]


def test_printable_names_escape_what_utf8_text_cannot_hold():
    import os

    assert printable(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"  # a Latin-1 byte
    assert printable("two\nlines\x7f.png") == "two\\x0alines\\x7f.png"
    assert printable("café (1) 肺.png") == "café (1) 肺.png"


def test_an_image_too_large_for_the_memory_left_says_how_much_it_needs():
    """A MemoryError was reported with an empty reason ("x.png: MemoryError: "). Here the process
    really runs out: its address space is capped just above what it uses before decoding."""
    script = """
import io, resource, psutil
from PIL import Image
from cbir.errors import ImageError
from cbir.images.decode import decode_image
buffer = io.BytesIO()
Image.new("RGB", (9000, 9000)).save(buffer, format="PNG")
resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + 100 * 2**20, resource.RLIM_INFINITY))
try:
    decode_image(buffer.getvalue(), "scans/big.png")
except ImageError as exc:
    print(exc)
"""
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert printed == "scans/big.png: not enough memory to decode it: needs 232 MB for 9000 x 9000 pixels\n"
