"""The Redis store: every database in its own namespace, vectors packed in chunks.

The keys are described in :mod:`cbir.store.layout`.

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
import time
from dataclasses import dataclass, field
from typing import Sequence

import redis

from cbir.errors import ModelMismatchError, StoreError
from cbir.store.journal import JournalMixin
from cbir.store.layout import DB_NAME_CHARS, SCHEMA_VERSION, check_db_name, chunk_size_for
from cbir.store.lock import LockingMixin
from cbir.store.names import NAME_BUCKETS, NameIndex
from cbir.store.reader import ReadingMixin
from cbir.store.redis import commands
from cbir.store.redis.commands import Command
from cbir.store.redis.connect import unfit_for_writes
from cbir.store.redis.failures import as_text, failure_and_advice
from cbir.store.writer import WritePlan, WritingMixin

# The info hash with all its fields, unless it exists: one key, so one slot on a Cluster too.
_CREATE_IF_ABSENT = ("if redis.call('exists', KEYS[1]) == 1 then return 0 end "
                     "redis.call('hset', KEYS[1], unpack(ARGV)) return 1")


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


def database_names(client) -> list[str]:
    """The databases on this Redis, sorted: their info keys, found with SCAN (never KEYS, which
    blocks the server), on every node of a Cluster."""
    names = set()
    try:
        for key in client.scan_iter(match="cbir:*:info", count=1000):
            name = as_text(key)[len("cbir:"):-len(":info")]
            if name and set(name) <= DB_NAME_CHARS:  # not an index chunk or another program's key
                names.add(name)
    except redis.RedisError as exc:
        raise StoreError(f"Redis failed while listing the databases: {exc}") from exc
    return sorted(names)


class VectorStore(ReadingMixin, WritingMixin, JournalMixin, LockingMixin):
    """One database (``--db-name``) in Redis: vectors, image records and the model that made them.

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

    def vector_key(self, chunk: int) -> str:
        return f"{self.prefix}vec:{chunk}"

    def meta_key(self, chunk: int) -> str:
        return f"{self.prefix}meta:{chunk}"

    def names_key(self, bucket: int) -> str:
        return f"{self.prefix}names:{bucket}"

    def thumbnails_key(self, chunk: int) -> str:
        return f"{self.prefix}thumbs:{chunk}"

    def key(self, suffix: str) -> str:
        """The key ``cbir:<db>:<suffix>``, for modules that keep their own data in this database."""
        return self.prefix + suffix

    # --------------------------------------------------------------- redis io
    def call(self, what: str, fn, *args, **kwargs):
        """``fn(*args)``, with a Redis failure turned into a StoreError saying what was being done."""
        try:
            return commands.through_failover(self.client, fn, *args, **kwargs)
        except redis.RedisError as exc:
            failure, advice = failure_and_advice(exc)
            raise StoreError(f"{failure} while {what} database '{self.name}': {advice}. "
                             "Stored images are kept; re-run to continue.") from exc

    def execute(self, what: str, batch: Sequence[Command]) -> list:
        """The replies of a batch of commands, in one round trip per node (see commands.run)."""
        return self.call(what, commands.run, self.client, batch)

    # ------------------------------------------------------------------ info
    def refresh(self) -> None:
        raw = self.call("reading", self.client.hgetall, self.info_key)
        self._info = {as_text(k): as_text(v) for k, v in raw.items()}
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
        :func:`~cbir.store.redis.connect.unfit_for_writes`), before anything is written."""
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
                "another --db-name, or --rewrite to start the database over."
            )

    def describe(self) -> DatabaseInfo:
        self.require()
        return DatabaseInfo(
            name=self.name, count=self.count(), dim=self.dim, model=self.model,
            model_spec=self.model_spec, chunk_size=self.chunk_size, version=self.version(),
            created=float(self._info.get("created", 0)),
        )

    def drop(self) -> int:
        """Delete every key of this database (and nothing else; its writer lock only if not held
        by this store, which releases it on leaving :meth:`writing`); returns how many existed."""
        chunks = self._num_chunks()
        # In three steps, each once the last is done (under Cluster the keys of a step are deleted
        # on all nodes at once): the records, so a load sees images vanish whole (see
        # _settled_chunks); then the vectors and the rest; then the info and the id counter, which
        # say what there is to delete, so a drop cut short is finished by running it again.
        records = [self.meta_key(c) for c in range(chunks)]
        rest = [self.vector_key(c) for c in range(chunks)] + [self.thumbnails_key(c) for c in range(chunks)]
        rest += [self.names_key(b) for b in range(NAME_BUCKETS)]
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
        return [self.prefix + "keys"] + [as_text(m) for m in members]

    def register_key(self, suffix: str) -> str:
        """Declare a key ``cbir:<db>:<suffix>`` owned by this database, so :meth:`drop` removes it."""
        key = self.key(suffix)
        self.call("writing", self.client.sadd, self.prefix + "keys", key)
        return key



    def set_picture(self, name: str, data: bytes) -> None:
        """Keep a picture of this database (``name`` such as ``tsne.png``), replacing the last one of
        that name, so that a service shows it without access to the files of whoever made it."""
        key = self.register_key(PICTURES)
        self.call("writing", self.client.hset, key, name, data)

    def picture(self, name: str) -> bytes | None:
        return self.call("reading", self.client.hget, self.key(PICTURES), name)

    def picture_names(self) -> list[str]:
        return sorted(as_text(name) for name in self.call("reading", self.client.hkeys, self.key(PICTURES)))


PICTURES = "pictures"  # hash: picture name -> its bytes (see layout)
