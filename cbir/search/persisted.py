"""A trained FAISS index kept in Redis beside the vectors it was built from, and kept current.

``train_index`` reads the database's vectors, builds and tunes an index, and saves it under
the database. ``search_index`` gives every later search, in any process that reaches the same
Redis, that index brought up to date: the store journals each change once an index exists
(see :mod:`cbir.store.database`), and the changes since the build are replayed on load. An index that
cannot be brought up to date exactly falls back to exact search with a warning.

Keys (``P = "cbir:<db>:"``)::

    P index               hash    kind, params (JSON), version and journal position it reflects,
                                  build id, chunks, bytes, sha256, build time, measured recall
    P index:<build>:<n>   string  the serialised index (see SearchIndex.to_bytes), in chunks
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np

from cbir.errors import CbirError, StoreError
from cbir.search.index import SearchIndex
from cbir.search.tuning import Tuning, tune
from cbir.store.database import VectorStore

INDEX_CHUNK_BYTES = 16 * 1024 * 1024
TUNING_QUERIES = 1000
# Under Cluster a commit's journal entry and its version bump go to two nodes at once, so a
# reader can see the bump a moment before the entry; longer than this, the entry is missing.
JOURNAL_LAG_SECONDS = 0.2


class StaleIndexWarning(UserWarning):
    """The trained index could not be brought up to date; exact search answers instead."""


@dataclass
class TrainReport:
    kind: str
    count: int
    params: dict
    load_seconds: float
    build_seconds: float
    tune_seconds: float
    bytes: int
    tuning: Tuning | None = None

    @property
    def bytes_per_vector(self) -> float:
        return self.bytes / max(self.count, 1)

    def as_dict(self) -> dict:
        chosen = self.tuning.chosen if self.tuning else None
        return {"kind": self.kind, "count": self.count, "params": self.params,
                "load_seconds": round(self.load_seconds, 3), "build_seconds": round(self.build_seconds, 3),
                "tune_seconds": round(self.tune_seconds, 3), "bytes": self.bytes,
                "bytes_per_vector": round(self.bytes_per_vector, 2),
                "recall1": chosen.recall1 if chosen else None, "recall10": chosen.recall10 if chosen else None}


def _index_key(store: VectorStore) -> str:
    return store.key("index")


def train_index(store: VectorStore, kind: str = "ivf", nlist: int | None = None, m: int | None = None,
                breadth: int | None = None, target_recall: float = 0.95, seed: int = 0) -> TrainReport:
    """Build an index of ``kind`` over every stored vector, tune it and save it in Redis.

    ``breadth`` (nprobe / efSearch) is tuned on up to 1000 stored vectors unless given.
    """
    if breadth is not None and kind == "flat":
        raise CbirError("--nprobe applies to the ivf, ivfpq and hnsw indexes, not flat")
    store.require()
    store.check_keeps_data()
    with store.writing():  # no change may land between the snapshot and its version
        started = time.perf_counter()  # after any wait for another writer
        version, journal_start = store.start_journal()
        ids, vectors = store.load_vectors()
    if not len(ids):
        raise StoreError(f"database '{store.name}' holds no images to index")
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    searcher = SearchIndex.build(kind, ids, vectors, nlist=nlist, m=m, seed=seed)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rows = np.random.default_rng(seed).choice(len(ids), min(TUNING_QUERIES, len(ids)), replace=False)
    exact = SearchIndex.exact(ids, vectors)
    tuning = tune(searcher, exact, ids[rows], vectors[rows], target_recall=target_recall,
                  breadths=None if breadth is None else [breadth])
    tune_seconds = time.perf_counter() - started
    # Freed before serialising: kept, they raised the peak memory by a third (docs/PERFORMANCE.md).
    del vectors, exact
    blob = searcher.to_bytes()
    save_index(store, blob, searcher, version, journal_start, tuning)
    return TrainReport(kind=kind, count=len(ids), params=dict(searcher.params), load_seconds=load_seconds,
                       build_seconds=build_seconds, tune_seconds=tune_seconds, bytes=len(blob), tuning=tuning)


def save_index(store: VectorStore, blob: bytes, searcher: SearchIndex, version: int, journal_start: int,
               tuning: Tuning | None = None) -> None:
    """Write the index chunks, then switch the database to them and delete the previous ones."""
    build = uuid.uuid4().hex[:12]
    chunk_keys = [store.register_key(f"index:{build}:{n}")
                  for n in range(max(1, -(-len(blob) // INDEX_CHUNK_BYTES)))]
    for number, key in enumerate(chunk_keys):
        store.call("saving the index of", store.client.set, key,
                    blob[number * INDEX_CHUNK_BYTES:(number + 1) * INDEX_CHUNK_BYTES])
    meta_key = store.register_key("index")
    with store.writing():
        previous = index_info(store)
        store.call("saving the index of", store.client.hset, meta_key, mapping={
            "kind": searcher.kind, "params": json.dumps(searcher.params), "version": version,
            "journal": journal_start, "build": build, "chunks": len(chunk_keys), "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), "built": time.time(),
            "recall1": tuning.chosen.recall1 if tuning else "", "recall10": tuning.chosen.recall10 if tuning else "",
        })
        if journal_start:
            # Entries before the build are in the index now; a crash between these two steps
            # leaves positions that no longer add up, which readers detect (exact search).
            store.trim_journal(journal_start)
            store.call("saving the index of", store.client.hset, meta_key, "journal", 0)
    if previous:
        _delete_chunks(store, previous)


def _delete_chunks(store: VectorStore, meta: dict) -> None:
    keys = [store.key(f"index:{meta['build']}:{n}") for n in range(int(meta["chunks"]))]
    store.execute("deleting the old index of",
                  [command for key in keys for command in (("UNLINK", key), ("SREM", store.key("keys"), key))])


def index_info(store: VectorStore) -> dict:
    """The saved index's description (empty when none was trained)."""
    raw = store.call("reading", store.client.hgetall, _index_key(store))
    return {k.decode(): v.decode() for k, v in raw.items()}


