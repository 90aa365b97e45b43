"""The Redis store: every database in its own namespace, vectors packed in chunks.

Key layout, with ``P = "cbir:<db>:"`` and ``C`` the database's chunk size::

    P info       hash    schema, model fingerprint and description, dim, chunk size,
                         created time, version (bumped by every committed change)
    P next_id    string  id counter; INCRBY reserves a contiguous range per batch
    P vec:<c>    string  float32 vectors of ids c*C .. c*C+C-1, row-major (SETRANGE / GET)
    P meta:<c>   string  records of chunk c: one block per write, appended, each holding its
                         records column by column (see _encode_block); the last entry of an
                         id wins (an update appends)
    P names:<b>  string  the name index: packed (64-bit name hash, u32 id) pairs of the names
                         whose hash falls in bucket b, appended per write (see cbir.names)
    P keys       set     further keys of this database (e.g. a trained index), for --rewrite
    P journal    list     once an index is trained (info field ``journal``): one entry per
                         committed change, b"+" or b"-" then the int64 ids added or removed,
                         pushed with the version bump, so an index can be brought up to date
    P lock       string  the writer lock ("host:pid:token"), with a time-out

An image is stored exactly when its id has an entry in its ``meta`` chunk. A write sends the
name index pairs and the vector first and appends the meta entry last; a removal rewrites the
meta chunk without the id first. So a run killed at any point leaves a store whose live images
are all complete; a re-run stores the images whose entry is missing again, under new ids (the
ids the killed run reserved hold no image and are never used again). A load reads a chunk's meta,
its vectors, then its meta again, and reads the chunk again if the meta changed: so a load beside
a writer sees every image it returns whole.

Chunks, rather than a hash per image, are what make ingest and bulk load fast: one SET or
SETRANGE and one APPEND per chunk on write, three GETs per chunk on load, and no Redis field per
image at all. Vector memory stays within a few percent of the raw float32 bytes. No key carries
a hash tag, so under Redis Cluster the chunks and name buckets spread over all nodes; multi-key
work goes in one pipeline per node (commands.run).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Iterable, Iterator, Sequence

import numpy as np
import psutil
import redis

from . import commands
from .commands import Command
from .connection import SOCKET_TIMEOUT_SECONDS, evicting_servers, unfit_for_writes
from .errors import ConnectionResumedWarning, DatabaseBusyError, LockWaitWarning, ModelMismatchError, StoreError
from .names import NAME_BUCKETS, PAIR, NameIndex, buckets, name_hashes, pairs

# 3: a name index of hash pairs (2: a name -> id hash map; 1: one meta entry per record)
SCHEMA_VERSION = "3"
CHUNK_BYTES = 512 * 1024  # vector bytes per chunk key, at most
# Rows of one chunk from which reading the chunk whole beats a GETRANGE per row: on embedded Redis
# a GETRANGE of a 1280-d row took 33 us, a GET of its 408 KiB chunk about 1 ms.
ROWS_WORTH_A_CHUNK = 32
LOCK_TTL_SECONDS = 120
_DB_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_PIPELINE_CHUNKS = 32  # chunks read per pipeline round trip when loading
# The info hash with all its fields, unless it exists: one key, so one slot on a Cluster too.
_CREATE_IF_ABSENT = ("if redis.call('exists', KEYS[1]) == 1 then return 0 end "
                     "redis.call('hset', KEYS[1], unpack(ARGV)) return 1")
# The lock is replaced or released only by whoever read its current token: another process may
# have taken it in between (a dead holder's lock taken over by two waiters, an expired one).
_SET_IF_EQUAL = ("if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
                 "redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1")
_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end return redis.call('del', KEYS[1])"
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


def _is_hex_digest(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == _DIGEST_BYTES
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
            bad = next(r for r, h in zip(records, hexes) if not _is_hex_digest(h))
            raise StoreError(f"{bad.name!r}: sha256 {bad.sha256!r} is not 64 hexadecimal digits")
        return cls(text, np.fromiter(map(attrgetter("added"), records), "<f8", len(records)),
                   np.frombuffer(raw, np.uint8).reshape(-1, _DIGEST_BYTES))

    def __len__(self) -> int:
        return len(self.added)

    @property
    def names(self) -> list[str]:
        return self.text[0]

    def rows(self, positions: np.ndarray) -> "Columns":
        """The columns of the rows at ``positions`` (ascending); a slice where they are contiguous."""
        if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
            rows = slice(int(positions[0]), int(positions[-1]) + 1)
            return Columns([column[rows] for column in self.text], self.added[rows], self.digests[rows])
        listed = positions.tolist()
        return Columns([[column[p] for p in listed] for column in self.text], self.added[positions],
                       self.digests[positions])


def _encode_block(ids: np.ndarray, columns: Columns) -> bytes:
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
    updated: int = 0  # same name, new content: keeps its id
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


def _encoded(names: Sequence[str]) -> list[bytes]:
    """The names in UTF-8; one encode and split instead of one per name (checked names hold no
    _VALUE_SEPARATOR)."""
    return _VALUE_SEPARATOR.join(names).encode("utf-8").split(_VALUE_SEPARATOR.encode()) if names else []


def _groups(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, positions holding it) for each distinct key, positions ascending."""
    order = np.argsort(keys, kind="stable")
    distinct, starts = np.unique(keys[order], return_index=True)
    return zip(distinct.tolist(), np.split(order, starts[1:]))


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


