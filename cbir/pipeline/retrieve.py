"""Nearest stored images of query images, their records and a kNN class vote."""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from cbir.errors import StoreError
from cbir.images.sources import ImageItem
from cbir.models.extractor import Extractor
from cbir.options import DEFAULT_NEIGHBOURS
from cbir.pipeline.embed import embed_items
from cbir.search.index import SearchIndex
from cbir.search.persisted import search_index
from cbir.search.rerank import reranked
from cbir.store.database import VectorStore


@dataclass
class Neighbour:
    rank: int
    id: int
    name: str
    label: str
    project: str
    score: float
    source: str = ""
    sha256: str = ""


@dataclass
class Retrieval:
    """One query's answer: its neighbours (best first) and their majority label.

    A stored copy of the query itself (same content hash) is listed but does not vote.
    """

    query: str
    query_label: str | None
    neighbours: list[Neighbour]
    vote: str | None = None
    vote_share: float = 0.0
    voters: int = 0
    location: str = ""
    votes: dict[str, int] = field(default_factory=dict)  # label -> neighbours voting for it

    def vote_summary(self) -> str:
        """The vote and its support, naming the stored copies of the query that did not vote."""
        copies = len(self.neighbours) - self.voters
        if not self.voters:
            return "none (every neighbour is a stored copy of the query)" if copies else "none (no neighbour)"
        left_out = ""
        if copies:
            left_out = (" (1 stored copy of the query does not vote)" if copies == 1 else
                        f" ({copies} stored copies of the query do not vote)")
        return f"{self.vote} ({round(self.vote_share * self.voters)}/{self.voters} neighbours){left_out}"

    def to_json(self) -> dict:
        return {
            "query": self.query,
            "query_label": self.query_label,
            "results": [{k: v for k, v in asdict(n).items() if k in ("rank", "id", "name", "label", "project", "score")}
                        for n in self.neighbours],
            "vote": self.vote,
            "vote_share": self.vote_share,
            "voters": self.voters,
            "votes": self.votes,
            "vote_summary": self.vote_summary(),
        }


def majority_vote(labels: Sequence[str], scores: Sequence[float]) -> tuple[str | None, float]:
    """The most frequent label and its share; ties go to the larger summed similarity."""
    if not labels:
        return None, 0.0
    counts: dict[str, int] = defaultdict(int)
    similarity: dict[str, float] = defaultdict(float)
    for label, score in zip(labels, scores):
        counts[label] += 1
        similarity[label] += float(score)
    winner = max(counts, key=lambda label: (counts[label], similarity[label]))
    return winner, counts[winner] / len(labels)


@dataclass
class Retriever:
    """Searches one database with the extractor that built it (and its trained index, if any)."""

    store: VectorStore
    extractor: Extractor
    exact: bool = False  # ignore a trained index
    index: SearchIndex | None = None  # an index kept current by the caller (a service), else loaded here
    rerank: bool = False  # k-reciprocal re-ranking of each query's nearest candidates (cbir.search.rerank)
    stored: int = field(init=False)  # images in the database when the search began
    # Seconds spent on each step so far: index (Redis reads and FAISS), embed (decoding and the
    # model), search, records (Redis reads of the neighbours' records only).
    timings: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.store.require()
        started = time.perf_counter()
        if self.index is None:
            self.index = search_index(self.store, exact=self.exact)
        if self.rerank:
            self.index = reranked(self.index, self.store)
        self.timings["index"] = time.perf_counter() - started
        self.stored = self.index.size  # the index is current: no second pass over the records to count them
        if not self.stored:
            raise StoreError(f"database '{self.store.name}' holds no images (every one was removed): "
                             f"add images first")

    def _timed(self, step: str, started: float) -> float:
        now = time.perf_counter()
        self.timings[step] = self.timings.get(step, 0.0) + now - started
        return now

    def neighbours(self, vectors: np.ndarray, k: int = DEFAULT_NEIGHBOURS,
                   among: np.ndarray | None = None) -> list[list[Neighbour]]:
        """The ``k`` nearest stored images of each vector (among the store ids ``among`` only, where given)."""
        started = time.perf_counter()
        scores, ids = self.index.search(vectors, k, among)
        started = self._timed("search", started)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        records = dict(zip(wanted, self.store.records(wanted)))
        self._timed("records", started)
        rows = []
        for row_scores, row_ids in zip(scores, ids):
            row = []
            for score, image_id in zip(row_scores.tolist(), row_ids.tolist()):
                record = records.get(image_id)
                if record is not None:  # removed since the index was built: never returned
                    row.append(Neighbour(rank=len(row) + 1, id=image_id, name=record.name,
                                         label=record.label, project=record.project,
                                         score=round(score, 6), source=record.source,
                                         sha256=record.sha256))
            rows.append(row)
        return rows

    def unstored_labels(self, retrievals: Sequence[Retrieval]) -> list[str]:
        """The query labels of which the database holds no image, sorted: no neighbour can share them.
        The stored labels are read only if some query's label is missing from all its neighbours."""
        doubtful = {r.query_label for r in retrievals
                    if r.query_label is not None and all(n.label != r.query_label for n in r.neighbours)}
        return sorted(doubtful - set(self.store.label_counts())) if doubtful else []

    def query(self, items: Sequence[ImageItem], k: int = DEFAULT_NEIGHBOURS, known_labels: bool = True,
              progress: bool = False) -> tuple[list[Retrieval], list[str]]:
        """Retrievals for the readable ``items`` and the failures (file: reason) of the others."""
        started = time.perf_counter()
        vectors, decoded = embed_items(items, self.extractor, progress=progress)
        self._timed("embed", started)
        asked = [items[position] for position in decoded.positions]
        return self.answers(vectors, [item.name for item in asked], decoded.sha256,
                            [item.label if known_labels else None for item in asked],
                            [item.location for item in asked], k), decoded.failures

    def answers(self, vectors: np.ndarray, names: Sequence[str], sha256: Sequence[str],
                labels: Sequence[str | None], locations: Sequence[str], k: int = DEFAULT_NEIGHBOURS,
                among: np.ndarray | None = None) -> list[Retrieval]:
        """The retrieval of each query vector (embedded by the caller), with its kNN vote; a stored
        copy of the query (the same sha256) is listed but does not vote."""
        results = []
        for name, sha, label, location, row in zip(names, sha256, labels, locations,
                                                   self.neighbours(vectors, k, among)):
            voters = [n for n in row if n.sha256 != sha]
            vote, share = majority_vote([n.label for n in voters], [n.score for n in voters])
            results.append(Retrieval(query=name, query_label=label, neighbours=row, vote=vote, vote_share=share,
                                     voters=len(voters), location=location,
                                     votes=dict(Counter(n.label for n in voters).most_common())))
        return results
