"""Files written whole or not at all.

A command stopped while it writes (Ctrl-C, ``kill``, a full disk) must not leave half a file
where a good one was: the checkpoint of the last finished epoch, a workbook holding the sheets
of earlier runs.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A path beside ``path`` (its folders made) to write to; it replaces ``path`` once the block has finished.

    If the block fails or is interrupted, ``path`` keeps its previous content (or stays absent)
    and the partial file is removed. The partial file keeps the suffix, for writers that go by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole, making its folders."""
    with written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")
