"""Rankings: the stored images (support) and the queries, searched once to the depth every protocol needs."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from cbir.errors import DataSourceWarning
from cbir.evaluation.metrics import average_precision_at_r
from cbir.images.sources import ImageItem
from cbir.pipeline.embed import embed_items
from cbir.search.index import SearchIndex, id_positions
from cbir.store.database import VectorStore

MAP_DEPTH_LIMIT = 2000  # mAP@R looks at most this deep (R is capped for huge classes)


# Neighbours (queries x depth) one search step holds: ranked in steps this size, memory does not
# grow with the number of queries (docs/PERFORMANCE.md, "Figures once quoted in the code").
RANKING_CELLS = 2_000_000


# ------------------------------------------------------------------- data
def _objects(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


def _groups_of(names: np.ndarray, groups: dict[str, str] | None) -> np.ndarray | None:
    """Each name's group (patient, slide); a name the mapping lacks is its own group."""
    return None if groups is None else _objects(groups.get(n, n) for n in names)


@dataclass
class Support:
    """The stored images: ids ascending, with labels, projects, hashes, names and groups."""

    ids: np.ndarray
    labels: np.ndarray
    projects: np.ndarray
    sha256: np.ndarray
    names: np.ndarray
    groups: np.ndarray | None = None
    vectors: np.ndarray | None = None

    @classmethod
    def from_store(cls, store: VectorStore, groups: dict[str, str] | None = None) -> "Support":
        ids, vectors, records = store.load_with_records()
        names = _objects(r.name for r in records)
        if groups and len(names) and not any(name in groups for name in names):
            warnings.warn(f"--groups names no stored image (its first name is {next(iter(groups))!r}; stored names "
                          f"look like {names[0]!r}): no neighbour is skipped for a shared group", DataSourceWarning,
                          stacklevel=2)
        return cls(ids=ids, labels=_objects(r.label for r in records), projects=_objects(r.project for r in records),
                   sha256=_objects(r.sha256 for r in records), names=names, vectors=vectors,
                   groups=_groups_of(names, groups))

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Position of each store id (-1 for -1 or an unknown id)."""
        return id_positions(self.ids, ids)

    def take(self, positions: np.ndarray) -> "Support":
        positions = np.sort(np.asarray(positions, np.int64))
        pick = lambda a: None if a is None else a[positions]  # noqa: E731
        return Support(ids=self.ids[positions], labels=self.labels[positions], projects=self.projects[positions],
                       sha256=self.sha256[positions], names=self.names[positions], groups=pick(self.groups),
                       vectors=pick(self.vectors))


@dataclass
class Queries:
    """Query images with their labels; ``ids`` are store ids for leave-one-out, else -1."""

    names: np.ndarray
    labels: np.ndarray
    projects: np.ndarray
    sha256: np.ndarray
    vectors: np.ndarray
    ids: np.ndarray
    groups: np.ndarray | None = None
    model_seconds: float = 0.0  # total embedding time of all queries

    @classmethod
    def embed(cls, items: Sequence[ImageItem], extractor, groups: dict[str, str] | None = None,
              progress: bool = False) -> tuple["Queries", list[str]]:
        """The readable ``items`` embedded by ``extractor`` (timed as model time), and the failures."""
        started = time.perf_counter()
        vectors, decoded = embed_items(items, extractor, progress=progress)
        chosen = [items[p] for p in decoded.positions]
        names = _objects(i.name for i in chosen)
        queries = cls(names=names, labels=_objects(i.label for i in chosen),
                      projects=_objects(i.project for i in chosen), sha256=_objects(decoded.sha256), vectors=vectors, ids=np.full(len(chosen), -1, np.int64),
                      groups=_groups_of(names, groups), model_seconds=time.perf_counter() - started)
        return queries, decoded.failures

    @classmethod
    def of_support(cls, support: Support) -> "Queries":
        return cls(names=support.names, labels=support.labels, projects=support.projects,
                   sha256=support.sha256, vectors=support.vectors, ids=support.ids, groups=support.groups)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "Queries":
        rows = np.asarray(rows, np.int64)
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        share = len(rows) / max(len(self), 1)
        return Queries(names=self.names[rows], labels=self.labels[rows], projects=self.projects[rows],
                       sha256=self.sha256[rows], vectors=self.vectors[rows], ids=self.ids[rows],
                       groups=pick(self.groups), model_seconds=self.model_seconds * share)


@dataclass
class Ranking:
    """Each query's neighbours as support positions (-1: none), best first, and similarities."""

    queries: Queries
    support: Support
    positions: np.ndarray
    scores: np.ndarray
    search_seconds: float = 0.0
    transfer_seconds: float = 0.0
    # Each query's average precision at R by exact search (NaN where nothing stored is relevant).
    average_precision: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> "Ranking":
        rows = np.asarray(rows, np.int64)
        share = len(rows) / max(len(self.queries), 1)
        return replace(self, queries=self.queries.take(rows), positions=self.positions[rows],
                       scores=self.scores[rows], search_seconds=self.search_seconds * share,
                       transfer_seconds=self.transfer_seconds * share,
                       average_precision=None if self.average_precision is None else self.average_precision[rows])

    def neighbour(self, column: np.ndarray) -> np.ndarray:
        """A support column (labels, projects ...) per neighbour; None where there is none."""
        out = np.full(self.positions.shape, None, dtype=object)
        present = self.positions >= 0
        out[present] = column[self.positions[present]]
        return out


