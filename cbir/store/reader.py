"""Reading a database: records, vectors and names, consistent while another process writes."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Sequence

import numpy as np
import redis

from cbir.errors import StoreError
from cbir.store.layout import ImageRecord, MetaChunk
from cbir.store.names import NameIndex, buckets, name_hashes
from cbir.store.redis.connect import evicting_servers

# Rows of one chunk from which reading the chunk whole beats a GETRANGE per row (measured on the
# embedded Redis with 1280-d rows: docs/PERFORMANCE.md).
ROWS_WORTH_A_CHUNK = 32
PIPELINE_CHUNKS = 32  # chunks read per pipeline round trip when loading
SHORT_PASSES = 3  # reads of a chunk whose vectors fall short of its records before they count as missing


class ReadingMixin:
    """The reads of :class:`~cbir.store.database.VectorStore` (its client, keys and chunk size)."""

    def _num_chunks(self) -> int:
        next_id = int(self.call("reading", self.client.get, self.prefix + "next_id") or 0)
        return -(-next_id // self.chunk_size)

    def _chunk_batches(self, chunks: int | None = None) -> Iterator[range]:
        """The numbers of the database's chunks (of its first ``chunks``), in groups read with one
        pipeline round trip each."""
        chunks = self._num_chunks() if chunks is None else chunks
        for first in range(0, chunks, PIPELINE_CHUNKS):
            yield range(first, min(first + PIPELINE_CHUNKS, chunks))

    def _every_meta_chunk(self) -> Iterator[MetaChunk]:
        """The records of every chunk, in chunk order."""
        for batch in self._chunk_batches():
            yield from self._meta_chunks(batch).values()

    def count(self) -> int:
        if not self.exists:
            return 0
        return sum(len(chunk) for chunk in self._every_meta_chunk())

    # ---------------------------------------------------------------- writes
    def lookup(self, names: Sequence[str]) -> list[int | None]:
        """The id stored under each name (None where the name is unknown)."""
        hashes = name_hashes([n.encode("utf-8") for n in names])
        ids, _ = self._confirmed(list(names), *self._candidates(hashes))
        return [None if i < 0 else i for i in ids.tolist()]

    def _candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, id) of every name index pair matching one of ``hashes``.

        A writer keeps its copy of the index for as long as it holds the lock (no one else adds
        names meanwhile), reading each bucket once; anyone else reads the buckets afresh.
        """
        index, loaded = self._names if self._lock_token and self._names else (NameIndex(), set())
        missing = sorted(set(buckets(hashes).tolist()) - loaded)
        if missing:
            index.add_packed(b"".join(blob for blob in self._chunk_blobs(self.names_key, missing).values() if blob))
            loaded.update(missing)
        if self._lock_token:
            self._names = (index, loaded)
        return index.candidates(hashes)

    def _confirmed(self, names: Sequence[str], positions: np.ndarray,
                   candidates: np.ndarray) -> tuple[np.ndarray, dict[int, bytes]]:
        """The candidates whose record carries their name: the id of each name (-1 where none)
        and, by position, the stored sha256. The others are hash collisions or stale pairs."""
        ids = np.full(len(names), -1, np.int64)
        digests: dict[int, bytes] = {}
        if not len(positions):
            return ids, digests
        metas = self._meta_chunks((candidates // self.chunk_size).tolist())
        for position, image_id in zip(positions.tolist(), candidates.tolist()):
            entry = metas[image_id // self.chunk_size].name_and_digest(image_id)
            if entry is not None and entry[0] == names[position]:
                ids[position] = image_id
                digests[position] = entry[1]
        return ids, digests

    def _meta_chunks(self, chunks: Iterable[int]) -> dict[int, MetaChunk]:
        return {c: MetaChunk(blob) for c, blob in self._meta_blobs(sorted(set(chunks))).items()}

    def _meta_blobs(self, chunks: list[int]) -> dict[int, bytes | None]:
        return self._chunk_blobs(self.meta_key, chunks)

    def _chunk_blobs(self, key_of, chunks: list[int], what: str = "reading") -> dict[int, bytes | None]:
        """The value of ``key_of(chunk)`` for each of ``chunks`` (chunks or name buckets), in one
        round trip per node."""
        return dict(zip(chunks, self.execute(what, [("GET", key_of(chunk)) for chunk in chunks])))

    # ----------------------------------------------------------------- reads
    def records(self, ids: Sequence[int]) -> list[ImageRecord | None]:
        chunks = self._meta_chunks(i // self.chunk_size for i in ids)
        return [chunks[i // self.chunk_size].get(i) for i in ids]

    def iter_records(self) -> Iterator[tuple[int, ImageRecord]]:
        """Every stored (id, record), in id order."""
        self.require()
        for chunk in self._every_meta_chunk():
            yield from chunk.records()

    def label_counts(self) -> Counter:
        """How many stored images have each label; one pass over the records, without building one
        record object per image (several times faster than :meth:`iter_records`)."""
        self.require()
        counts: Counter = Counter()
        for chunk in self._every_meta_chunk():
            counts.update(chunk.label_counts())
        return counts

    def thumbnail(self, image_id: int) -> bytes | None:
        """The stored thumbnail of an image (JPEG), None where the image or its thumbnail is not stored."""
        record = self.records([image_id])[0]
        if record is None:  # removed: its thumbnail is never shown again, whatever a write left
            return None
        return self.call("reading", self.client.hget, self.thumbnails_key(image_id // self.chunk_size), image_id)

    def thumbnail_ids(self) -> set[int]:
        """The ids that have a stored thumbnail."""
        keys = [self.thumbnails_key(chunk) for chunk in range(self._num_chunks())]
        return {int(i) for fields in self.execute("reading", [("HKEYS", key) for key in keys]) for i in fields or []}

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of ``ids`` that are stored, ascending."""
        wanted = np.unique(np.asarray(ids, np.int64))
        metas = self._meta_chunks(np.unique(wanted // self.chunk_size).tolist())
        live = wanted[np.isin(wanted, np.concatenate([m.ids for m in metas.values()] or [np.empty(0, np.int64)]))]
        return live, self.vector_rows(live)

    def vector_rows(self, ids: np.ndarray) -> np.ndarray:
        """The vector of each of ``ids``, in order, e.g. the candidates an IVF-PQ search re-ranks:
        a chunk holding fewer than ROWS_WORTH_A_CHUNK of them is read row by row (GETRANGE), not
        whole (512 KiB for one row), the others whole. No liveness check (see :meth:`vectors`);
        an id whose row was never written reads as zeros."""
        ids = np.asarray(ids, np.int64)
        row_bytes = self.dim * 4
        chunks, rows_in_chunk = np.divmod(ids, self.chunk_size)
        present, counts = np.unique(chunks, return_counts=True)
        whole = present[counts >= ROWS_WORTH_A_CHUNK].tolist()
        single = np.flatnonzero(~np.isin(chunks, whole))
        replies = self.execute("reading vectors of", [("GET", self.vector_key(chunk)) for chunk in whole] + [
            ("GETRANGE", self.vector_key(chunk), row * row_bytes, (row + 1) * row_bytes - 1)
            for chunk, row in zip(chunks[single].tolist(), rows_in_chunk[single].tolist())])
        rows = np.zeros((len(ids), self.dim), np.float32)
        by_chunk = np.argsort(chunks, kind="stable")
        starts = np.searchsorted(chunks[by_chunk], whole, side="left")
        ends = np.searchsorted(chunks[by_chunk], whole, side="right")
        for start, end, blob in zip(starts, ends, replies):
            blob = blob or b""
            stored = np.frombuffer(blob, np.float32, len(blob) // row_bytes * self.dim).reshape(-1, self.dim)
            mine = by_chunk[start:end]
            mine = mine[rows_in_chunk[mine] < len(stored)]
            rows[mine] = stored[rows_in_chunk[mine]]
        for position, blob in zip(single.tolist(), replies[len(whole):]):
            if len(blob) == row_bytes:
                rows[position] = np.frombuffer(blob, np.float32)
        return rows

    def _settled_chunks(self, batch: range) -> dict[int, tuple[MetaChunk, bytes | None]]:
        """The (records, vectors blob) of each chunk of ``batch``, read so that they agree while
        other processes write: records, then vectors, then records again, each read after the last
        one's answer (under Cluster they live on different nodes), and a chunk whose records changed
        in between read again. A write stores vectors before the records that make them live, and
        a removal drops records before erasing vectors, so records that stayed the same across the
        vector read have every live row in it, unless the database was dropped and written again
        in between (the same records back, their vectors not yet): a chunk whose vectors fall short
        of its records is read again, and reported missing after SHORT_PASSES such reads. A chunk
        stops changing once it is full."""
        settled: dict[int, tuple[MetaChunk, bytes | None]] = {}
        short: Counter = Counter()
        pending = list(batch)
        before = self._meta_blobs(pending)
        while pending:
            blobs = self._chunk_blobs(self.vector_key, pending, "loading vectors from")
            after = self._meta_blobs(pending)
            for chunk in pending:
                if after[chunk] != before[chunk]:
                    continue
                records = MetaChunk(after[chunk])
                if not self._vectors_cover(chunk, records, blobs[chunk]):
                    short[chunk] += 1
                    if short[chunk] < SHORT_PASSES:
                        continue
                    raise StoreError(f"database '{self.name}': vectors of chunk {chunk} are missing"
                                     + self._why_missing())
                settled[chunk] = (records, blobs[chunk])
            pending = [chunk for chunk in pending if chunk not in settled]
            before = after
        return dict(sorted(settled.items()))

    def _vectors_cover(self, chunk: int, records: MetaChunk, blob: bytes | None) -> bool:
        """Whether ``blob`` holds a row for every live record of ``chunk``."""
        if not len(records):
            return True
        last_row = int(records.ids[-1]) - chunk * self.chunk_size
        return blob is not None and len(blob) >= (last_row + 1) * self.dim * 4

    def _why_missing(self) -> str:
        """The likely cause of data gone missing, where the server says so; else nothing."""
        try:
            evicting = evicting_servers(self.client)
        except redis.RedisError:
            return ""
        return f", likely evicted by {'; '.join(evicting)}" if evicting else ""

    def load_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored (ids, vectors), ids ascending; vectors float32 of shape (n, dim)."""
        ids, vectors, _ = self._load(decode_records=False)
        return ids, vectors

    def load_with_records(self) -> tuple[np.ndarray, np.ndarray, list[ImageRecord]]:
        """All stored (ids, vectors, records), read in the same single pass over the chunks."""
        return self._load(decode_records=True)

    def _load(self, decode_records: bool) -> tuple[np.ndarray, np.ndarray, list[ImageRecord]]:
        self.require()
        row_bytes = self.dim * 4
        # Filled in place, sized for every id given so far: pages past the live rows are never
        # touched, so they cost address space only, where gathering parts and concatenating them
        # would write every vector twice. Chunks a writer starts while this runs are left out.
        chunks = self._num_chunks()
        capacity = chunks * self.chunk_size
        ids = np.empty(capacity, np.int64)
        vectors = np.empty((capacity, self.dim), np.float32)
        records: list[ImageRecord] = []
        count = 0
        for batch in self._chunk_batches(chunks):
            for chunk, (records_of_chunk, blob) in self._settled_chunks(batch).items():
                live = len(records_of_chunk)
                if not live:
                    continue
                rows = records_of_chunk.ids - chunk * self.chunk_size
                matrix = np.frombuffer(blob, np.float32, (len(blob) // row_bytes) * self.dim).reshape(-1, self.dim)
                contiguous = rows[0] == 0 and rows[-1] == live - 1
                vectors[count:count + live] = matrix[:live] if contiguous else matrix[rows]
                ids[count:count + live] = records_of_chunk.ids
                count += live
                if decode_records:
                    records += [record for _, record in records_of_chunk.records()]
        return ids[:count], vectors[:count], records