def database_names(client) -> list[str]:
    """The databases on this Redis, sorted: their info keys, found with SCAN (never KEYS, which
    blocks the server), on every node of a Cluster."""
    names = set()
    try:
        for key in client.scan_iter(match="cbir:*:info", count=1000):
            name = _decode_str(key)[len("cbir:"):-len(":info")]
            if name and set(name) <= _DB_NAME_CHARS:  # not an index chunk or another program's key
                names.add(name)
    except redis.RedisError as exc:
        raise StoreError(f"Redis failed while listing the databases: {exc}") from exc
    return sorted(names)


def _failure(exc: redis.RedisError) -> tuple[str, str]:
    """What went wrong in Redis and what to do about it, in Redis's own words where they suffice
    (without a final period)."""
    reason = str(exc).rstrip(".")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return f"Redis is out of memory ({reason})", "raise its maxmemory or free memory"
    if isinstance(exc, redis.TimeoutError):
        return (f"Redis stopped answering ({reason})", "it is stalled or cut off by the network (a URL sets how "
                f"long to wait: ?socket_timeout=SECONDS, {SOCKET_TIMEOUT_SECONDS:g} s by default)")
    return "Redis failed", reason


def stopped_answering(exc: BaseException) -> bool:
    """Whether ``exc`` is a StoreError for a server gone or silent: another command to it would only
    wait out the client's retries or the socket timeout again."""
    return isinstance(exc, StoreError) and isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError))


