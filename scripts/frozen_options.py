"""The image-retrieval field's options on frozen Lite0 vectors, measured on validation splits.

For each set, the ImageNet EfficientNet-Lite0 vectors of the train split are the database and
the val split queries it (exact cosine search, a stored copy of a query never counts). Every row
is one option: pooling and test-time augmentation (model options, `add --pooling --flip`), two
scales, PCA-whitening learned on the database's vectors, alpha-query expansion with and without
database-side augmentation (Radenovic et al. 2018), and k-reciprocal re-ranking (Zhong et al.
2017, `--rerank`). It prints top-1, kNN@11 (majority) and mAP@R: docs/QUALITY.md's frozen-options
table. No test split is read.
Usage: python scripts/frozen_options.py [--data ../shared/data] [--sets breastmnist retinamnist]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np

from cbir.evaluation.metrics import average_precision_at_r, knn_predict
from cbir.images.sources import npz_items
from cbir.models.factory import create_extractor
from cbir.pipeline.embed import embed_items
from cbir.search.index import SearchIndex
from cbir.search.rerank import KReciprocal, rerank_distances

SIZE = 128  # the base input size, as the quality table's MedMNIST rows
QE_NEIGHBOURS, QE_ALPHA = 2, 3.0  # the best settings of "Revisiting Oxford and Paris" for alpha-QE
SHRINK = 0.1  # PCA-whitening's eigenvalues shrunk by this share of the largest


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class SplitVectors:
    """Vectors, labels and content hashes of one split, per extractor setting, embedded once each."""

    def __init__(self, npz: Path, split: str):
        self.items = npz_items(npz, split)
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def get(self, size: int = SIZE, pooling: str = "avg", flip: bool = False):
        key = (size, pooling, flip)
        if key not in self._cache:
            extractor = create_extractor(input_size=size, pooling=pooling, flip=flip).for_inference()
            vectors, decoded = embed_items(self.items, extractor)
            labels = np.array([self.items[p].label for p in decoded.positions], dtype=object)
            self._cache[key] = (vectors, labels, np.array(decoded.sha256, dtype=object))
        return self._cache[key]


def scores_of(queries: np.ndarray, database: np.ndarray, copies: np.ndarray) -> np.ndarray:
    scores = queries @ database.T
    scores[copies] = -np.inf
    return scores


def measured(order: np.ndarray, scores: np.ndarray, query_labels: np.ndarray, labels: np.ndarray,
             copies: np.ndarray) -> tuple[float, float, float]:
    """(top-1, kNN@11, mAP@R) of a full ranking of the database per query; the query's copies
    (``copies``: query x database) are neither hits, nor relevant, nor voters."""
    copy_ranked = np.take_along_axis(copies, order, axis=1)
    neighbour_labels = np.where(copy_ranked, None, labels[order])
    hits = neighbour_labels == query_labels[:, None]
    relevant = ((labels[None, :] == query_labels[:, None]) & ~copies).sum(axis=1)
    top_scores = np.take_along_axis(scores, order[:, :11], axis=1)
    knn = knn_predict(neighbour_labels[:, :11], top_scores, 11)
    return (float(hits[:, 0].mean()), float((knn == query_labels).mean()),
            float(np.nanmean(average_precision_at_r(hits, relevant))))


def by_scores(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def whitening(database: np.ndarray, dims: int | None, shrink: float) -> Callable[[np.ndarray], np.ndarray]:
    """PCA-whitening learned on the database's vectors: to ``dims`` components (all where None),
    each eigenvalue raised by ``shrink`` times the largest; re-normalised."""
    mean = database.mean(axis=0)
    _, singular, components = np.linalg.svd(database - mean, full_matrices=False)
    eigenvalues = singular ** 2 / len(database)
    kept = eigenvalues > 1e-9 * eigenvalues[0]
    if dims is not None:
        kept[dims:] = False
    scale = 1 / np.sqrt(eigenvalues[kept] + shrink * eigenvalues[0])
    return lambda vectors: unit((vectors - mean) @ components[kept].T * scale)


def expanded(vectors: np.ndarray, database: np.ndarray, copies: np.ndarray | None) -> np.ndarray:
    """alpha-query expansion: each vector plus its QE_NEIGHBOURS nearest database vectors, weighted
    by similarity ** QE_ALPHA (a database vector expanded so leaves itself out: ``copies``)."""
    scores = vectors @ database.T
    if copies is not None:
        scores[copies] = -np.inf
    nearest = by_scores(scores)[:, :QE_NEIGHBOURS]
    weights = np.maximum(np.take_along_axis(scores, nearest, axis=1), 0) ** QE_ALPHA
    return unit(vectors + np.einsum("qn,qnd->qd", weights, database[nearest]))


def rows_of_set(npz: Path) -> list[tuple[str, tuple[float, float, float]]]:
    train, val = SplitVectors(npz, "train"), SplitVectors(npz, "val")

    def plain(**setting):
        database, labels, hashes = train.get(**setting)
        queries, query_labels, query_hashes = val.get(**setting)
        copies = query_hashes[:, None] == hashes[None, :]
        return database, labels, queries, query_labels, copies

    def ranked(database, labels, queries, query_labels, copies):
        scores = scores_of(queries, database, copies)
        return measured(by_scores(scores), scores, query_labels, labels, copies)

    rows = [("base (128 px, average pooling)", ranked(*plain())),
            ("224 px (Lite0's own size)", ranked(*plain(size=224))),
            ("mirror-image TTA", ranked(*plain(flip=True))),
            ("GeM pooling (p = 3)", ranked(*plain(pooling="gem"))),
            ("GeM + mirror TTA", ranked(*plain(pooling="gem", flip=True)))]
    small, labels, small_queries, query_labels, copies = plain(flip=True)
    large, _, large_queries, _, _ = plain(size=224, flip=True)
    rows.append(("two scales (128 + 224 px) + mirror TTA",
                 ranked(unit(small + large), labels, unit(small_queries + large_queries), query_labels, copies)))
    for name, dims, shrink in (("all dims", None, 0.0), ("256-d, shrunk", 256, SHRINK), ("128-d, shrunk", 128, SHRINK)):
        white = whitening(small, dims, shrink)
        rows.append((f"PCA-whitening, {name}, + mirror TTA",
                     ranked(white(small), labels, white(small_queries), query_labels, copies)))
    rows.append((f"alpha-QE ({QE_NEIGHBOURS} neighbours, alpha {QE_ALPHA:g}) + mirror TTA",
                 ranked(small, labels, expanded(small_queries, small, None), query_labels, copies)))
    augmented = expanded(small, small, np.eye(len(small), dtype=bool))
    rows.append(("database-side augmentation + alpha-QE + mirror TTA",
                 ranked(augmented, labels, expanded(small_queries, augmented, None), query_labels, copies)))
    database, labels, queries, query_labels, copies = plain()
    scores = scores_of(queries, database, copies)
    whole = [np.flatnonzero(~copy)[np.argsort(rerank_distances(query, database[~copy]), kind="stable")]
             for query, copy in zip(queries, copies)]
    rows.append(("k-reciprocal re-ranking, whole database",
                 measured(_with_copies_last(whole, copies), scores, query_labels, labels, copies)))
    index = SearchIndex.exact(np.arange(len(database)), database)
    searcher = KReciprocal(index, index.vectors_of)
    pooled = [searcher.search(query[None], len(database), np.flatnonzero(~copy))[1][0]
              for query, copy in zip(queries, copies)]
    rows.append(("k-reciprocal re-ranking, 100 candidates per query (`--rerank`)",
                 measured(_with_copies_last(pooled, copies), scores, query_labels, labels, copies)))
    return rows


def _with_copies_last(orders: list[np.ndarray], copies: np.ndarray) -> np.ndarray:
    """Rankings of the database without the query's copies, completed by them (they never count)."""
    return np.array([np.concatenate([order[order >= 0], np.flatnonzero(copy)]) for order, copy in zip(orders, copies)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--sets", nargs="+", default=["breastmnist", "retinamnist"])
    args = parser.parse_args()
    results = {name: rows_of_set(args.data / f"{name}.npz") for name in args.sets}
    header = "| option | " + " | ".join(f"{name} top-1 | kNN@11 | mAP@R" for name in args.sets) + " |"
    print(header)
    print("|" + "---|" * (1 + 3 * len(args.sets)))
    for position, (option, _) in enumerate(results[args.sets[0]]):
        cells = [f"{value:.3f}" for name in args.sets for value in results[name][position][1]]
        print(f"| {option} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
