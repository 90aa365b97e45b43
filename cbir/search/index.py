"""FAISS search over a store's vectors: cosine similarity as inner product of unit vectors.

A :class:`SearchIndex` is a FAISS index plus the store id of each of its entries, and a mask
of entries removed since it was built. Removal only clears the mask (a FAISS ``IDSelector``
then skips those entries during the search itself, so a search never returns them; rows a
filtered search leaves short are searched again, wider or exactly, so it never returns fewer
results because of them either); an updated image is masked and added again. This works the
same for every kind, HNSW included, which FAISS cannot remove from.

Kinds: ``flat`` (exact), ``ivf`` (IVF-Flat), ``ivfpq`` (IVF with 8-bit product-quantiser
codes) and ``hnsw``. :func:`tune` picks the search breadth (``nprobe`` / ``efSearch``) that
reaches a recall target against exact search. IVF-PQ's codes only estimate similarities, which
caps its recall; given where the exact vectors are (``refine_vectors``: in Redis, read row by
row), it takes ``refine`` times the neighbours asked for and re-ranks them exactly, and
:func:`tune` picks that factor too.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable

import faiss
import numpy as np

from cbir.errors import CbirError
from cbir.options import INDEX_KINDS

MIN_POINTS_PER_CENTROID = 39  # below this FAISS's k-means warns that centroids are poorly trained
TRAINING_POINTS_PER_CENTROID = 64
TIE_TOLERANCE = 1e-5  # similarities of identical vectors differ by float32 rounding at most
PQ_CENTROIDS = 256  # per sub-quantiser of 8-bit codes; k-means needs at least as many vectors
HNSW_NEIGHBOURS = 32
# --m 100000 over 1,217 vectors took gigabytes and reached recall@10 0.56 at efSearch 32.
HNSW_MAX_NEIGHBOURS = 256
# FAISS's default efConstruction (40) leaves clustered data poorly linked: 0.94 recall@10 at
# efSearch 1024 on 1M clustered vectors; 100 reaches 1.0 at efSearch 64 for 2.3x the build time.
HNSW_BUILD_BREADTH = 100
# Candidates an IVF-PQ search re-ranks per neighbour asked for. PneumoniaMNIST (3,882 x 1280,
# m 32, nprobe 32): recall@10 0.519 as the codes rank, 0.726 / 0.889 / 0.970 / 0.994 re-ranking
# 2 / 4 / 8 / 16 times as many.
REFINE_FACTORS = (1, 2, 4, 8, 16)
BREADTHS = {"ivf": (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048),
            "hnsw": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)}


def default_nlist(count: int) -> int:
    """About 4·sqrt(N) inverted lists, but no more than the vectors can train."""
    return max(1, min(int(round(4 * math.sqrt(count))), count // MIN_POINTS_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers of IVF-PQ: the largest divisor of ``dim`` up to min(32, dim/8).

    With 8-bit codes that is 16 code bytes for 128-d vectors, 32 for 1280-d, plus FAISS's 8-byte
    id per vector.
    """
    return max(m for m in range(1, max(1, min(32, dim // 8)) + 1) if dim % m == 0)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_2d(vectors), np.float32)


def _numpy_search(index: faiss.Index):
    """FAISS's own numpy search of ``index``: pytorch-metric-learning imports
    faiss.contrib.torch_utils, whose search() drops ``params``; it keeps this one as search_numpy."""
    return getattr(index, "search_numpy", index.search)


def id_positions(held: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position in ``held`` (store ids in any order, each at most once; -1 for a free slot) of each
    of ``ids``, -1 for -1 or an id not held."""
    ids = np.asarray(ids, np.int64)
    top = int(held.max(initial=-1))
    if top < 0:
        return np.full(ids.shape, -1, np.int64)
    if top < 4 * len(held) + 1024:  # store ids are dense: a table lookup beats a binary search
        table = np.full(top + 1, -1, np.int64)
        present = held >= 0
        table[held[present]] = np.flatnonzero(present)
        inside = (ids >= 0) & (ids <= top)
        return np.where(inside, table[np.where(inside, ids, 0)], -1)
    order = np.argsort(held, kind="stable")
    positions = order[np.searchsorted(held[order], ids).clip(0, len(held) - 1)]
    return np.where((ids >= 0) & (held[positions] == ids), positions, -1)


@dataclass
class SearchIndex:
    """A FAISS index over store vectors; ``ids[i]`` is the store id of FAISS entry ``i``."""

    index: faiss.Index
    ids: np.ndarray
    kind: str = "flat"
    params: dict = field(default_factory=dict)  # nlist, m, nprobe / ef_search, refine
    live: np.ndarray | None = None  # bool per entry; None while nothing was removed
    # The exact vectors of store ids (e.g. VectorStore.vector_rows): what IVF-PQ's candidates are
    # re-ranked by; without it the codes' estimates rank them.
    refine_vectors: Callable[[np.ndarray], np.ndarray] | None = None

    # ------------------------------------------------------------- building
    @classmethod
    def exact(cls, ids: np.ndarray, vectors: np.ndarray) -> "SearchIndex":
        vectors = _unit_rows(vectors)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index=index, ids=np.asarray(ids, np.int64).copy())

    @classmethod
    def from_store(cls, store) -> "SearchIndex":
        return cls.exact(*store.load_vectors())

    @classmethod
    def build(cls, kind: str, ids: np.ndarray, vectors: np.ndarray, nlist: int | None = None,
              m: int | None = None, seed: int = 0) -> "SearchIndex":
        """Train (on a seeded sample) and fill an index of ``kind`` with all ``vectors``."""
        if kind not in INDEX_KINDS:
            raise CbirError(f"unknown index kind '{kind}'; choose one of {', '.join(INDEX_KINDS)}")
        vectors = _unit_rows(vectors)
        count, dim = vectors.shape
        for name, value, kinds in (("nlist", nlist, ("ivf", "ivfpq")), ("m", m, ("ivfpq", "hnsw"))):
            if value is not None and kind not in kinds:
                raise CbirError(f"--{name} applies to the {' and '.join(kinds)} indexes, not {kind}")
        if kind == "flat":
            return cls.exact(ids, vectors)
        params: dict = {}
        if kind == "hnsw":
            if m is not None and m < 2:  # FAISS draws node levels with 1/log(M): M=1 crashes it
                raise CbirError(f"--m {m}: an hnsw index needs at least 2 links per node")
            if m is not None and m > HNSW_MAX_NEIGHBOURS:
                raise CbirError(f"--m {m}: an hnsw index takes at most {HNSW_MAX_NEIGHBOURS} links per node "
                                "(16-64 is usual; memory grows with them)")
            params["m"] = m or HNSW_NEIGHBOURS
            index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_BUILD_BREADTH
        else:
            params["nlist"] = nlist or default_nlist(count)
            needed = params["nlist"] * MIN_POINTS_PER_CENTROID // 4
            if count < needed or params["nlist"] < 1:
                smaller = "a smaller --nlist or " if params["nlist"] > 1 else ""
                raise CbirError(f"{count} vectors cannot train {params['nlist']} inverted list(s) (that needs "
                                f"{max(needed, 1)} or more); use {smaller}the flat index")
            if kind == "ivf":
                factory = f"IVF{params['nlist']},Flat"
            else:
                if count < PQ_CENTROIDS:
                    raise CbirError(f"{count} vectors cannot train the 8-bit codes of an ivfpq index (that needs "
                                    f"{PQ_CENTROIDS} or more); use the ivf or flat index")
                params["m"] = m or default_pq_m(dim)
                if dim % params["m"]:
                    raise CbirError(f"--m {params['m']} must divide the vector size {dim}")
                factory = f"IVF{params['nlist']},PQ{params['m']}x8"
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            if kind == "ivfpq":
                index.do_polysemous_training = False  # only for Hamming-filtered search, unused here
                # Fewer than 39·256 vectors still train usable codebooks; FAISS would warn per sub-quantiser.
                index.pq.cp.min_points_per_centroid = 1
            sample = min(count, max(params["nlist"] * TRAINING_POINTS_PER_CENTROID,
                                    PQ_CENTROIDS * MIN_POINTS_PER_CENTROID if kind == "ivfpq" else 0))
            rows = np.random.default_rng(seed).choice(count, sample, replace=False) if sample < count else slice(None)
            index.cp.seed = seed
            index.train(vectors[rows])
        index.add(vectors)
        searcher = cls(index=index, ids=np.asarray(ids, np.int64).copy(), kind=kind, params=params)
        searcher.set_breadth(BREADTHS["hnsw"][2] if kind == "hnsw" else min(8, params.get("nlist", 1)))
        return searcher

    # -------------------------------------------------------------- updates
    @property
    def size(self) -> int:
        """Entries that can be returned (removed ones excluded)."""
        return len(self.ids) if self.live is None else int(self.live.sum())

    def remove(self, ids: np.ndarray) -> None:
        """Never return these store ids again."""
        hit = np.isin(self.ids, np.asarray(ids, np.int64))
        if hit.any():
            if self.live is None:
                self.live = np.ones(len(self.ids), bool)
            self.live[hit] = False

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace, for ids already present) store vectors."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        self.remove(ids)
        self.index.add(_unit_rows(vectors))
        self.ids = np.concatenate([self.ids, ids])
        if self.live is not None:
            self.live = np.concatenate([self.live, np.ones(len(ids), bool)])

    # --------------------------------------------------------------- search
    @property
    def breadth(self) -> int:
        """How much of the index a search visits: nprobe (IVF), efSearch (HNSW); 0 for flat."""
        return int(self.params.get("nprobe", self.params.get("ef_search", 0)))

    def set_breadth(self, breadth: int) -> None:
        if self.kind == "hnsw":
            self.params["ef_search"] = int(breadth)
        elif self.kind in ("ivf", "ivfpq"):
            self.params["nprobe"] = int(min(breadth, self.params["nlist"]))

    def _search_parameters(self, k: int, breadth: int, kind: str | None = None, mask: np.ndarray | None = None):
        selector = None
        kind = kind or self.kind
        mask = self.live if mask is None else mask
        if mask is not None:
            self._bitmap = np.packbits(mask, bitorder="little")  # kept alive during the search
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(self._bitmap))
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(breadth, k))
        if kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=selector, nprobe=breadth)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def search(self, queries: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, store ids), each (n, k) best first; missing neighbours have id -1.

        ``among``: store ids to search among only (a filter inside FAISS's search, an
        ``IDSelector``: k results wherever k of them are held, never a post-filter that returns
        fewer). An IVF-PQ index with ``refine_vectors`` takes ``refine`` times ``k`` candidates and
        keeps the ``k`` most similar by their exact vectors.
        """
        queries = _unit_rows(queries)
        mask = None
        if among is not None:
            mask = np.isin(self.ids, among)
            if self.live is not None:
                mask &= self.live
        factor = self.params.get("refine", 1) if self.refine_vectors is not None else 1
        if factor == 1:
            return self._candidates(queries, k, mask)
        scores, ids = self._candidates(queries, k * factor, mask)
        found = ids >= 0
        unique, where = np.unique(ids[found], return_inverse=True)
        vectors = self.refine_vectors(unique)[where]
        # Missing candidates keep FAISS's padding score, below any similarity.
        scores[found] = np.einsum("ij,ij->i", np.repeat(queries, found.sum(axis=1), axis=0), vectors)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)

    def _candidates(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` as the index itself ranks (IVF-PQ by its codes' estimates).

        An IVF search returns only what its ``nprobe`` lists hold: a row short of ``k`` (more
        neighbours asked for than the tuned breadth reaches, e.g. 500 where 4 of 92 lists hold
        about 160) is searched again with twice the lists until it is full or every list is probed.
        An HNSW walk skips removed entries but still spends its breadth on them: with 99 % of
        20,000 vectors removed, efSearch 1024 found 9 of 100 neighbours. A row it leaves short is
        searched exactly over the graph's own vectors instead.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = max(1, min(k, self.size))  # FAISS needs k >= 1 even where the index is empty
        breadth = self.breadth
        available = min(k, self.size if mask is None else int(mask.sum()))
        scores, positions = _numpy_search(self.index)(queries, k, params=self._search_parameters(k, breadth, mask=mask))
        short = (positions >= 0).sum(axis=1) < available
        while short.any() and self.kind in ("ivf", "ivfpq") and breadth < self.params["nlist"]:
            breadth = min(2 * breadth, self.params["nlist"])
            scores[short], positions[short] = _numpy_search(self.index)(
                queries[short], k, params=self._search_parameters(k, breadth, mask=mask))
            short[short] = (positions[short] >= 0).sum(axis=1) < available
        if short.any() and self.kind == "hnsw":
            scores[short], positions[short] = _numpy_search(faiss.downcast_index(self.index.storage))(
                queries[short], k, params=self._search_parameters(k, breadth, kind="flat", mask=mask))
        ids = np.full(positions.shape, -1, np.int64)
        found = positions >= 0
        ids[found] = self.ids[positions[found]]
        return scores, ids

    def similarities(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Similarity of ``queries[i]`` to the stored vector of each id in ``ids[i]`` (-inf for ids not
        held); exact where the index keeps its vectors uncompressed (flat, hnsw)."""
        queries = _unit_rows(queries)
        vectors, held = self._held_vectors(ids.ravel())
        scores = np.einsum("ij,ij->i", np.repeat(queries, ids.shape[1], axis=0), vectors)
        return np.where(held, scores, -np.inf).astype(np.float32).reshape(ids.shape)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The vector of each of ``ids`` as the index holds it (exact for flat and hnsw); zeros for an
        id not held. With the signature of ``refine_vectors``."""
        return self._held_vectors(ids)[0]

    def _held_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vector of each id, zeros where not held; whether it is held)."""
        # A replaced or removed entry keeps its id in self.ids; only the live one is the stored vector.
        positions = id_positions(self.ids if self.live is None else np.where(self.live, self.ids, -1), ids)
        held = positions >= 0
        vectors = np.zeros((len(positions), self.index.d), np.float32)
        if held.any():
            vectors[held] = self.index.reconstruct_batch(positions[held])
        return vectors, held

    def search_excluding(self, queries: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search`, with ``exclude[i]`` (e.g. the query's own id) never in row i."""
        scores, ids = self.search(queries, k + 1)
        keep = ids != np.asarray(exclude, np.int64)[:, None]
        # Rows where the excluded id was not found drop their last result instead.
        keep[keep.all(axis=1), -1] = False
        width = keep.shape[1] - 1
        return scores[keep].reshape(-1, width), ids[keep].reshape(-1, width)

    # -------------------------------------------------------------- storage
    def to_bytes(self) -> memoryview:
        """FAISS's serialisation of a freshly built index, and its ids as a bitmap (1 bit per id).

        A fresh build holds the store's ids in ascending order with gaps where images were
        removed; the bitmap costs 1/8 byte per id instead of 8.
        """
        if self.live is not None or (len(self.ids) > 1 and (np.diff(self.ids) <= 0).any()):
            raise ValueError("only a freshly built index (ascending ids, nothing removed) is saved")
        members = np.zeros(int(self.ids[-1]) + 1 if len(self.ids) else 0, bool)
        members[self.ids] = True
        buffer = io.BytesIO()
        np.savez(buffer, index=faiss.serialize_index(self.index), ids=np.packbits(members), count=len(members))
        return buffer.getbuffer()  # no copy of what may be gigabytes

    @classmethod
    def from_bytes(cls, blob: bytes, kind: str, params: dict) -> "SearchIndex":
        with np.load(io.BytesIO(blob)) as arrays:
            index = faiss.deserialize_index(arrays["index"])
            members = np.unpackbits(arrays["ids"], count=int(arrays["count"])).astype(bool)
        return cls(index=index, ids=np.flatnonzero(members).astype(np.int64), kind=kind, params=dict(params))


