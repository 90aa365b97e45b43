"""Image sources: class-per-folder directories, MedMNIST-style ``.npz`` files, single images.

A source is a list of :class:`ImageItem`; each knows its name (unique within its source, the
key of the database), label, project and how to read its bytes. Decoding is robust to the
images found in practice (grey, RGB, RGBA, palette, 16-bit, EXIF rotation, DICOM) and refuses
decompression bombs; a file that cannot be decoded raises :class:`ImageError` naming it.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from cbir.errors import DataSourceError, DataSourceWarning, ImageError
from cbir.files import written_whole
from cbir.images.decode import IMAGE_SHAPES, NUMBER_KINDS, array_image, decode_image, is_image_shape

NPZ_SPLITS = ("train", "val", "test")

# Class names of the MedMNIST v2 sets (from the dataset's INFO); other .npz files may carry
# their own in a ``classes`` array, else labels stay the integers.
MEDMNIST_CLASSES = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
}
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{flag}.npz?download=1"


# Control characters (a newline in a file name) as \xNN escapes: names and labels are printed
# in tables and stored between separators.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


def printable(text: str) -> str:
    """``text`` as printable Unicode. Python gives the bytes of a file name that are not UTF-8 (a
    Latin-1 name from an old archive) as lone surrogates, which no UTF-8 text can hold: they become
    \\xNN escapes, as control characters do. The same name always gives the same text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").translate(_CONTROL_ESCAPES)


@dataclass(frozen=True)
class ImageItem:
    """One image of a source. ``location`` is a file path, or ``path.npz#split/index``, or, for
    bytes received (an upload to the service, never written to disk), what names them in
    messages; the name, label and project are made :func:`printable`."""

    name: str
    label: str
    project: str
    location: str
    data: bytes | None = field(default=None, repr=False, compare=False)  # the file's bytes, where in memory

    def __post_init__(self) -> None:
        for field_name in ("name", "label", "project"):
            object.__setattr__(self, field_name, printable(getattr(self, field_name)))

    def read(self, keep_grey: bool = False) -> tuple[Image.Image, str]:
        """The decoded RGB image (or L, see :func:`decode_image`) and the sha256 of its content."""
        content, digest = self._content()
        if isinstance(content, np.ndarray):
            return array_image(content, self.location, keep_grey), digest
        return decode_image(content, self.location, keep_grey), digest

    def digest(self) -> str:
        """The sha256 of the content, as :meth:`read` gives it, without decoding the image."""
        return self._content()[1]

    def _content(self) -> tuple[bytes | np.ndarray, str]:
        if self.data is not None:
            return self.data, hashlib.sha256(self.data).hexdigest()
        path, _, inner = self.location.partition("#")
        if inner:
            split, index = inner.split("/")
            array = np.ascontiguousarray(_npz_split(path, split)[0][int(index)])
            return array, hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        return data, hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------- sources
# Written by file managers beside images (macOS's zip archives add a __MACOSX folder); never data.
_SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILES


def split_project(folder_name: str) -> tuple[str, str]:
    """``<project>_<class>`` -> (project, class); a name without '_' is a class of no project."""
    project, sep, label = folder_name.partition("_")
    return (project, label) if sep and label else ("", folder_name)


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder``, sorted, none hidden or inside a hidden folder. Links to folders are
    followed (datasets are often assembled from links), except back up their own path; a link to
    nothing is listed, so that reading it reports it."""
    files: list[Path] = []

    def walk(directory: Path, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(directory)
        if real in ancestors:
            warnings.warn(f"{directory}: a link back to a folder above it ({real}), not followed again",
                          DataSourceWarning, stacklevel=4)
            return
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise DataSourceError(f"{directory}: cannot list the folder ({exc.strerror or exc})") from exc
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if _is_folder(entry):
                walk(Path(entry.path), ancestors | {real})
            else:
                files.append(Path(entry.path))

    walk(folder, frozenset())
    return sorted(files)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link in a circle: listed as a file, whose reading reports it
        return False


def _real_path(file: Path) -> str:
    """Where a file's bytes are; a link to nothing or in a circle stays itself, named when it is read."""
    try:
        return str(file.resolve(strict=True))
    except (OSError, RuntimeError):
        return str(file.absolute())


