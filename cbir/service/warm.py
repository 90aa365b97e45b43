"""Databases kept warm for a service: each one's extractor built once, its index loaded once and
kept current, and nothing a second replica would miss (everything lives in Redis)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from cbir.errors import StoreError
from cbir.models.threads import torch_thread
from cbir.pipeline.model import extractor_for_store
from cbir.pipeline.retrieve import Retrieval, Retriever
from cbir.search.index import SearchIndex
from cbir.search.persisted import index_info, search_index
from cbir.service.batching import Batcher
from cbir.store.database import VectorStore


class UnknownDatabase(StoreError):
    pass


@dataclass
class WarmDatabase:
    store: VectorStore
    batcher: Batcher
    fingerprint: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Without a trained index searches are exact over every vector: loaded again only when the
    # data version moves (an add or a removal by any process).
    exact: SearchIndex | None = None
    exact_version: int = -1
    # Store ids by label and by project, for filtered searches: read again when the data version moves.
    groups: tuple[dict[str, list[int]], dict[str, list[int]]] = ({}, {})
    groups_version: int = -1

    @property
    def extractor(self):
        return self.batcher.extractor

    def _index(self, exact: bool) -> SearchIndex:
        if not exact and index_info(self.store):
            return search_index(self.store)  # loaded once per process, the journal replayed on each call
        version = self.store.version()
        if self.exact_version != version:
            self.exact, self.exact_version = SearchIndex.from_store(self.store), version
        return self.exact

    def _among(self, labels: list[str] | None, projects: list[str] | None) -> np.ndarray | None:
        """The store ids whose label is one of ``labels`` and whose project is one of ``projects``
        (either left out: any); None without a filter."""
        if not labels and not projects:
            return None
        version = self.store.version()
        if self.groups_version != version:
            by_label: dict[str, list[int]] = {}
            by_project: dict[str, list[int]] = {}
            for image_id, record in self.store.iter_records():
                by_label.setdefault(record.label, []).append(image_id)
                by_project.setdefault(record.project, []).append(image_id)
            self.groups, self.groups_version = (by_label, by_project), version
        chosen = None
        for wanted, groups in ((labels, self.groups[0]), (projects, self.groups[1])):
            if wanted:
                ids = np.array(sorted({i for name in wanted for i in groups.get(name, ())}), np.int64)
                chosen = ids if chosen is None else np.intersect1d(chosen, ids)
        return chosen

    def answer(self, vectors: np.ndarray, names: list[str], sha256: list[str], k: int, exact: bool = False,
               labels: list[str] | None = None,
               projects: list[str] | None = None, rerank: bool = False) -> tuple[list[Retrieval], dict[str, float]]:
        """The retrievals of query vectors (among the images of ``labels`` and ``projects`` only,
        where given) and the seconds spent on the index, search and records. One search at a time
        per database: bringing an index up to date changes it."""
        with self.lock:
            retriever = Retriever(self.store, self.extractor, exact=exact, index=self._index(exact), rerank=rerank)
            found = retriever.answers(vectors, names, sha256, [None] * len(names), [""] * len(names), k,
                                      self._among(labels, projects))
        return found, retriever.timings


class WarmDatabases:
    """The databases on one Redis, each made warm on its first search and rebuilt if the database
    was built again with another model."""

    def __init__(self, client):
        self.client = client
        self._warm: dict[str, WarmDatabase] = {}
        self._lock = threading.Lock()
        self.torch = torch_thread()

    def store(self, name: str, lock_wait: float = 0.0) -> VectorStore:
        """The database ``name``, its info read afresh; UnknownDatabase where there is none."""
        store = VectorStore(self.client, name, lock_wait=lock_wait)
        if not store.exists:
            raise UnknownDatabase(f"no database '{name}' on this Redis")
        store.require()
        return store

    def get(self, name: str) -> WarmDatabase:
        store = self.store(name)
        with self._lock:
            warm = self._warm.get(name)
            if warm is None or warm.fingerprint != store.model:
                if warm is not None:
                    warm.batcher.close()
                extractor = self.torch.submit(extractor_for_store, store).result()
                warm = self._warm[name] = WarmDatabase(store, Batcher(extractor, self.torch), store.model)
            warm.store = store
        return warm

    def close(self) -> None:
        with self._lock:
            for warm in self._warm.values():
                warm.batcher.close()
            self._warm.clear()
        self.torch.shutdown()

    def batch_sizes(self) -> list[int]:
        """Images per forward since the last call, over every database."""
        sizes = []
        for warm in list(self._warm.values()):
            sizes += warm.batcher.sizes
            warm.batcher.sizes = []
        return sizes
