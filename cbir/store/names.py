"""Finding images by name without a Redis field per image: a hash index of (name hash, id) pairs.

The store keeps, per bucket of name hashes, a string of packed pairs (the 64-bit hash of a
name, the id written under it), appended by every write of new names. A pair only says that
the id *may* carry the name: the id's record in its meta chunk says whether it does. So the
index may hold more than it should (pairs of writes a crash cut short, hash collisions between
names), which costs a look at a record and never a wrong answer; it must only never miss a
stored image, which the write order guarantees (pairs go out before the record that makes an
image stored).

Against a Redis hash of name -> id, this saves Redis one field per image (parsed, stored and
logged to the append-only file) on every write and one HMGET field per name on every lookup, and
lets a writer answer "is this name new?" from memory: it more than halved the server's CPU time
of an ingest (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

NAME_BUCKETS = 256
PAIR = np.dtype([("hash", "<u8"), ("id", "<u4")])  # packed: 12 bytes


def name_hashes(names: Sequence[bytes]) -> np.ndarray:
    """A 64-bit hash of each UTF-8 name: crc32 and adler32 side by side.

    32 bits would do for correctness, but a writer adding a million names to a million would
    then meet a few hundred false matches, each a synchronous read of a record chunk.
    """
    crc = np.fromiter(map(zlib.crc32, names), np.uint64, len(names))
    return (crc << np.uint64(32)) | np.fromiter(map(zlib.adler32, names), np.uint64, len(names))


def buckets(hashes: np.ndarray) -> np.ndarray:
    """The bucket of each name hash."""
    return ((hashes >> np.uint64(32)) % np.uint64(NAME_BUCKETS)).astype(np.int64)


def pairs(hashes: np.ndarray, ids: np.ndarray) -> bytes:
    """(hash, id) pairs packed as stored in a bucket."""
    packed = np.empty(len(hashes), PAIR)
    packed["hash"] = hashes
    packed["id"] = ids
    return packed.tobytes()


class NameIndex:
    """(name hash, id) pairs in memory, searched by hash.

    Pairs live in sorted runs that merge as they grow, like a binary counter: adding a batch
    costs a sort of the batch plus, amortised, O(log n) linear merges per pair; a search costs
    two binary searches per run, of which there are O(log n).
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(hashes) for hashes, _ in self._runs)

    def add(self, hashes: np.ndarray, ids: np.ndarray) -> None:
        if not len(hashes):
            return
        hashes, ids = np.asarray(hashes, np.uint64), np.asarray(ids, np.int64)
        order = np.argsort(hashes, kind="stable")
        run = (hashes[order], ids[order])
        while self._runs and len(self._runs[-1][0]) <= 2 * len(run[0]):
            last = self._runs.pop()
            merged = np.concatenate([last[0], run[0]]), np.concatenate([last[1], run[1]])
            order = np.argsort(merged[0], kind="stable")  # two sorted runs: timsort merges them in one pass
            run = (merged[0][order], merged[1][order])
        self._runs.append(run)

    def add_packed(self, blob: bytes) -> None:
        """Add the pairs of a bucket as stored."""
        packed = np.frombuffer(blob, PAIR)
        self.add(packed["hash"], packed["id"])

    def discard(self, ids: np.ndarray) -> None:
        """Forget every pair of ``ids``."""
        runs = []
        for hashes, run_ids in self._runs:
            keep = ~np.isin(run_ids, ids)
            if keep.any():
                runs.append((hashes[keep], run_ids[keep]))
        self._runs = runs

    def candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every pair matching one of ``hashes``, as (position in ``hashes``, id) arrays."""
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]  # ascending keys: each binary search starts where the last one ended
        positions: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        for run_hashes, run_ids in self._runs:
            first = np.searchsorted(run_hashes, ordered)
            hits = np.flatnonzero(run_hashes[np.minimum(first, len(run_hashes) - 1)] == ordered)
            if not len(hits):
                continue
            counts = np.searchsorted(run_hashes, ordered[hits], "right") - first[hits]
            offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            positions.append(order[np.repeat(hits, counts)])
            ids.append(run_ids[np.repeat(first[hits], counts) + offsets])
        if not positions:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(positions), np.concatenate(ids)
