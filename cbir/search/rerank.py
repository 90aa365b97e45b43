"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017) of each query's nearest candidates.

An image is trusted as a neighbour of the query when the query is among its neighbours too
(k-reciprocal), and two images are close when their sets of such neighbours overlap (a Jaccard
distance), blended with the original distance. Computed per query on its ``pool`` nearest
candidates only (the query and its pool stand for the whole database), so a search costs one
index search plus a (pool + 1)² matrix per query, whatever the database's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

K1, K2, LAMBDA = 20, 6, 0.3  # the paper's settings
POOL = 100  # candidates re-ranked per query


def reranked(index, store) -> "KReciprocal":
    """``index`` (a :class:`~cbir.search.index.SearchIndex` over ``store``) re-ranked: candidates' vectors
    from the index where it keeps them whole, else from Redis."""
    return KReciprocal(index, index.vectors_of if index.kind in ("flat", "hnsw") else store.vector_rows)


@dataclass
class KReciprocal:
    """A searcher with :class:`~cbir.search.index.SearchIndex`'s ``search``, re-ranking its candidates.

    ``vectors_of``: the stored vector of each of some store ids (e.g. ``VectorStore.vector_rows``).
    Scores stay cosine similarities; only their order changes.
    """

    index: object
    vectors_of: Callable[[np.ndarray], np.ndarray]
    k1: int = K1
    k2: int = K2
    lam: float = LAMBDA
    pool: int = POOL

    def search(self, queries: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`SearchIndex.search`, the first ``pool`` results of each row re-ranked (deeper ones
        keep their order)."""
        scores, ids = self.index.search(queries, max(k, self.pool), among)
        for row, query in enumerate(np.atleast_2d(queries)):
            head = np.flatnonzero(ids[row, :self.pool] >= 0)
            if len(head) < 2:
                continue
            candidates = ids[row, head]
            order = np.argsort(rerank_distances(query, self.vectors_of(candidates), self.k1, self.k2, self.lam),
                               kind="stable")
            ids[row, head] = candidates[order]
            scores[row, head] = scores[row, head][order]
        return scores[:, :k], ids[:, :k]

    def __getattr__(self, name: str):  # everything else (kind, params, ...) is the index's
        return getattr(self.index, name)


def rerank_distances(query: np.ndarray, candidates: np.ndarray, k1: int = K1, k2: int = K2,
                     lam: float = LAMBDA) -> np.ndarray:
    """The re-ranked distance of each candidate (unit vectors) to the query (unit vector)."""
    points = np.vstack([query[None, :], candidates]).astype(np.float64)
    count = len(points)
    k1, half = min(k1, count - 1), min(int(round(k1 / 2)), count - 1)
    distance = np.maximum(2.0 - 2.0 * points @ points.T, 0.0)  # squared Euclidean of unit vectors
    distance /= np.maximum(distance.max(axis=0, keepdims=True), 1e-12)
    ranking = np.argsort(distance, axis=1, kind="stable")
    rows = np.arange(count)[:, None]
    near = np.zeros((count, count), bool)
    near[rows, ranking[:, :k1 + 1]] = True
    reciprocal = near & near.T
    near_half = np.zeros((count, count), bool)
    near_half[rows, ranking[:, :half + 1]] = True
    reciprocal_half = near_half & near_half.T
    # Add a reciprocal neighbour's own (k1/2)-reciprocal set where two thirds of it is reciprocal already.
    # Counts as float products: BLAS, exact for counts this small.
    overlap = reciprocal.astype(np.float32) @ reciprocal_half.T.astype(np.float32)
    taken = reciprocal & (overlap > 2 / 3 * reciprocal_half.sum(axis=1)[None, :])
    expanded = reciprocal | (taken.astype(np.float32) @ reciprocal_half.astype(np.float32) > 0)
    weights = np.where(expanded, np.exp(-distance), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    if k2 > 1:  # local query expansion over each point's k2 nearest
        weights = weights[ranking[:, :min(k2, count)]].mean(axis=1)
    shared = np.minimum(weights[0][None, :], weights).sum(axis=1)
    jaccard = 1.0 - shared / (2.0 - shared)
    return ((1 - lam) * jaccard + lam * distance[0])[1:]
