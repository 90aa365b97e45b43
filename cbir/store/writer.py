"""Writing a database: plans of what to store, and the stream that sends them."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from cbir.errors import ConnectionResumedWarning, StoreError
from cbir.store.layout import Columns, ImageRecord, encode_block, encoded_names, grouped_positions
from cbir.store.lock import LOCK_TTL_SECONDS, RENEW_IF_EQUAL
from cbir.store.names import PAIR, buckets, name_hashes, pairs
from cbir.store.redis import commands
from cbir.store.redis.commands import Command

if TYPE_CHECKING:
    from cbir.store.database import VectorStore


@dataclass
class WritePlan:
    """Which of the records handed to :meth:`VectorStore.prepare` need writing, and where."""

    records: list[ImageRecord]  # to write, in input order
    ids: np.ndarray  # the id of each record to write
    positions: list[int]  # the index of each record to write in the input sequence
    columns: Columns | None = None  # the records to write, column by column
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # name hash of each
    fresh_from: int | None = None  # ids from here on were reserved by this plan: nothing stored there
    new: int = 0  # not stored before: gets a fresh id
    updated: int = 0  # same name, new content, replacing allowed: keeps its id
    # Same name, other content, not replaced: (name, the stored image's source, the new one's)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)
    thumbnails: list[bytes] | None = None  # of the records to write, in plan order, where made
    unchanged: int = 0  # already stored with the same content: skipped
    duplicates: int = 0  # repeated names within the input: skipped

    @property
    def written(self) -> int:
        return len(self.records)

    @cached_property
    def rows_by_name(self) -> dict[str, int]:
        return dict(zip(self.columns.names, range(len(self.records))))

    @property
    def fresh(self) -> np.ndarray:
        """Which rows are new names (their ids were reserved by this plan)."""
        return self.ids >= (self.fresh_from if self.fresh_from is not None else np.iinfo(np.int64).max)


class WriteStream:
    """Writes plans through a :class:`~cbir.store.redis.commands.CommandStream`, up to ``depth`` in flight:
    this client encodes the next batch while Redis stores the last (``depth=0`` waits for each)."""

    def __init__(self, store: VectorStore, depth: int = 2):
        self.store = store
        self._stream = store.call("connecting to", commands.CommandStream, store.client, depth, store.settled,
                                  store.check_lock_kept)

    def write(self, plan: WritePlan, vectors: np.ndarray) -> None:
        if not plan.records:
            return
        try:
            phases = self.store.write_phases(plan, vectors)
        except BaseException:
            self.store.settled(plan)  # nothing of it was sent
            raise
        self.store.call("writing to", self._stream.send, phases, plan)

    def close(self) -> None:
        """Wait for every write in flight; raises the first Redis error among them."""
        self.store.call("writing to", self._stream.close)
        warn_if_resumed(self._stream, self.store.name)

    def abandon(self) -> None:
        """Close without waiting for the writes in flight (see CommandStream.abandon)."""
        self._stream.abandon()


def warn_if_resumed(stream: commands.CommandStream, database: str) -> None:
    if stream.resumptions and not stream.failed:  # a failure says what to do itself
        warnings.warn(
            f"database '{database}': the connection to Redis was lost and made again {stream.resumptions} time(s); "
            "the writes in flight were sent again. If the server crashed rather than restarted, it may have lost "
            "its last second of writes: run the same command again to store what is missing (stored images are "
            "skipped)", ConnectionResumedWarning, stacklevel=3)


class WritingMixin:
    """The writes of :class:`~cbir.store.database.VectorStore`; each needs its writer lock (``writing()``)."""

    def _require_lock(self) -> None:
        if not self._lock_token:
            raise StoreError(f"writing to database '{self.name}' needs its writer lock: use VectorStore.writing()")

    def prepare(self, records: Sequence[ImageRecord], update: bool = False) -> WritePlan:
        """Decide, without writing anything but the id counter, which records need storing.

        A name already stored (or planned by a write still in flight) with the same sha256 is
        skipped; with another sha256 it is a conflict, skipped and listed in the plan (two sources
        that share a file name), or with ``update`` replaced in place (same id); any other name
        gets a fresh id. Needs :meth:`writing`.
        """
        self.require()
        self._require_lock()
        self.renew_lock()  # a writer that lost its lock stops here, before it plans (and sends) anything more
        columns = Columns.of(records)
        names = columns.names
        if len(set(names)) == len(names):
            candidates = np.arange(len(names))
        else:  # the first record of each name
            candidates = np.array(sorted(dict(zip(reversed(names), range(len(names) - 1, -1, -1))).values()))
        plan = WritePlan(records=[], ids=np.empty(0, np.int64), positions=[],
                         duplicates=len(names) - len(candidates))
        if plan.duplicates:
            columns = columns.rows(candidates)
            names = columns.names
        hashes = name_hashes(encoded_names(names))
        # Every name stored or in flight has a pair in the writer's index: only names with one
        # need a closer look (in a bulk ingest of new names, none do).
        positions, matches = self._candidates(hashes)
        ids = np.full(len(names), -1, np.int64)
        stored = self._in_flight(names, sorted(set(positions.tolist())), ids)
        if stored:
            open_ = ~np.isin(positions, list(stored))
            positions, matches = positions[open_], matches[open_]
        found, found_digests = self._confirmed(names, positions, matches)
        ids = np.where(found >= 0, found, ids)
        stored.update(found_digests)
        keep = ids < 0
        plan.new = int(keep.sum())
        clashing = []
        for k, digest in stored.items():
            if digest == columns.digests[k].tobytes():
                plan.unchanged += 1
            elif update:
                plan.updated += 1
                keep[k] = True
            else:
                clashing.append(k)
        if clashing:
            plan.conflicts = self._conflicts(columns, names, [int(ids[k]) for k in clashing], clashing)
        if plan.new:
            end = int(self.call("reserving ids in", self.client.incrby, self.prefix + "next_id", plan.new))
            fresh = ids < 0
            ids[fresh] = np.arange(end - plan.new, end)
            plan.fresh_from = end - plan.new
            self._names[0].add(hashes[fresh], ids[fresh])  # this writer's own new names
        kept = np.flatnonzero(keep)
        plan.positions = candidates[kept].tolist()
        plan.ids = ids[kept]
        plan.hashes = hashes[kept]
        if len(kept) == len(records):
            plan.records, plan.columns = list(records), columns
        else:
            plan.records, plan.columns = [records[p] for p in plan.positions], columns.rows(kept)
        if plan.records:
            self._unsettled.append(plan)
        return plan

    def _conflicts(self, columns: Columns, names: list[str], stored_ids: list[int],
                   rows: list[int]) -> list[tuple[str, str, str]]:
        """(name, the stored image's source, the new image's source) of each clashing row."""
        sources = {}
        for plan in self._unsettled:  # planned by this run, not yet stored
            for row, record in enumerate(plan.records):
                sources[int(plan.ids[row])] = record.source
        missing = [i for i in stored_ids if i not in sources]
        sources.update((i, record.source if record else "") for i, record in zip(missing, self.records(missing)))
        return [(names[row], sources[image_id] or "?", columns.sources[row] or "?")
                for image_id, row in zip(stored_ids, rows)]

    def _in_flight(self, names: list[str], positions: list[int], ids: np.ndarray) -> dict[int, bytes]:
        """Give those of the names at ``positions`` that unsettled writes planned their planned
        ids (in ``ids``, in place); returns the planned digest of each by its position."""
        digests: dict[int, bytes] = {}
        for plan in list(self._unsettled) if positions else []:  # oldest first: a later plan wins
            planned = plan.rows_by_name
            for k in positions:
                row = planned.get(names[k])
                if row is not None:
                    ids[k] = plan.ids[row]
                    digests[k] = plan.columns.digests[row].tobytes()
        return digests

    def write(self, plan: WritePlan, vectors: np.ndarray) -> None:
        """Store the planned records with their vectors (rows in plan order)."""
        try:
            if plan.records:
                self._run_phases("writing to", self.write_phases(plan, vectors))
        finally:
            self.settled(plan)

    def _run_phases(self, what: str, phases: list[list[Command]]) -> None:
        """Run ``phases`` in order and wait for them (one round trip on a single server), once this
        writer has renewed its lock."""
        self.renew_lock()
        stream = self.call("connecting to", commands.CommandStream, self.client, 0, resumed=self.check_lock_kept)
        self.call(what, stream.send, phases)
        self.call(what, stream.close)
        warn_if_resumed(stream, self.name)

    def write_phases(self, plan: WritePlan, vectors: np.ndarray) -> list[list[Command]]:
        """The commands of a write: the new names' index pairs and the vectors, then the records
        and the commit.

        The records go last because their entry is what makes an image stored.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(plan.records), self.dim):
            raise StoreError(f"expected {len(plan.records)} vectors of {self.dim} dims, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise StoreError("refusing to store vectors with NaN or infinite values")
        fresh = plan.fresh
        hashes, ids = plan.hashes[fresh], plan.ids[fresh]
        names_and_vectors: list[Command] = [
            ("APPEND", self.names_key(bucket), pairs(hashes[positions], ids[positions]))
            for bucket, positions in grouped_positions(buckets(hashes))]
        names_and_vectors += self._vector_commands(plan.ids, vectors, plan.fresh_from)
        if plan.thumbnails is not None:
            names_and_vectors += self._thumbnail_commands(plan.ids, plan.thumbnails)
        records: list[Command] = [
            ("APPEND", self.meta_key(chunk), encode_block(plan.ids[positions], plan.columns.rows(positions)))
            for chunk, positions in grouped_positions(plan.ids // self.chunk_size)]
        return [names_and_vectors, records + self._commit_commands(b"+" + plan.ids.astype("<i8").tobytes())]

    def _thumbnail_commands(self, ids: np.ndarray, thumbnails: Sequence[bytes]) -> list[Command]:
        """One HSET per chunk of (id, JPEG bytes) pairs; before the records, like the vectors."""
        return [("HSET", self.thumbnails_key(chunk),
                 *[part for position in positions.tolist() for part in (int(ids[position]), thumbnails[position])])
                for chunk, positions in grouped_positions(ids // self.chunk_size)]

    def set_thumbnails(self, ids: Sequence[int], thumbnails: Sequence[bytes]) -> None:
        """Store thumbnails of stored images (a backfill); needs :meth:`writing`."""
        self._require_lock()
        self.renew_lock()
        self.execute("writing thumbnails to", self._thumbnail_commands(np.asarray(ids, np.int64), thumbnails))

    def settled(self, plan: WritePlan) -> None:
        """Forget ``plan`` as in flight: its write is done (or failed, and a re-run stores it)."""
        for position, unsettled in enumerate(self._unsettled):
            if unsettled is plan:
                del self._unsettled[position]
                return

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray, update: bool = False) -> WritePlan:
        """:meth:`prepare` then :meth:`write`; ``vectors`` has one row per input record."""
        plan = self.prepare(records, update)
        self.write(plan, np.asarray(vectors)[plan.positions])
        return plan

    def _vector_commands(self, ids: np.ndarray, vectors: np.ndarray, fresh_from: int | None = None) -> list[tuple]:
        """One command per run of consecutive ids within a chunk.

        A run of fresh ids (>= ``fresh_from``) that starts a chunk creates it with one SET of the
        whole chunk, zero-padded: Redis then allocates it at its exact size, where growing it by
        SETRANGE would over-allocate (strings under 1 MB double their capacity as they grow).
        """
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        chunks = sorted_ids // self.chunk_size
        breaks = np.flatnonzero((np.diff(sorted_ids) != 1) | (np.diff(chunks) != 0)) + 1
        row_bytes = self.dim * 4
        commands = []
        for run in np.split(np.arange(len(sorted_ids)), breaks):
            first = int(sorted_ids[run[0]])
            chunk, offset = divmod(first, self.chunk_size)
            rows = vectors[order[run[0]:run[-1] + 1]].tobytes()
            if offset == 0 and fresh_from is not None and first >= fresh_from:
                commands.append(("SET", self.vector_key(chunk), rows.ljust(self.chunk_size * row_bytes, b"\0")))
            else:
                commands.append(("SETRANGE", self.vector_key(chunk), offset * row_bytes, rows))
        return commands

    def _commit_commands(self, change: bytes) -> list[tuple]:
        # The journal entry goes first: a reader that sees version v finds v's entry too.
        journal = [("RPUSH", self.journal_key, change)] if self._info.get("journal") else []
        lock = [("EVAL", RENEW_IF_EQUAL, 1, self.prefix + "lock", self._lock_token, LOCK_TTL_SECONDS)] \
            if self._lock_token else []
        return journal + [("HINCRBY", self.info_key, "version", 1)] + lock

    # -------------------------------------------------------------- removals
    def remove(self, ids: Iterable[int]) -> list[ImageRecord]:
        """Delete these images (record, name and vector bytes); returns what was removed.
        Needs :meth:`writing`."""
        self.require()
        self._require_lock()
        ids = set(int(i) for i in ids)
        found: list[tuple[int, ImageRecord]] = []
        records: list[Command] = []
        for number, chunk in self._meta_chunks(i // self.chunk_size for i in ids).items():
            stored = chunk.records()
            kept = [(i, record) for i, record in stored if i not in ids]
            if len(kept) == len(stored):
                continue
            found += [(i, record) for i, record in stored if i in ids]
            records.append(("SET", self.meta_key(number), encode_block(
                np.array([i for i, _ in kept], np.int64), Columns.of([record for _, record in kept])))
                           if kept else ("UNLINK", self.meta_key(number)))
        if not found:
            return []
        removed_ids = np.array([i for i, _ in found], np.int64)
        rest = self._vector_commands(removed_ids, np.zeros((len(found), self.dim), np.float32))
        rest += [("HDEL", self.thumbnails_key(chunk), *removed_ids[positions].tolist())
                 for chunk, positions in grouped_positions(removed_ids // self.chunk_size)]
        rest += self._unindex_commands(removed_ids, [record.name for _, record in found])
        rest += self._commit_commands(b"-" + removed_ids.astype("<i8").tobytes())
        self._run_phases("removing images from", [records, rest])
        if self._names:
            self._names[0].discard(removed_ids)
        return [record for _, record in found]

    def _unindex_commands(self, ids: np.ndarray, names: Sequence[str]) -> list[Command]:
        """Rewrite the name index buckets of ``names`` without the pairs of ``ids``: a removed
        image leaves no trace of its name (a stale pair would only cost lookups a record read)."""
        wanted = sorted(set(buckets(name_hashes([n.encode("utf-8") for n in names])).tolist()))
        rewrites: list[Command] = []
        for bucket, blob in self._chunk_blobs(self.names_key, wanted).items():
            stored = np.frombuffer(blob or b"", PAIR)
            kept = stored[~np.isin(stored["id"], ids)]
            rewrites.append(("SET", self.names_key(bucket), kept.tobytes()) if len(kept)
                            else ("UNLINK", self.names_key(bucket)))
        return rewrites

    def remove_names(self, names: Sequence[str]) -> list[ImageRecord]:
        return self.remove(i for i in self.lookup(names) if i is not None)

    def remove_matching(self, labels: Iterable[str] = (), digests: Iterable[str] = ()) -> list[ImageRecord]:
        """Remove every image of one of ``labels`` or whose content has one of the sha256 ``digests``
        (whatever its name), in one pass over the records."""
        labels, digests = set(labels), set(digests)
        return self.remove(i for i, record in self.iter_records() if record.label in labels or record.sha256 in digests)
