"""How a database lies in Redis: its keys, and the record codec of its meta chunks.

Key layout, with ``P = "cbir:<db>:"`` and ``C`` the database's chunk size::

    P info       hash    schema, model fingerprint and description, dim, chunk size,
                         created time, version (bumped by every committed change)
    P next_id    string  id counter; INCRBY reserves a contiguous range per batch
    P vec:<c>    string  float32 vectors of ids c*C .. c*C+C-1, row-major (SETRANGE / GET)
    P meta:<c>   string  records of chunk c: one block per write, appended, each holding its
                         records column by column (see encode_block); the last entry of an
                         id wins (an update appends)
    P names:<b>  string  the name index: packed (64-bit name hash, u32 id) pairs of the names
                         whose hash falls in bucket b, appended per write (see cbir.store.names)
    P thumbs:<c> hash    id -> a thumbnail of the image (JPEG, at most 128 px), written with its
                         vector, deleted with it
    P keys       set     further keys of this database (a trained index, its pictures, the service's
                         audit log), so that dropping the database drops them
    P pictures   hash    picture name (e.g. tsne.png) -> its bytes, the latest made of this database
    P audit      list    the service's log of adds and removals (JSON entries, newest first)
    P journal    list    once an index is trained (info field ``journal``): one entry per
                         committed change, b"+" or b"-" then the int64 ids added or removed,
                         pushed with the version bump, so an index can be brought up to date
    P lock       string  the writer lock ("host:pid:token"), with a time-out
"""
from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from typing import Iterator, Sequence

import numpy as np

from cbir.errors import StoreError

# 3: a name index of hash pairs (2: a name -> id hash map; 1: one meta entry per record)
SCHEMA_VERSION = "3"


CHUNK_BYTES = 512 * 1024  # vector bytes per chunk key, at most


DB_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


_TEXT_FIELDS = ("name", "label", "project", "source")


_LABEL_COLUMN = _TEXT_FIELDS.index("label")


_VALUE_SEPARATOR = "\x1f"  # ASCII unit separator, between the values of one text column


_COLUMN_SEPARATOR = "\x1e"  # ASCII record separator, between the text columns


_FORBIDDEN_CHARACTERS = (_VALUE_SEPARATOR, _COLUMN_SEPARATOR, "\0")


_BLOCK_HEADER = struct.Struct("<II")  # records in the block, bytes of its text


_DIGEST_BYTES = 32


_NO_DIGEST = "0" * 2 * _DIGEST_BYTES


@dataclass(frozen=True)
class ImageRecord:
    """What the database knows about one image, besides its vector."""

    name: str
    label: str
    project: str = ""
    sha256: str = ""
    source: str = ""
    added: float = 0.0


def is_sha256_hex(text: str) -> bool:
    """Whether ``text`` is a sha256 digest as hexdigest() writes it: 64 hexadecimal digits."""
    try:
        return len(text) == 2 * _DIGEST_BYTES and len(bytes.fromhex(text)) == _DIGEST_BYTES
    except ValueError:
        return False


@dataclass
class Columns:
    """Records column by column, as a write needs them: each is read from the records once.

    ``text`` holds the name, label, project and source columns; ``digests`` the sha256 of each
    record as a (n, 32) uint8 array (zeros where a record has none).
    """

    text: list[list[str]]
    added: np.ndarray
    digests: np.ndarray

    @classmethod
    def of(cls, records: Sequence[ImageRecord]) -> "Columns":
        """The columns of ``records``; a record the store cannot keep raises a StoreError naming it."""
        text = [list(map(attrgetter(f), records)) for f in _TEXT_FIELDS]
        if any(c in "".join(column) for column in text for c in _FORBIDDEN_CHARACTERS):
            bad = next(r for r in records if any(c in getattr(r, f) for f in _TEXT_FIELDS
                                                   for c in _FORBIDDEN_CHARACTERS))
            raise StoreError(f"{bad.name!r}: a name, label, project or source contains a control character")
        if "" in text[0]:
            raise StoreError("every image needs a non-empty name")
        hexes = [r.sha256 or _NO_DIGEST for r in records]
        try:
            raw = bytes.fromhex("".join(hexes))
        except ValueError:
            raw = b""
        if len(raw) != _DIGEST_BYTES * len(records):
            bad = next(r for r, h in zip(records, hexes) if not is_sha256_hex(h))
            raise StoreError(f"{bad.name!r}: sha256 {bad.sha256!r} is not 64 hexadecimal digits")
        return cls(text, np.fromiter(map(attrgetter("added"), records), "<f8", len(records)),
                   np.frombuffer(raw, np.uint8).reshape(-1, _DIGEST_BYTES))

    def __len__(self) -> int:
        return len(self.added)

    @property
    def names(self) -> list[str]:
        return self.text[0]

    @property
    def sources(self) -> list[str]:
        return self.text[_TEXT_FIELDS.index("source")]

    def rows(self, positions: np.ndarray) -> "Columns":
        """The columns of the rows at ``positions`` (ascending); a slice where they are contiguous."""
        if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
            rows = slice(int(positions[0]), int(positions[-1]) + 1)
            return Columns([column[rows] for column in self.text], self.added[rows], self.digests[rows])
        listed = positions.tolist()
        return Columns([[column[p] for p in listed] for column in self.text], self.added[positions],
                       self.digests[positions])


