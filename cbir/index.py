"""FAISS search over a store's vectors: cosine similarity as inner product of unit vectors.

Ids are the store's ids (``IndexIDMap2``), so a search result names a stored image directly.
Until an approximate index is trained, search is exact (``IndexFlatIP``).
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .store import VectorStore


@dataclass
class SearchIndex:
    """A FAISS index over the store's vectors, built for one data version of the store."""

    index: faiss.Index
    version: int
    kind: str = "flat"

    @classmethod
    def exact(cls, ids: np.ndarray, vectors: np.ndarray, version: int = 0) -> "SearchIndex":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
        return cls(index=index, version=version)

    @classmethod
    def from_store(cls, store: VectorStore) -> "SearchIndex":
        version = store.version()
        ids, vectors = store.load_vectors()
        return cls.exact(ids, vectors, version)

    @property
    def size(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, k); missing neighbours have id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        return self.index.search(queries, min(k, max(self.size, 1)))

    def search_excluding(self, queries: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search`, with ``exclude[i]`` (e.g. the query's own id) never in row i."""
        scores, ids = self.search(queries, k + 1)
        keep = ids != np.asarray(exclude, np.int64)[:, None]
        # Rows where the excluded id was not found drop their last result instead.
        keep[keep.all(axis=1), -1] = False
        width = keep.shape[1] - 1
        return scores[keep].reshape(-1, width), ids[keep].reshape(-1, width)