def class_folders(root: Path) -> list[Path]:
    """The sub-folders of ``root`` that hold one class each: all but hidden ones."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _warn_of_files_without_class(root: Path) -> None:
    """Files beside the class folders belong to no class: say so rather than drop them unseen."""
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not _is_hidden(p.name))
    if loose:
        shown = ", ".join(loose[:3]) + (f" and {len(loose) - 3} more" if len(loose) > 3 else "")
        warnings.warn(f"{root}: {len(loose)} file(s) beside the class folders belong to no class and are "
                      f"left out: {shown}", DataSourceWarning)


def folder_items(root: Path, project: str | None = None, projects_in_names: bool = False,
                 label: str | None = None) -> list[ImageItem]:
    """Every file under each class sub-folder of ``root`` (recursively), hidden files excepted;
    with ``label``, every file under ``root`` itself, all of that class (a folder of one diagnosis,
    say, in folders per patient).

    Files are not filtered by extension: a non-image file is reported when it fails to decode.
    """
    project_of_root = project if project is not None else root.name
    if label is not None:
        if projects_in_names:
            raise DataSourceError(f"{root}: one label for all images and projects from class folder names "
                                  f"(<project>_<class>) cannot go together")
        files = _visible_files(root)
        if not files:
            raise DataSourceError(f"{root}: the folder contains no files")
        return [ImageItem(name=f.relative_to(root).as_posix(), label=label, project=project_of_root,
                          location=_real_path(f)) for f in files]
    class_dirs = class_folders(root)
    if not class_dirs:
        raise DataSourceError(f"{root}: no class sub-folders (expected one folder per class, or, to add "
                              f"images of one class, --label for all of them)")
    items, empty = [], []
    for class_dir in class_dirs:
        if projects_in_names:
            item_project, class_name = split_project(class_dir.name)
        else:
            item_project, class_name = project_of_root, class_dir.name
        files = _visible_files(class_dir)
        empty += [] if files else [class_dir.name]
        items += [ImageItem(name=f.relative_to(root).as_posix(), label=class_name, project=item_project,
                            location=_real_path(f)) for f in files]
    if empty and items:
        warnings.warn(f"{root}: no files in the class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)}: "
                      f"{'those classes get' if len(empty) > 1 else 'that class gets'} no image",
                      DataSourceWarning, stacklevel=3)
    if not items:
        raise DataSourceError(f"{root}: the class folders contain no files")
    _warn_of_files_without_class(root)
    return items


def _npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a split, read once per version of the file."""
    try:
        version = os.stat(path)
    except OSError as exc:
        raise DataSourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return _read_npz_split(path, split, version.st_mtime_ns, version.st_size)


def _npz_archive(path: str) -> np.lib.npyio.NpzFile:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):  # np.load reads a .npy whatever its name
        raise DataSourceError(f"{path}: one .npy array, not an .npz of named arrays (train_images, "
                              "train_labels, ...)")
    return archive


@lru_cache(maxsize=8)
def _read_npz_split(path: str, split: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with _npz_archive(path) as archive:
            if f"{split}_images" not in archive:
                present = sorted(k[: -len("_images")] for k in archive.files if k.endswith("_images"))
                raise DataSourceError(f"{path}: no split '{split}' (has: {', '.join(present) or 'none'})")
            if f"{split}_labels" not in archive:
                raise DataSourceError(f"{path}: {split}_images has no {split}_labels beside it")
            images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # cut short, damaged
        raise DataSourceError(f"{path}: not a MedMNIST-style .npz ({exc})") from exc
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataSourceError(f"{path}: {split}_labels has shape {labels.shape}; one class per image is needed, "
                              f"shape (N,) or (N, 1) (multi-label sets such as ChestMNIST are not supported)")
    return images, labels.reshape(-1)


def npz_class_names(path: Path) -> list[str] | None:
    with _npz_archive(str(path)) as archive:
        if "classes" in archive.files:
            return [str(c) for c in archive["classes"]]
    return MEDMNIST_CLASSES.get(path.stem.split("_")[0])


def npz_items(path: Path, split: str, project: str | None = None) -> list[ImageItem]:
    """One item per image of ``split``; names are ``<split>/<index>`` (zero-padded)."""
    images, labels = _npz_split(str(path.resolve()), split)
    if not len(images):
        raise DataSourceError(f"{path}: the {split} split holds no images")
    if len(images) != len(labels):
        raise DataSourceError(f"{path}: {split}_images has shape {images.shape}, labels {labels.shape}")
    if not is_image_shape(images.shape[1:]):
        channels_first = is_image_shape(images.shape[2:] + images.shape[1:2])
        raise DataSourceError(f"{path}: {split}_images has shape {images.shape}; expected N images of shape "
                              f"{IMAGE_SHAPES}"
                              + ("; channels first? np.moveaxis(images, 1, -1) puts them last" if channels_first else ""))
    if images.dtype.kind not in NUMBER_KINDS:
        raise DataSourceError(f"{path}: {split}_images holds {images.dtype} values, not numbers")
    names = npz_class_names(path)
    width = len(str(len(images)))
    project = project if project is not None else path.stem
    location = str(path.resolve())
    return [ImageItem(name=f"{split}/{i:0{width}d}",
                      label=names[int(y)] if names and 0 <= int(y) < len(names) else str(int(y)),
                      project=project, location=f"{location}#{split}/{i}")
            for i, y in enumerate(labels.tolist())]


def some_labels(labels, shown: int = 5) -> str:
    """The distinct labels, sorted and quoted (labels may hold commas), the first ``shown`` of them."""
    names = sorted(set(map(str, labels)))
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(repr(name) for name in names[:shown]) + more


def source_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path that exists; an empty path (it would mean the working folder) and a URL are refused."""
    text = os.fspath(path)
    if not text.strip():
        raise DataSourceError("the path of the images is empty")
    if not Path(text).exists():
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
            raise DataSourceError(f"{text}: a URL; download the file and give its path")
        raise DataSourceError(f"{text}: no such file or folder")
    return Path(text)


def load_items(path: str | os.PathLike, split: str = "train", project: str | None = None,
               projects_in_names: bool = False, label: str | None = None,
               names_by_project: bool = False) -> list[ImageItem]:
    """The items of a folder, a ``.npz`` split, or a single image file. ``label``: the class of
    every image of a folder or of the single file (default: a file's folder name; a folder's
    class sub-folders); an ``.npz`` carries its own labels. ``names_by_project``: each name is
    ``<project>/<name>``, so that two sources' files of one name (``benign/a.png`` in two
    hospitals' exports) are two images."""
    items = _items(path, split, project, projects_in_names, label)
    if names_by_project:
        items = [replace(item, name=f"{item.project}/{item.name}" if item.project else item.name) for item in items]
    return items


def _items(path: str | os.PathLike, split: str, project: str | None, projects_in_names: bool,
           label: str | None) -> list[ImageItem]:
    path = source_path(path)
    if path.is_dir():
        return folder_items(path, project, projects_in_names, label)
    if path.suffix == ".npz":
        if label is not None:
            raise DataSourceError(f"{path}: an .npz carries its own labels; a label is for image files and folders")
        return npz_items(path, split, project)
    return [ImageItem(name=path.name, label=label if label is not None else path.parent.name,
                      project=project or "", location=_real_path(path))]


def per_class_in_turn(labels: Sequence[str], count: int, seed: int = 0) -> np.ndarray:
    """Positions of one random item per label in turn (labels sorted, seeded) until ``count``."""
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in sorted(set(labels.tolist()))}
    rows: list[int] = []
    while len(rows) < count and any(pools.values()):
        for pool in pools.values():
            if pool and len(rows) < count:
                rows.append(int(pool.pop()))
    return np.array(rows, np.int64)