def encode_block(ids: np.ndarray, columns: Columns) -> bytes:
    r"""One block of a meta chunk, column by column: ``<u32 n><u32 text bytes>``, the n ids (u32),
    the n sha256 digests, the n added times (f64), then the name, label, project and source
    columns as UTF-8 text (values joined by \x1f, columns by \x1e).

    Columns make a write a handful of joins per batch instead of a pack per record, and let a
    reader take a chunk's ids with one ``frombuffer``, without decoding any text.
    """
    encoded = _COLUMN_SEPARATOR.join(map(_VALUE_SEPARATOR.join, columns.text)).encode("utf-8")
    return b"".join((_BLOCK_HEADER.pack(len(columns), len(encoded)), ids.astype("<u4").tobytes(),
                     np.ascontiguousarray(columns.digests, np.uint8).tobytes(),
                     columns.added.astype("<f8").tobytes(), encoded))


class _Block:
    """One parsed block; its text is decoded on first use."""

    def __init__(self, ids: np.ndarray, digests: memoryview, added: np.ndarray, text: memoryview):
        self.ids, self.digests, self.added, self._text = ids, digests, added, text
        self._columns: list[list[str]] | None = None

    def digest(self, row: int) -> bytes:
        return bytes(self.digests[row * _DIGEST_BYTES:(row + 1) * _DIGEST_BYTES])

    @property
    def columns(self) -> list[list[str]]:
        if self._columns is None:
            self._columns = [c.split(_VALUE_SEPARATOR) for c in
                             str(self._text, "utf-8").split(_COLUMN_SEPARATOR)]
        return self._columns

    def name(self, row: int) -> str:
        return self.columns[0][row]

    def record(self, row: int) -> ImageRecord:
        name, label, project, source = (column[row] for column in self.columns)
        digest = self.digest(row)
        return ImageRecord(name=name, label=label, project=project, source=source,
                           sha256=digest.hex() if any(digest) else "", added=float(self.added[row]))


class MetaChunk:
    """The records of one chunk: a sequence of blocks, one per write that touched the chunk.

    A later block's entry for an id replaces an earlier one (an update appends a block).
    """

    def __init__(self, blob: bytes | None):
        self._blocks: list[_Block] = []
        view, offset = memoryview(blob or b""), 0
        while offset < len(view):
            count, text_bytes = _BLOCK_HEADER.unpack_from(view, offset)
            offset += _BLOCK_HEADER.size
            ids = np.frombuffer(view, "<u4", count, offset).astype(np.int64)
            offset += 4 * count
            digests = view[offset:offset + _DIGEST_BYTES * count]
            offset += _DIGEST_BYTES * count
            added = np.frombuffer(view, "<f8", count, offset)
            offset += 8 * count
            self._blocks.append(_Block(ids, digests, added, view[offset:offset + text_bytes]))
            offset += text_bytes
        if len(self._blocks) == 1:
            self.ids = self._blocks[0].ids  # written at once: distinct and ascending
        else:
            self.ids = np.unique(np.concatenate([b.ids for b in self._blocks] or [np.empty(0, np.int64)]))
        self._where: dict[int, tuple[_Block, int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _location(self, image_id: int) -> tuple[_Block, int] | None:
        if self._where is None:
            self._where = {}
            for block in self._blocks:
                self._where.update((i, (block, row)) for row, i in enumerate(block.ids.tolist()))
        return self._where.get(image_id)

    def __contains__(self, image_id: int) -> bool:
        return self._location(image_id) is not None

    def get(self, image_id: int) -> ImageRecord | None:
        location = self._location(image_id)
        return None if location is None else location[0].record(location[1])

    def name_and_digest(self, image_id: int) -> tuple[str, bytes] | None:
        """The name and sha256 of ``image_id``, without decoding the rest of its record."""
        location = self._location(image_id)
        return None if location is None else (location[0].name(location[1]), location[0].digest(location[1]))

    def records(self) -> list[tuple[int, ImageRecord]]:
        """Every (id, record) of the chunk, ids ascending."""
        return [(i, self.get(i)) for i in self.ids.tolist()]

    def label_counts(self) -> Counter:
        """How many records of the chunk have each label."""
        if len(self._blocks) == 1:  # written at once, or rewritten by a removal: every row is live
            return Counter(self._blocks[0].columns[_LABEL_COLUMN])
        return Counter(record.label for _, record in self.records())


def encoded_names(names: Sequence[str]) -> list[bytes]:
    """The names in UTF-8; one encode and split instead of one per name (checked names hold no
    _VALUE_SEPARATOR)."""
    return _VALUE_SEPARATOR.join(names).encode("utf-8").split(_VALUE_SEPARATOR.encode()) if names else []


def grouped_positions(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, positions holding it) for each distinct key, positions ascending."""
    order = np.argsort(keys, kind="stable")
    distinct, starts = np.unique(keys[order], return_index=True)
    return zip(distinct.tolist(), np.split(order, starts[1:]))


def chunk_size_for(dim: int) -> int:
    """Vectors per chunk: as many as fit, with Redis' string header, in CHUNK_BYTES.

    Allocators round a block up to a size class; a chunk of exactly 512 KiB plus a header would
    take the 640 KiB class (25 % waste), one just under it takes 512 KiB.
    """
    return max(1, (CHUNK_BYTES - 64) // (dim * 4))


def check_db_name(name: str) -> str:
    if not name or len(name) > 128 or not set(name) <= DB_NAME_CHARS or name[0] in ".-":
        raise StoreError(
            f"invalid database name {name!r}: use letters, digits, '_', '-' and '.' (at most 128)"
        )
    return name

