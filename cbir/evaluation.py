"""Accuracy of retrieval on a database: leave-one-out kNN protocols."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CbirError
from .index import SearchIndex
from .store import VectorStore


@dataclass
class Accuracy:
    queries: int
    top1: float  # the first neighbour has the query's label
    top5: float  # one of the first five has it
    majority5: float  # at least three of the first five have it

    def as_dict(self) -> dict:
        return {"queries": self.queries, "top1": self.top1, "top5": self.top5, "majority5": self.majority5}


def neighbour_hits(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> Accuracy:
    """Metrics from labels: ``neighbour_labels[i]`` are query i's neighbours, best first."""
    hits = neighbour_labels[:, :5] == query_labels[:, None]
    return Accuracy(queries=len(query_labels), top1=float(hits[:, 0].mean()),
                    top5=float(hits.any(axis=1).mean()), majority5=float((hits.sum(axis=1) >= 3).mean()))


def leave_one_out(store: VectorStore) -> Accuracy:
    """Every stored image queries all the others (it never retrieves itself)."""
    ids, vectors = store.load_vectors()
    if len(ids) < 6:
        raise CbirError(f"database '{store.name}' has {len(ids)} images; leave-one-out needs at least 6")
    labels_by_id = {i: r.label for i, r in store.iter_records()}
    labels = np.array([labels_by_id[i] for i in ids.tolist()], dtype=object)
    index = SearchIndex.exact(ids, vectors)
    _, neighbour_ids = index.search_excluding(vectors, 5, exclude=ids)
    position = {image_id: p for p, image_id in enumerate(ids.tolist())}
    neighbour_labels = labels[[[position[i] for i in row] for row in neighbour_ids.tolist()]]
    return neighbour_hits(labels, neighbour_labels)
