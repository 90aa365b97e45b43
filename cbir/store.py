"""The Redis store: every database in its own namespace, vectors packed in chunks.

Key layout, with ``P = "cbir:<db>:"`` and ``C`` the database's chunk size::

    P info       hash    schema, model fingerprint and description, dim, chunk size,
                         created time, version (bumped by every committed change)
    P next_id    string  id counter; INCRBY reserves a contiguous range per batch
    P vec:<c>    string  float32 vectors of ids c*C .. c*C+C-1, row-major (SETRANGE / GET)
    P meta:<c>   string  records of chunk c, appended: entries of <u32 id><u32 n><n bytes>;
                         the last entry of an id wins (an update appends)
    P name:<b>   hash    name -> id, with b = crc32(name) % NAME_BUCKETS
    P keys       set     further keys of this database (e.g. a trained index), for --rewrite
    P journal    list     once an index is trained (info field ``journal``): one entry per
                         committed change, b"+" or b"-" then the int64 ids added or removed,
                         pushed with the version bump, so an index can be brought up to date
    P lock       string  the writer lock ("host:pid:token"), with a time-out

An image is stored exactly when its id has an entry in its ``meta`` chunk. A write sets the
name and the vector first and appends the meta entry last; a removal rewrites the meta chunk
without the id first. So a run killed at any point leaves a store whose live images are all
complete, and a re-run finds the half-written names and finishes them (see
:meth:`VectorStore.prepare`).

Chunks, rather than a hash per image, are what make ingest and bulk load fast: one SETRANGE
and one APPEND per chunk on write, two GETs per chunk on load, and no per-image hash entry
except the name map. Vector memory stays within a few percent of the raw float32 bytes. No
key carries a hash tag, so under Redis Cluster the chunks and name buckets spread over all
nodes; multi-key work goes through pipelines, which redis-py splits by node.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import psutil
import redis

from .errors import DatabaseBusyError, ModelMismatchError, StoreError

SCHEMA_VERSION = "1"
NAME_BUCKETS = 64
CHUNK_BYTES = 512 * 1024  # vector bytes per chunk key, at most
LOCK_TTL_SECONDS = 120
_DB_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_RECORD_HEADER = struct.Struct("<32sd")  # sha256 digest, added (unix time)
_SEPARATOR = "\x1f"  # ASCII unit separator: never part of a path, a label or a project name
_PIPELINE_CHUNKS = 32  # chunks read per pipeline round trip when loading
_ENTRY = struct.Struct("<II")  # id, record length: the header of a meta chunk entry


def _parse_meta(blob: bytes | None) -> dict[int, bytes]:
    """id -> record bytes of one meta chunk; a later entry of the same id replaces an earlier one."""
    entries: dict[int, bytes] = {}
    if not blob:
        return entries
    view, offset, unpack = memoryview(blob), 0, _ENTRY.unpack_from
    while offset < len(blob):
        image_id, size = unpack(blob, offset)
        offset += _ENTRY.size
        entries[image_id] = bytes(view[offset:offset + size])
        offset += size
    return entries


def _pack_meta(entries: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(_ENTRY.pack(image_id, len(raw)) + raw for image_id, raw in entries)


@dataclass(frozen=True)
class ImageRecord:
    """What the database knows about one image, besides its vector."""

    name: str
    label: str
    project: str = ""
    sha256: str = ""
    source: str = ""
    added: float = 0.0

    def encode(self) -> bytes:
        text = _SEPARATOR.join((self.name, self.label, self.project, self.source))
        digest = bytes.fromhex(self.sha256) if self.sha256 else b""
        return _RECORD_HEADER.pack(digest, self.added) + text.encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "ImageRecord":
        digest, added = _RECORD_HEADER.unpack_from(data)
        name, label, project, source = data[_RECORD_HEADER.size:].decode("utf-8").split(_SEPARATOR)
        sha = digest.hex() if digest.strip(b"\0") else ""
        return cls(name=name, label=label, project=project, sha256=sha, source=source, added=added)



def _check_records(records: Sequence[ImageRecord]) -> None:
    text = "".join(r.name + r.label + r.project + r.source for r in records)
    if _SEPARATOR in text or "\0" in text:
        bad = next(r for r in records if _SEPARATOR in r.name + r.label + r.project + r.source
                   or "\0" in r.name + r.label + r.project + r.source)
        raise StoreError(f"{bad.name!r}: a name, label, project or source contains a control character")
    if not all(r.name for r in records):
        raise StoreError("every image needs a non-empty name")


@dataclass
class WritePlan:
    """Which of the records handed to :meth:`VectorStore.prepare` need writing, and where."""

    records: list[ImageRecord]  # to write, in input order
    ids: np.ndarray  # the id of each record to write
    positions: list[int]  # the index of each record to write in the input sequence
    name_keys: list[str] = field(default_factory=list)  # the name-map key of each record to write
    fresh_from: int | None = None  # ids from here on were reserved by this plan: nothing stored there
    new: int = 0  # never stored before
    updated: int = 0  # same name, new content
    repaired: int = 0  # left half-written by an interrupted run
    unchanged: int = 0  # already stored with the same content: skipped
    duplicates: int = 0  # repeated names within the input: skipped

    @property
    def written(self) -> int:
        return len(self.records)


@dataclass
class DatabaseInfo:
    name: str
    count: int
    dim: int
    model: str
    model_spec: dict = field(default_factory=dict)
    chunk_size: int = 0
    version: int = 0
    created: float = 0.0


def chunk_size_for(dim: int) -> int:
    """Vectors per chunk: as many as fit, with Redis' string header, in CHUNK_BYTES.

    Allocators round a block up to a size class; a chunk of exactly 512 KiB plus a header would
    take the 640 KiB class (25 % waste), one just under it takes 512 KiB.
    """
    return max(1, (CHUNK_BYTES - 64) // (dim * 4))


def check_db_name(name: str) -> str:
    if not name or len(name) > 128 or not set(name) <= _DB_NAME_CHARS or name[0] in ".-":
        raise StoreError(
            f"invalid database name {name!r}: use letters, digits, '_', '-' and '.' (at most 128)"
        )
    return name


def _decode_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class VectorStore:
    """One database (``--db_name``) in Redis: vectors, image records and the model that made them.

    Writers hold :meth:`writing` (one writer per database at a time); readers need nothing.
    """

    def __init__(self, client, db_name: str):
        self.client = client
        self.name = check_db_name(db_name)
        self.prefix = f"cbir:{db_name}:"
        self._info: dict[str, str] = {}
        self._lock_token: str | None = None
        self.refresh()

    # ----------------------------------------------------------------- keys
    @property
    def info_key(self) -> str:
        return self.prefix + "info"

    def _vec_key(self, chunk: int) -> str:
        return f"{self.prefix}vec:{chunk}"

    def _meta_key(self, chunk: int) -> str:
        return f"{self.prefix}meta:{chunk}"

    def _name_key(self, name: str) -> str:
        return f"{self.prefix}name:{zlib.crc32(name.encode('utf-8')) % NAME_BUCKETS}"

    def key(self, suffix: str) -> str:
        """The key ``cbir:<db>:<suffix>``, for modules that keep their own data in this database."""
        return self.prefix + suffix

    # --------------------------------------------------------------- redis io
    def call(self, what: str, fn, *args, **kwargs):
        """``fn(*args)``, with a Redis failure turned into a StoreError saying what was being done."""
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(
                f"Redis failed while {what} database '{self.name}': {exc}. "
                "Stored images are kept; re-run to continue."
            ) from exc

    def execute(self, what: str, pipe) -> list:
        return self.call(what, pipe.execute)

    def pipeline(self):
        """A non-transactional pipeline: under Cluster, redis-py splits it by node."""
        return self.client.pipeline(transaction=False)

    # ------------------------------------------------------------------ info
    def refresh(self) -> None:
        raw = self.call("reading", self.client.hgetall, self.info_key)
        self._info = {_decode_str(k): _decode_str(v) for k, v in raw.items()}
        self.dim = int(self._info.get("dim", 0))
        self.chunk_size = int(self._info.get("chunk_size", 0)) or chunk_size_for(max(self.dim, 1))

    @property
    def exists(self) -> bool:
        return bool(self._info.get("model"))

    @property
    def model(self) -> str:
        return self._info.get("model", "")

    @property
    def model_spec(self) -> dict:
        return json.loads(self._info.get("model_spec", "{}"))

    def version(self) -> int:
        """The data version: it changes with every committed add or removal."""
        return int(self.call("reading", self.client.hget, self.info_key, "version") or 0)

    def require(self) -> None:
        if not self.exists:
            raise StoreError(f"database '{self.name}' does not exist (or is empty): add images first")

    def ensure_model(self, fingerprint: str, spec: dict, dim: int, chunk_size: int | None = None) -> None:
        """Create the database for this model, or check that it was built by the same one.

        ``chunk_size`` (vectors per chunk key) defaults to :func:`chunk_size_for` ``(dim)``.
        """
        if not self.exists:
            created = self.call("creating", self.client.hsetnx, self.info_key, "model", fingerprint)
            if created:
                self.call("creating", self.client.hset, self.info_key, mapping={
                    "schema": SCHEMA_VERSION, "model_spec": json.dumps(spec, sort_keys=True),
                    "dim": dim, "chunk_size": chunk_size or chunk_size_for(dim), "created": time.time(),
                    "version": 0,
                })
            self.refresh()
        if self.model != fingerprint or self.dim != dim:
            stored = self.model_spec.get("description", self.model)
            wanted = spec.get("description", fingerprint)
            raise ModelMismatchError(
                f"database '{self.name}' was built with {stored} ({self.dim}-d, {self.model}); "
                f"this run uses {wanted} ({dim}-d, {fingerprint}). Use the same extractor, "
                "another --db_name, or --rewrite to start the database over."
            )

    def _num_chunks(self) -> int:
        next_id = int(self.call("reading", self.client.get, self.prefix + "next_id") or 0)
        return -(-next_id // self.chunk_size)

    def _chunk_batches(self) -> Iterator[range]:
        """The database's chunk numbers, in groups read with one pipeline round trip each."""
        chunks = self._num_chunks()
        for first in range(0, chunks, _PIPELINE_CHUNKS):
            yield range(first, min(first + _PIPELINE_CHUNKS, chunks))

    def count(self) -> int:
        if not self.exists:
            return 0
        return sum(len(entries) for batch in self._chunk_batches()
                   for entries in self._meta_chunks(batch).values())

    def describe(self) -> DatabaseInfo:
        self.require()
        return DatabaseInfo(
            name=self.name, count=self.count(), dim=self.dim, model=self.model,
            model_spec=self.model_spec, chunk_size=self.chunk_size, version=self.version(),
            created=float(self._info.get("created", 0)),
        )

    # ------------------------------------------------------------------ lock
    @contextmanager
    def writing(self) -> Iterator["VectorStore"]:
        """Hold the database's writer lock; a lock left by a dead process on this host is taken over."""
        key = self.prefix + "lock"
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if not self.call("locking", self.client.set, key, token, nx=True, ex=LOCK_TTL_SECONDS):
            holder = _decode_str(self.call("locking", self.client.get, key) or b"")
            host, _, rest = holder.partition(":")
            pid = rest.partition(":")[0]
            if holder and not (host == socket.gethostname() and pid.isdigit()
                               and not psutil.pid_exists(int(pid))):
                raise DatabaseBusyError(
                    f"database '{self.name}' is being written by another process ({holder}); "
                    f"wait for it, or delete the key {key} if that process is gone"
                )
            self.call("locking", self.client.set, key, token, ex=LOCK_TTL_SECONDS)
        self._lock_token = token
        self.refresh()  # another process may have changed the database (e.g. started its journal)
        try:
            yield self
        finally:
            self._lock_token = None
            try:
                if _decode_str(self.client.get(key) or b"") == token:
                    self.client.delete(key)
            except redis.RedisError:
                pass  # the lock expires by itself

    # ---------------------------------------------------------------- writes
    def lookup(self, names: Sequence[str], keys: Sequence[str] | None = None) -> list[int | None]:
        """The id stored under each name (None where the name is unknown)."""
        by_bucket: dict[str, list[int]] = defaultdict(list)
        for position, key in enumerate(keys or [self._name_key(n) for n in names]):
            by_bucket[key].append(position)
        pipe = self.pipeline()
        for key, positions in by_bucket.items():
            pipe.hmget(key, [names[p] for p in positions])
        ids: list[int | None] = [None] * len(names)
        for positions, values in zip(by_bucket.values(), self.execute("reading", pipe)):
            for position, value in zip(positions, values):
                ids[position] = None if value is None else int(value)
        return ids

    def _meta_chunks(self, chunks: Iterable[int]) -> dict[int, dict[int, bytes]]:
        chunks = sorted(set(chunks))
        pipe = self.pipeline()
        for chunk in chunks:
            pipe.get(self._meta_key(chunk))
        return {c: _parse_meta(blob) for c, blob in zip(chunks, self.execute("reading", pipe))}

    def _raw_records(self, ids: Sequence[int]) -> list[bytes | None]:
        chunks = self._meta_chunks(i // self.chunk_size for i in ids)
        return [chunks[i // self.chunk_size].get(i) for i in ids]

    def prepare(self, records: Sequence[ImageRecord]) -> WritePlan:
        """Decide, without writing anything but the id counter, which records need storing.

        A name already stored with the same sha256 is skipped; with another sha256 it is
        updated in place (same id); a name whose earlier write was interrupted is repaired.
        """
        self.require()
        _check_records(records)
        first_seen: dict[str, int] = {}
        for position, record in enumerate(records):
            first_seen.setdefault(record.name, position)
        positions = sorted(first_seen.values())
        plan = WritePlan(records=[], ids=np.empty(0, np.int64), positions=[],
                         duplicates=len(records) - len(positions))
        name_keys = {p: self._name_key(records[p].name) for p in positions}
        known_ids = self.lookup([records[p].name for p in positions], list(name_keys.values()))
        known = [(p, i) for p, i in zip(positions, known_ids) if i is not None]
        stored = dict(zip((i for _, i in known), self._raw_records([i for _, i in known])))
        ids: dict[int, int] = {}
        fresh: list[int] = []
        for position, image_id in zip(positions, known_ids):
            if image_id is None:
                fresh.append(position)
                plan.new += 1
                continue
            raw = stored[image_id]
            if raw is None:
                plan.repaired += 1
            elif ImageRecord.decode(raw).sha256 == records[position].sha256:
                plan.unchanged += 1
                continue
            else:
                plan.updated += 1
            ids[position] = image_id
        if fresh:
            end = int(self.call("reserving ids in", self.client.incrby, self.prefix + "next_id",
                                 len(fresh)))
            ids.update(zip(fresh, range(end - len(fresh), end)))
            plan.fresh_from = end - len(fresh)
        plan.positions = sorted(ids)
        plan.records = [records[p] for p in plan.positions]
        plan.name_keys = [name_keys[p] for p in plan.positions]
        plan.ids = np.array([ids[p] for p in plan.positions], dtype=np.int64)
        return plan

    def write(self, plan: WritePlan, vectors: np.ndarray) -> None:
        """Store the planned records with their vectors (rows in plan order)."""
        if not plan.records:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(plan.records), self.dim):
            raise StoreError(f"expected {len(plan.records)} vectors of {self.dim} dims, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise StoreError("refusing to store vectors with NaN or infinite values")
        pipe = self.pipeline()
        # Arguments pre-encoded as bytes: redis-py's per-argument encoding dominates otherwise.
        names_by_key: dict[str, list[bytes]] = defaultdict(list)
        for record, key, image_id in zip(plan.records, plan.name_keys, plan.ids.tolist()):
            names_by_key[key] += (record.name.encode("utf-8"), b"%d" % image_id)
        for key, arguments in names_by_key.items():
            pipe.execute_command("HSET", key, *arguments)
        self._queue_vectors(pipe, plan.ids, vectors, plan.fresh_from)
        self.execute("writing vectors to", pipe)
        # Meta last: its entry is what makes the image stored.
        meta_by_chunk: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        chunk_size = self.chunk_size
        for record, image_id in zip(plan.records, plan.ids.tolist()):
            meta_by_chunk[image_id // chunk_size].append((image_id, record.encode()))
        pipe = self.pipeline()
        for chunk, entries in meta_by_chunk.items():
            pipe.append(self._meta_key(chunk), _pack_meta(entries))
        self._queue_commit(pipe, b"+" + plan.ids.astype("<i8").tobytes())
        self.execute("writing records to", pipe)

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray) -> WritePlan:
        """:meth:`prepare` then :meth:`write`; ``vectors`` has one row per input record."""
        plan = self.prepare(records)
        self.write(plan, np.asarray(vectors)[plan.positions])
        return plan

    def _queue_vectors(self, pipe, ids: np.ndarray, vectors: np.ndarray, fresh_from: int | None = None) -> None:
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
        for run in np.split(np.arange(len(sorted_ids)), breaks):
            first = int(sorted_ids[run[0]])
            chunk, offset = divmod(first, self.chunk_size)
            rows = vectors[order[run[0]:run[-1] + 1]].tobytes()
            if offset == 0 and fresh_from is not None and first >= fresh_from:
                pipe.set(self._vec_key(chunk), rows.ljust(self.chunk_size * row_bytes, b"\0"))
            else:
                pipe.setrange(self._vec_key(chunk), offset * row_bytes, rows)

    def _queue_commit(self, pipe, change: bytes) -> None:
        # The journal entry goes first: a reader that sees version v finds v's entry too.
        if self._info.get("journal"):
            pipe.rpush(self.journal_key, change)
        pipe.hincrby(self.info_key, "version", 1)
        if self._lock_token:
            pipe.expire(self.prefix + "lock", LOCK_TTL_SECONDS)

    # -------------------------------------------------------------- removals
    def remove(self, ids: Iterable[int]) -> list[ImageRecord]:
        """Delete these images (record, name and vector bytes); returns what was removed."""
        self.require()
        ids = set(int(i) for i in ids)
        chunks = self._meta_chunks(i // self.chunk_size for i in ids)
        found = sorted((i, ImageRecord.decode(entries[i]))
                       for entries in chunks.values() for i in ids & entries.keys())
        if not found:
            return []
        pipe = self.pipeline()
        for chunk, entries in chunks.items():
            kept = [(i, raw) for i, raw in entries.items() if i not in ids]
            if kept:
                pipe.set(self._meta_key(chunk), _pack_meta(kept))
            else:
                pipe.unlink(self._meta_key(chunk))
        self.execute("removing images from", pipe)
        pipe = self.pipeline()
        zeros = np.zeros((len(found), self.dim), np.float32)
        self._queue_vectors(pipe, np.array([i for i, _ in found], np.int64), zeros)
        for image_id, record in found:
            pipe.hdel(self._name_key(record.name), record.name)
        removed_ids = np.array([i for i, _ in found], "<i8")
        self._queue_commit(pipe, b"-" + removed_ids.tobytes())
        self.execute("removing images from", pipe)
        return [record for _, record in found]

    def remove_names(self, names: Sequence[str]) -> list[ImageRecord]:
        return self.remove(i for i in self.lookup(names) if i is not None)

    def remove_labels(self, labels: Iterable[str]) -> list[ImageRecord]:
        wanted = set(labels)
        return self.remove(i for i, record in self.iter_records() if record.label in wanted)

    def drop(self) -> int:
        """Delete every key of this database (and nothing else); returns how many existed."""
        chunks = self._num_chunks()
        keys = [self.info_key, self.prefix + "next_id", self.prefix + "lock", self.journal_key]
        keys += [self._vec_key(c) for c in range(chunks)] + [self._meta_key(c) for c in range(chunks)]
        keys += [f"{self.prefix}name:{b}" for b in range(NAME_BUCKETS)]
        keys += self._extra_keys()
        pipe = self.pipeline()
        for key in keys:
            pipe.unlink(key)  # one key per command: keys of one database may live on many nodes
        deleted = int(sum(self.execute("deleting", pipe)))
        self._info = {}
        return deleted

    def _extra_keys(self) -> list[str]:
        """Keys other modules keep under this database, listed in the ``keys`` set of the database."""
        members = self.call("reading", self.client.smembers, self.prefix + "keys")
        return [self.prefix + "keys"] + [_decode_str(m) for m in members]

    # --------------------------------------------------------------- journal
    @property
    def journal_key(self) -> str:
        return self.prefix + "journal"

    def start_journal(self) -> tuple[int, int]:
        """Record every later change in the journal; returns (data version, journal length) now.

        Call it holding :meth:`writing`, so that no change slips between the two numbers.
        """
        self.call("writing", self.client.hset, self.info_key, "journal", 1)
        self._info["journal"] = "1"
        return self.version(), int(self.call("reading", self.client.llen, self.journal_key))

    def trim_journal(self, start: int) -> None:
        """Forget the journal's entries before ``start`` (they are in a saved index)."""
        self.call("writing", self.client.ltrim, self.journal_key, start, -1)

    def changes(self, start: int) -> tuple[int, list[tuple[str, np.ndarray]]]:
        """(data version, journal entries from ``start`` on as (``"+"`` or ``"-"``, ids))."""
        pipe = self.pipeline()
        pipe.hget(self.info_key, "version")
        pipe.lrange(self.journal_key, start, -1)
        version, entries = self.execute("reading", pipe)
        return int(version or 0), [(e[:1].decode(), np.frombuffer(e[1:], "<i8").astype(np.int64))
                                   for e in entries]

    def register_key(self, suffix: str) -> str:
        """Declare a key ``cbir:<db>:<suffix>`` owned by this database, so :meth:`drop` removes it."""
        key = self.key(suffix)
        self.call("writing", self.client.sadd, self.prefix + "keys", key)
        return key

    # ----------------------------------------------------------------- reads
    def records(self, ids: Sequence[int]) -> list[ImageRecord | None]:
        return [ImageRecord.decode(raw) if raw else None for raw in self._raw_records(list(ids))]

    def iter_records(self) -> Iterator[tuple[int, ImageRecord]]:
        """Every stored (id, record), in id order."""
        self.require()
        for batch in self._chunk_batches():
            for entries in self._meta_chunks(batch).values():
                for image_id in sorted(entries):
                    yield image_id, ImageRecord.decode(entries[image_id])

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of ``ids`` that are stored, ascending."""
        wanted = np.unique(np.asarray(ids, np.int64))
        chunk_of = wanted // self.chunk_size
        chunks = np.unique(chunk_of).tolist()
        metas = self._meta_chunks(chunks)
        pipe = self.pipeline()
        for chunk in chunks:
            pipe.get(self._vec_key(chunk))
        blobs = dict(zip(chunks, self.execute("reading vectors of", pipe)))
        live = np.array([i for i in wanted.tolist() if i in metas[i // self.chunk_size]], np.int64)
        rows = np.empty((len(live), self.dim), np.float32)
        for position, image_id in enumerate(live.tolist()):
            chunk, row = divmod(image_id, self.chunk_size)
            rows[position] = np.frombuffer(blobs[chunk], np.float32, self.dim, row * self.dim * 4)
        return live, rows

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
        id_parts: list[np.ndarray] = []
        vector_parts: list[np.ndarray] = []
        records: list[ImageRecord] = []
        for batch in self._chunk_batches():
            pipe = self.pipeline()
            for chunk in batch:
                pipe.get(self._vec_key(chunk))
                pipe.get(self._meta_key(chunk))
            replies = self.execute("loading vectors from", pipe)
            for chunk, blob, meta in zip(batch, replies[0::2], replies[1::2]):
                entries = _parse_meta(meta)
                if not entries:
                    continue
                ids = np.array(sorted(entries), dtype=np.int64)
                rows = ids - chunk * self.chunk_size
                if blob is None or len(blob) < (int(rows[-1]) + 1) * row_bytes:
                    raise StoreError(f"database '{self.name}': vectors of chunk {chunk} are missing")
                matrix = np.frombuffer(blob, dtype=np.float32, count=(len(blob) // row_bytes) * self.dim)
                matrix = matrix.reshape(-1, self.dim)
                contiguous = rows[0] == 0 and rows[-1] == len(rows) - 1
                vector_parts.append(matrix[: len(rows)] if contiguous else matrix[rows])
                id_parts.append(ids)
                if decode_records:
                    records += [ImageRecord.decode(entries[i]) for i in ids.tolist()]
        if not id_parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32), records
        return np.concatenate(id_parts), np.concatenate(vector_parts), records