@dataclass(frozen=True)
class QuerySet:
    """The images a query source asks about, and whether their labels are known."""

    items: list[ImageItem]
    labelled: bool
    one_image: bool  # --path was one image file: one answer, not a list


def every_item(path: str | os.PathLike, split: str = "train") -> list[ImageItem]:
    """Every image of ``path`` whatever its layout: all files under a folder (class sub-folders
    or not), an ``.npz`` split, or one file."""
    path = source_path(path)
    return load_items(path, split=split, label=None if path.is_file() and path.suffix == ".npz" else "")


def content_digests(items: Sequence[ImageItem]) -> tuple[dict[str, list[str]], list[str]]:
    """The names of the items of each content digest, and the files that cannot be read (file: reason)."""
    digests: dict[str, list[str]] = {}
    failures = []
    for item in items:
        try:
            digests.setdefault(item.digest(), []).append(item.name)
        except ImageError as exc:
            failures.append(str(exc))
    return digests, failures


def query_items(path: str | os.PathLike, split: str = "train", seed: int = 0, count: int | None = None) -> QuerySet:
    """The queries of ``path``, as in the thesis: one random image per class (seeded) of a folder with
    class sub-folders or of an ``.npz`` split, classes taking turns up to ``count``. A folder without
    sub-folders holds unlabelled queries (new cases, say): every image, or ``count`` random ones.
    An image file is the one query; its folder is no label of it.
    """
    path = source_path(path)
    if path.is_dir() and not class_folders(path):
        items = folder_items(path, project="", label="")
        if count is not None:
            items = one_per_class(items, seed=seed, count=count)  # one class, the empty label
        return QuerySet(items, labelled=False, one_image=False)
    items = load_items(path, split=split)
    if path.is_dir() or path.suffix == ".npz":
        return QuerySet(one_per_class(items, seed=seed, count=count), labelled=True, one_image=False)
    return QuerySet(items, labelled=False, one_image=True)


def one_per_class(items: Sequence[ImageItem], seed: int = 0, count: int | None = None) -> list[ImageItem]:
    """One random item of each label (seeded), labels in sorted order: the thesis' query set.

    With ``count``, labels take turns until that many items are chosen.
    """
    labels = [item.label for item in items]
    return [items[p] for p in per_class_in_turn(labels, count or len(set(labels)), seed)]


def download_medmnist(flag: str, root: str | os.PathLike) -> Path:
    """Fetch a MedMNIST v2 ``.npz`` (needs internet; the tests use ``../shared/data`` instead)."""
    target = Path(root) / f"{flag}.npz"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(target) as partial:
            urllib.request.urlretrieve(MEDMNIST_URL.format(flag=flag), partial)
    return target