def delete_index(store: VectorStore) -> bool:
    """Forget the trained index (searches become exact); True if there was one."""
    with store.writing():  # not while a training run saves its index
        meta = index_info(store)
        if not meta:
            return False
        store.call("deleting the index of", store.client.unlink, _index_key(store))
        _delete_chunks(store, meta)
    return True


@dataclass
class _Loaded:
    build: str
    searcher: SearchIndex
    version: int
    position: int


_loaded: dict[tuple[int, str], _Loaded] = {}


def _load(store: VectorStore, meta: dict) -> _Loaded:
    keys = [store.key(f"index:{meta['build']}:{n}") for n in range(int(meta["chunks"]))]
    parts = store.execute("loading the index of", [("GET", key) for key in keys])
    if any(part is None for part in parts):
        raise StoreError(f"the trained index of database '{store.name}' is missing chunks; run train_index.py again")
    blob = b"".join(parts)
    parts.clear()  # one copy of the index's bytes at a time
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise StoreError(f"the trained index of database '{store.name}' is corrupt; run train_index.py again")
    searcher = SearchIndex.from_bytes(blob, meta["kind"], json.loads(meta["params"]))
    return _Loaded(build=meta["build"], searcher=searcher, version=int(meta["version"]),
                   position=int(meta["journal"]))


def _catch_up(store: VectorStore, loaded: _Loaded) -> bool:
    """Replay the journal's changes since ``loaded`` was current; False if they do not add up."""
    version, entries = store.changes(loaded.position)
    due = version - loaded.version
    deadline = time.monotonic() + JOURNAL_LAG_SECONDS
    while 0 <= due and len(entries) < due and time.monotonic() < deadline:
        time.sleep(0.005)
        entries = store.changes(loaded.position)[1]
    if due < 0 or len(entries) < due:
        return False
    for sign, ids in entries[:due]:
        if sign == "+":
            live_ids, vectors = store.vectors(ids)
            loaded.searcher.remove(ids)  # an id written then removed since may be gone now
            loaded.searcher.add(live_ids, vectors)
        else:
            loaded.searcher.remove(ids)
    loaded.version, loaded.position = version, loaded.position + due
    return True


def search_index(store: VectorStore, exact: bool = False) -> SearchIndex:
    """The index searches of this database should use: the trained one, up to date, else exact.

    The trained index is loaded once per process and caught up with later changes on each call.
    """
    meta = {} if exact else index_info(store)
    if not meta:
        return SearchIndex.from_store(store)
    cache_key = (id(store.client), store.prefix)
    loaded = _loaded.get(cache_key)
    if loaded is None or loaded.build != meta["build"]:
        loaded = _loaded[cache_key] = _load(store, meta)
    if not _catch_up(store, loaded):
        _loaded.pop(cache_key, None)
        warnings.warn(f"the trained {meta['kind']} index of database '{store.name}' cannot be brought up to "
                      "date with the stored images; searching exactly instead. Run train_index.py again.",
                      StaleIndexWarning, stacklevel=2)
        return SearchIndex.from_store(store)
    if loaded.searcher.kind == "ivfpq":
        loaded.searcher.refine_vectors = store.vector_rows  # this store's: the cache outlives the object
    return loaded.searcher
