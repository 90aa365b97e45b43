"""Files written whole or not at all, and durably.

A command stopped while it writes (Ctrl-C, ``kill``, a full disk, the machine losing power) must
not leave half a file where a good one was: the checkpoint of the last finished epoch, a workbook
holding the sheets of earlier runs.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A path beside ``path`` (its folders made) to write to; it replaces ``path`` once the block has finished.

    If the block fails or is interrupted, ``path`` keeps its previous content (or stays absent)
    and the partial file is removed. Each writer gets a partial file of its own (two processes
    writing one output do not write into one file), which keeps the suffix, for writers that go
    by it. Before the rename the file's data reach the disk, and after it the folder's entry
    does: a machine that dies leaves the old file or the new one, never an empty one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{path.suffix}")
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's permissions, as open() gives
    try:
        yield partial
        _sync(partial)
        os.replace(partial, path)
        _sync(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flush a file's (or a folder's) data to the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole, making its folders."""
    with written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")