def relevant_counts(support: Support, queries: Queries) -> np.ndarray:
    """R of each query: the support images of its label that a ranking may hold, so not the query
    itself, its stored copies or its group (a query of a patient with 4 images of its class
    could reach at most R - 3 of them otherwise); capped at ``MAP_DEPTH_LIMIT``."""
    labels, hashes = support.labels.astype(str).tolist(), support.sha256.tolist()
    grouped = support.groups is not None and queries.groups is not None
    per_label, per_copy = Counter(labels), Counter(zip(labels, hashes))
    if grouped:
        groups = support.groups.tolist()
        per_group, per_copy_in_group = Counter(zip(labels, groups)), Counter(zip(labels, hashes, groups))
    stored = support.positions(queries.ids) >= 0
    counts = np.zeros(len(queries), np.int64)
    for row, (label, sha) in enumerate(zip(queries.labels.astype(str).tolist(), queries.sha256.tolist())):
        skipped = per_copy[label, sha] if sha else 0
        if grouped:
            group = queries.groups[row]
            skipped += per_group[label, group] - (per_copy_in_group[label, sha, group] if sha else 0)
        elif stored[row] and not sha:  # only its id says which stored image the query is
            skipped += 1
        counts[row] = per_label[label] - skipped
    return np.minimum(counts, MAP_DEPTH_LIMIT)


def _label_codes(support: Support, queries: Queries) -> tuple[np.ndarray, np.ndarray]:
    """Support and query labels as integers (-1: a query label nothing stored has)."""
    classes, support_codes = np.unique(support.labels.astype(str), return_inverse=True)
    code = {label: i for i, label in enumerate(classes.tolist())}
    return support_codes, np.array([code.get(label, -1) for label in queries.labels.astype(str).tolist()], np.int64)


def rank(index: SearchIndex, support: Support, queries: Queries, depth: int,
         store: VectorStore | None = None, relevant: np.ndarray | None = None) -> Ranking:
    """Search ``depth`` neighbours per query, skipping the query itself, its copy and its group.

    With ``relevant`` (R per query, see :func:`relevant_counts`) the search goes R deep where R
    is deeper and each query's average precision at R is kept; only ``depth`` columns are.
    Queries are searched ``RANKING_CELLS`` neighbours at a time. With ``store``, the neighbours'
    records are fetched from Redis as a client would (timed as transfer); the labels used are
    the support's either way.
    """
    group_size = 0
    if support.groups is not None and queries.groups is not None:
        _, counts = np.unique(support.groups.astype(str), return_counts=True)
        group_size = int(counts.max())
    deepest = depth if relevant is None else max(depth, int(relevant.max(initial=0)))
    wanted = min(deepest + 1 + group_size + 4, max(index.size, 1))
    width = min(depth, wanted)
    positions = np.full((len(queries), width), -1, np.int64)
    scores = np.full((len(queries), width), np.nan, np.float32)
    precisions = None if relevant is None else np.full(len(queries), np.nan)
    support_codes, query_codes = _label_codes(support, queries) if relevant is not None else (None, None)
    search_seconds = 0.0
    step = max(1, RANKING_CELLS // wanted)
    for start in range(0, len(queries), step):
        rows = slice(start, start + step)
        started = time.perf_counter()
        found_scores, ids = index.search(queries.vectors[rows], wanted)
        search_seconds += time.perf_counter() - started
        found = support.positions(ids)
        skip = found < 0
        skip |= ids == queries.ids[rows, None]
        safe = np.maximum(found, 0)
        sha = queries.sha256[rows]
        skip |= (support.sha256[safe] == sha[:, None]) & (sha != "")[:, None]
        if group_size:
            skip |= support.groups[safe] == queries.groups[rows, None]
        # Stable sort moves skipped entries to the end of each row, keeping the order of the rest.
        order = np.argsort(skip, axis=1, kind="stable")
        kept_skip = np.take_along_axis(skip, order, axis=1)
        found = np.where(kept_skip, -1, np.take_along_axis(found, order, axis=1))
        positions[rows] = found[:, :width]
        scores[rows] = np.where(kept_skip, np.nan, np.take_along_axis(found_scores, order, axis=1))[:, :width]
        if precisions is not None:
            hits = (found >= 0) & (support_codes[np.maximum(found, 0)] == query_codes[rows, None])
            precisions[rows] = average_precision_at_r(hits, relevant[rows])
    transfer_seconds = 0.0
    if store is not None:
        started = time.perf_counter()
        store.records(np.unique(support.ids[positions[positions >= 0]]).tolist())
        transfer_seconds = time.perf_counter() - started
    return Ranking(queries=queries, support=support, positions=positions, scores=scores,
                   search_seconds=search_seconds, transfer_seconds=transfer_seconds, average_precision=precisions)