def _decode_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class VectorStore:
    """One database (``--db_name``) in Redis: vectors, image records and the model that made them.

    Writers hold :meth:`writing` (one writer per database at a time); readers need nothing.
    """

    def __init__(self, client, db_name: str, lock_wait: float = 0.0):
        self.client = client
        self.name = check_db_name(db_name)
        self.lock_wait = lock_wait  # seconds :meth:`writing` waits for another writer to finish
        self.prefix = f"cbir:{db_name}:"
        self._info: dict[str, str] = {}
        self._lock_token: str | None = None
        # Plans prepared by this writer whose writes may not have reached Redis yet (a background
        # writer keeps some in flight): prepare() sees their names as already stored.
        self._unsettled: list[WritePlan] = []
        # The writer's copy of the name index and the buckets read into it: while it holds the
        # lock no one else adds names, so each bucket is read once and its own names are added.
        self._names: tuple[NameIndex, set[int]] | None = None
        self.refresh()

    # ----------------------------------------------------------------- keys
    @property
    def info_key(self) -> str:
        return self.prefix + "info"

    def _vec_key(self, chunk: int) -> str:
        return f"{self.prefix}vec:{chunk}"

    def _meta_key(self, chunk: int) -> str:
        return f"{self.prefix}meta:{chunk}"

    def _name_key(self, bucket: int) -> str:
        return f"{self.prefix}names:{bucket}"

    def key(self, suffix: str) -> str:
        """The key ``cbir:<db>:<suffix>``, for modules that keep their own data in this database."""
        return self.prefix + suffix

    # --------------------------------------------------------------- redis io
    def call(self, what: str, fn, *args, **kwargs):
        """``fn(*args)``, with a Redis failure turned into a StoreError saying what was being done."""
        try:
            return commands.through_failover(self.client, fn, *args, **kwargs)
        except redis.RedisError as exc:
            failure, advice = _failure(exc)
            raise StoreError(f"{failure} while {what} database '{self.name}': {advice}. "
                             "Stored images are kept; re-run to continue.") from exc

    def execute(self, what: str, batch: Sequence[Command]) -> list:
        """The replies of a batch of commands, in one round trip per node (see commands.run)."""
        return self.call(what, commands.run, self.client, batch)

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
            raise StoreError(f"database '{self.name}' does not exist (or is empty): add images first "
                             "(`cbir info` lists the databases)")
        schema = self._info.get("schema", "1")
        if schema != SCHEMA_VERSION:
            raise StoreError(f"database '{self.name}' was written by an older cbir (store schema {schema}, "
                             f"this one reads {SCHEMA_VERSION}); index it again with --rewrite")

    def check_keeps_data(self) -> None:
        """Refuse to store anything on a server that would not keep it (see
        :func:`~cbir.connection.unfit_for_writes`), before anything is written."""
        reasons = self.call("reading", unfit_for_writes, self.client)
        if reasons:
            raise StoreError(f"database '{self.name}' is not written: {'; '.join(reasons)}")

    def ensure_model(self, fingerprint: str, spec: dict, dim: int, chunk_size: int | None = None) -> None:
        """Create the database for this model, or check that it was built by the same one; refuse
        a server that would not keep it (:meth:`check_keeps_data`).

        ``chunk_size`` (vectors per chunk key) defaults to :func:`chunk_size_for` ``(dim)``.
        """
        self.check_keeps_data()
        model_fields = {"schema": SCHEMA_VERSION, "model_spec": json.dumps(spec, sort_keys=True), "dim": dim,
                        "chunk_size": chunk_size or chunk_size_for(dim), "created": time.time(), "version": 0}
        if not self.exists:
            # One command: a second run starting at once must see no database or all of it, not
            # a model without its schema (HSETNX then HSET read as "written by an older cbir").
            fields = [part for pair in {"model": fingerprint, **model_fields}.items() for part in pair]
            self.call("creating", self.client.eval, _CREATE_IF_ABSENT, 1, self.info_key, *fields)
            self.refresh()
        self.require()
        if (self.model != fingerprint or self.dim != dim) and self._num_chunks() == 0:
            # Created by a run that stored nothing (every file unreadable, say): no vector of the
            # other model to mix with, so this one takes the database over, under the writer lock.
            with self.writing():
                if self._num_chunks() == 0:
                    self.call("creating", self.client.hset, self.info_key,
                              mapping={"model": fingerprint, **model_fields})
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

    def _chunk_batches(self, chunks: int | None = None) -> Iterator[range]:
        """The numbers of the database's chunks (of its first ``chunks``), in groups read with one
        pipeline round trip each."""
        chunks = self._num_chunks() if chunks is None else chunks
        for first in range(0, chunks, _PIPELINE_CHUNKS):
            yield range(first, min(first + _PIPELINE_CHUNKS, chunks))

    def _every_meta_chunk(self) -> Iterator[MetaChunk]:
        """The records of every chunk, in chunk order."""
        for batch in self._chunk_batches():
            yield from self._meta_chunks(batch).values()

    def count(self) -> int:
        if not self.exists:
            return 0
        return sum(len(chunk) for chunk in self._every_meta_chunk())

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
        """Hold the database's writer lock, waiting up to ``lock_wait`` seconds for another writer
        (said once, as a :class:`LockWaitWarning`); a lock left by a dead process on this host is
        taken over, one left on another host expires :data:`LOCK_TTL_SECONDS` after its last write."""
        key = self.prefix + "lock"
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + self.lock_wait
        holder = self._take_lock(key, token)
        if holder and self.lock_wait > 0:
            warnings.warn(f"database '{self.name}' is being written by another process ({holder}); waiting up to "
                          f"{self.lock_wait:g} s for it to finish", LockWaitWarning, stacklevel=3)
        while holder and time.monotonic() < deadline:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
            holder = self._take_lock(key, token)
        if holder:
            waited = f"waited {self.lock_wait:g} s; " if self.lock_wait > 0 else ""
            raise DatabaseBusyError(
                f"database '{self.name}' is being written by another process ({holder}); {waited}wait for it "
                f"(--wait SECONDS), or delete the key {key} if that process is gone (its lock expires "
                f"{LOCK_TTL_SECONDS} s after its last write)")
        self._lock_token = token
        self._names = None  # names added since an earlier lock are not in it
        self.refresh()  # another process may have changed the database (e.g. started its journal)
        server_gone = False
        try:
            yield self
        except StoreError as exc:
            server_gone = stopped_answering(exc)
            raise
        finally:
            self._lock_token = None
            self._names = None
            self._unsettled.clear()
            # With the server gone, releasing would wait out the client's retries a second time. The
            # lock expires by itself, and a re-run on this host takes it over from the dead process.
            if not server_gone:
                try:
                    self.client.eval(_DELETE_IF_EQUAL, 1, key, token)
                except redis.RedisError:
                    pass  # the lock expires by itself

    def _take_lock(self, key: str, token: str) -> str | None:
        """Take the writer lock with ``token``: None when taken, else the live holder's token."""
        while not self.call("locking", self.client.set, key, token, nx=True, ex=LOCK_TTL_SECONDS):
            holder = _decode_str(self.call("locking", self.client.get, key) or b"")
            host, _, rest = holder.partition(":")
            pid = rest.partition(":")[0]
            if not holder:
                continue  # released in between
            if not (host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))):
                return holder
            if self.call("locking", self.client.eval, _SET_IF_EQUAL, 1, key, holder, token, LOCK_TTL_SECONDS):
                return None
        return None

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
            index.add_packed(b"".join(blob for blob in self._chunk_blobs(self._name_key, missing).values() if blob))
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
        return self._chunk_blobs(self._meta_key, chunks)

    def _chunk_blobs(self, key_of, chunks: list[int], what: str = "reading") -> dict[int, bytes | None]:
        """The value of ``key_of(chunk)`` for each of ``chunks`` (chunks or name buckets), in one
        round trip per node."""
        return dict(zip(chunks, self.execute(what, [("GET", key_of(chunk)) for chunk in chunks])))

    def _require_lock(self) -> None:
        if not self._lock_token:
            raise StoreError(f"writing to database '{self.name}' needs its writer lock: use VectorStore.writing()")

    def prepare(self, records: Sequence[ImageRecord]) -> WritePlan:
        """Decide, without writing anything but the id counter, which records need storing.

        A name already stored (or planned by a write still in flight) with the same sha256 is
        skipped; with another sha256 it is updated in place (same id); any other name gets a
        fresh id. Needs :meth:`writing`.
        """
        self.require()
        self._require_lock()
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
        hashes = name_hashes(_encoded(names))
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
        for k, digest in stored.items():
            if digest == columns.digests[k].tobytes():
                plan.unchanged += 1
            else:
                plan.updated += 1
                keep[k] = True
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
                self._run_phases("writing to", self._write_phases(plan, vectors))
        finally:
            self.settled(plan)

    def _run_phases(self, what: str, phases: list[list[Command]]) -> None:
        """Run ``phases`` in order and wait for them (one round trip on a single server)."""
        stream = self.call("connecting to", commands.CommandStream, self.client, 0, resumed=self._lock_kept)
        self.call(what, stream.send, phases)
        self.call(what, stream.close)
        _say_resumed(stream, self.name)

    def _lock_kept(self) -> None:
        """After a write's connection was made again: the writer lock must still be this run's."""
        if not self._lock_token:
            return
        holder = _decode_str(self.call("checking the writer lock of", self.client.get, self.prefix + "lock") or b"")
        if holder != self._lock_token:
            raise StoreError(
                f"database '{self.name}': Redis no longer holds this run's writer lock after the connection was "
                f"lost (a server restarted without its data, or another process took the lock); nothing more is "
                f"written: re-run to continue")

    def _write_phases(self, plan: WritePlan, vectors: np.ndarray) -> list[list[Command]]:
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
            ("APPEND", self._name_key(bucket), pairs(hashes[positions], ids[positions]))
            for bucket, positions in _groups(buckets(hashes))]
        names_and_vectors += self._vector_commands(plan.ids, vectors, plan.fresh_from)
        records: list[Command] = [
            ("APPEND", self._meta_key(chunk), _encode_block(plan.ids[positions], plan.columns.rows(positions)))
            for chunk, positions in _groups(plan.ids // self.chunk_size)]
        return [names_and_vectors, records + self._commit_commands(b"+" + plan.ids.astype("<i8").tobytes())]

    def settled(self, plan: WritePlan) -> None:
        """Forget ``plan`` as in flight: its write is done (or failed, and a re-run stores it)."""
        for position, unsettled in enumerate(self._unsettled):
            if unsettled is plan:
                del self._unsettled[position]
                return

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray) -> WritePlan:
        """:meth:`prepare` then :meth:`write`; ``vectors`` has one row per input record."""
        plan = self.prepare(records)
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
                commands.append(("SET", self._vec_key(chunk), rows.ljust(self.chunk_size * row_bytes, b"\0")))
            else:
                commands.append(("SETRANGE", self._vec_key(chunk), offset * row_bytes, rows))
        return commands

    def _commit_commands(self, change: bytes) -> list[tuple]:
        # The journal entry goes first: a reader that sees version v finds v's entry too.
        journal = [("RPUSH", self.journal_key, change)] if self._info.get("journal") else []
        lock = [("EXPIRE", self.prefix + "lock", LOCK_TTL_SECONDS)] if self._lock_token else []
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
            records.append(("SET", self._meta_key(number), _encode_block(
                np.array([i for i, _ in kept], np.int64), Columns.of([record for _, record in kept])))
                           if kept else ("UNLINK", self._meta_key(number)))
        if not found:
            return []
        removed_ids = np.array([i for i, _ in found], np.int64)
        rest = self._vector_commands(removed_ids, np.zeros((len(found), self.dim), np.float32))
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
        for bucket, blob in self._chunk_blobs(self._name_key, wanted).items():
            stored = np.frombuffer(blob or b"", PAIR)
            kept = stored[~np.isin(stored["id"], ids)]
            rewrites.append(("SET", self._name_key(bucket), kept.tobytes()) if len(kept)
                            else ("UNLINK", self._name_key(bucket)))
        return rewrites

    def remove_names(self, names: Sequence[str]) -> list[ImageRecord]:
        return self.remove(i for i in self.lookup(names) if i is not None)

    def remove_matching(self, labels: Iterable[str] = (), digests: Iterable[str] = ()) -> list[ImageRecord]:
        """Remove every image of one of ``labels`` or whose content has one of the sha256 ``digests``
        (whatever its name), in one pass over the records."""
        labels, digests = set(labels), set(digests)
        return self.remove(i for i, record in self.iter_records() if record.label in labels or record.sha256 in digests)

    def drop(self) -> int:
        """Delete every key of this database (and nothing else; its writer lock only if not held
        by this store, which releases it on leaving :meth:`writing`); returns how many existed."""
        chunks = self._num_chunks()
        # In three steps, each once the last is done (under Cluster the keys of a step are deleted
        # on all nodes at once): the records, so a load sees images vanish whole (see
        # _settled_chunks); then the vectors and the rest; then the info and the id counter, which
        # say what there is to delete, so a drop cut short is finished by running it again.
        records = [self._meta_key(c) for c in range(chunks)]
        rest = [self._vec_key(c) for c in range(chunks)] + [self._name_key(b) for b in range(NAME_BUCKETS)]
        rest += self._extra_keys() + [self.journal_key] + ([] if self._lock_token else [self.prefix + "lock"])
        deleted = 0
        for keys in (records, rest, [self.prefix + "next_id", self.info_key]):
            # One key per command: keys of one database may live on many nodes.
            deleted += int(sum(self.execute("deleting", [("UNLINK", key) for key in keys])))
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
        version, entries = self.execute("reading", [("HGET", self.info_key, "version"),
                                                    ("LRANGE", self.journal_key, start, -1)])
        return int(version or 0), [(e[:1].decode(), np.frombuffer(e[1:], "<i8").astype(np.int64))
                                   for e in entries]

    def register_key(self, suffix: str) -> str:
        """Declare a key ``cbir:<db>:<suffix>`` owned by this database, so :meth:`drop` removes it."""
        key = self.key(suffix)
        self.call("writing", self.client.sadd, self.prefix + "keys", key)
        return key

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
        replies = self.execute("reading vectors of", [("GET", self._vec_key(chunk)) for chunk in whole] + [
            ("GETRANGE", self._vec_key(chunk), row * row_bytes, (row + 1) * row_bytes - 1)
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

    def _settled_chunks(self, batch: range) -> dict[int, tuple[bytes | None, bytes | None]]:
        """The (records, vectors) blobs of each chunk of ``batch``, read so that they agree while
        other processes write: records, then vectors, then records again, each read after the last
        one's answer (under Cluster they live on different nodes), and a chunk whose records changed
        in between read again. A write stores vectors before the records that make them live, and
        a removal drops records before erasing vectors, so records that stayed the same across the
        vector read have every live row in it. A chunk stops changing once it is full."""
        settled: dict[int, tuple[bytes | None, bytes | None]] = {}
        pending = list(batch)
        before = self._meta_blobs(pending)
        while pending:
            blobs = self._chunk_blobs(self._vec_key, pending, "loading vectors from")
            after = self._meta_blobs(pending)
            for chunk in pending:
                if after[chunk] == before[chunk]:
                    settled[chunk] = (after[chunk], blobs[chunk])
            pending = [chunk for chunk in pending if chunk not in settled]
            before = after
        return dict(sorted(settled.items()))

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
            for chunk, (meta, blob) in self._settled_chunks(batch).items():
                records_of_chunk = MetaChunk(meta)
                live = len(records_of_chunk)
                if not live:
                    continue
                rows = records_of_chunk.ids - chunk * self.chunk_size
                if blob is None or len(blob) < (int(rows[-1]) + 1) * row_bytes:
                    raise StoreError(f"database '{self.name}': vectors of chunk {chunk} are missing"
                                     + self._why_missing())
                matrix = np.frombuffer(blob, np.float32, (len(blob) // row_bytes) * self.dim).reshape(-1, self.dim)
                contiguous = rows[0] == 0 and rows[-1] == live - 1
                vectors[count:count + live] = matrix[:live] if contiguous else matrix[rows]
                ids[count:count + live] = records_of_chunk.ids
                count += live
                if decode_records:
                    records += [record for _, record in records_of_chunk.records()]
        return ids[:count], vectors[:count], records


class WriteStream:
    """Writes plans through a :class:`~cbir.commands.CommandStream`, up to ``depth`` in flight:
    this client encodes the next batch while Redis stores the last (``depth=0`` waits for each)."""

    def __init__(self, store: VectorStore, depth: int = 2):
        self.store = store
        self._stream = store.call("connecting to", commands.CommandStream, store.client, depth, store.settled,
                                  store._lock_kept)

    def write(self, plan: WritePlan, vectors: np.ndarray) -> None:
        if not plan.records:
            return
        try:
            phases = self.store._write_phases(plan, vectors)
        except BaseException:
            self.store.settled(plan)  # nothing of it was sent
            raise
        self.store.call("writing to", self._stream.send, phases, plan)

    def close(self) -> None:
        """Wait for every write in flight; raises the first Redis error among them."""
        self.store.call("writing to", self._stream.close)
        _say_resumed(self._stream, self.store.name)

    def abandon(self) -> None:
        """Close without waiting for the writes in flight (see CommandStream.abandon)."""
        self._stream.abandon()


def _say_resumed(stream: commands.CommandStream, database: str) -> None:
    if stream.resumptions and not stream.failed:  # a failure says what to do itself
        warnings.warn(
            f"database '{database}': the connection to Redis was lost and made again {stream.resumptions} time(s); "
            "the writes in flight were sent again. If the server crashed rather than restarted, it may have lost "
            "its last second of writes: run the same command again to store what is missing (stored images are "
            "skipped)", ConnectionResumedWarning, stacklevel=3)
