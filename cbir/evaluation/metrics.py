"""Retrieval and kNN classification metrics of a ranking: top-k hit rates, precision@k, mAP@R, votes."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

from cbir.errors import CbirError
from cbir.options import VOTES

if TYPE_CHECKING:  # a ranking is what metrics are of; ranking.py needs average_precision_at_r
    from cbir.evaluation.ranking import Ranking


def average_precision_at_r(hits: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row: (1/R) · sum over ranks i <= R of precision@i where rank i is a hit; NaN where R = 0.

    R is cut to the ranking's depth (``MAP_DEPTH_LIMIT`` for huge classes)."""
    relevant = np.minimum(relevant, hits.shape[1])
    ranks = np.arange(1, hits.shape[1] + 1)
    hits = hits & (ranks <= relevant[:, None])
    precision = np.cumsum(hits, axis=1) / ranks
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(relevant > 0, (precision * hits).sum(axis=1) / relevant, np.nan)


# ---------------------------------------------------------------- metrics
def hit_rates(query_values: np.ndarray, neighbour_values: np.ndarray, prefix: str = "") -> dict[str, float]:
    """top-1, top-5 and majority@5 (at least 3 of 5) of ``neighbour_values`` matching the query's."""
    hits = neighbour_values[:, :5] == query_values[:, None]
    return {f"{prefix}top1": float(hits[:, 0].mean()), f"{prefix}top5": float(hits.any(axis=1).mean()),
            f"{prefix}majority5": float((hits.sum(axis=1) >= 3).mean())}


def precision_at(query_labels: np.ndarray, neighbour_labels: np.ndarray, k: int) -> float:
    return float((neighbour_labels[:, :k] == query_labels[:, None]).mean())


def knn_predict(neighbour_labels: np.ndarray, scores: np.ndarray, k: int, vote: str = "majority",
                temperature: float = 0.07) -> np.ndarray:
    """The class each query's first ``k`` neighbours vote for.

    majority: one vote each, ties to the larger summed similarity; distance: votes weighted by
    similarity; softmax: by exp(similarity / temperature).
    """
    if vote not in VOTES:
        raise CbirError(f"unknown vote '{vote}'; choose one of {', '.join(VOTES)}")
    labels = neighbour_labels[:, :k]
    similarity = np.nan_to_num(scores[:, :k].astype(np.float64), nan=0.0)
    present = labels != None  # noqa: E711  (object array: elementwise comparison)
    if vote == "majority":
        weights = 1.0 + 1e-6 * similarity  # similarity only breaks ties
    elif vote == "distance":
        weights = np.maximum(similarity, 0.0) + 1e-12
    else:
        weights = np.exp((similarity - similarity.max(axis=1, keepdims=True)) / temperature)
    weights = np.where(present, weights, 0.0)
    classes = np.array(sorted({label for label in labels[present]}), dtype=object)
    if not len(classes):
        return np.full(len(labels), None, dtype=object)
    tally = np.zeros((len(labels), len(classes)))
    codes = np.searchsorted(classes, np.where(present, labels, classes[0]).astype(str).astype(object))
    np.add.at(tally, (np.repeat(np.arange(len(labels)), labels.shape[1]), codes.ravel()), weights.ravel())
    return classes[tally.argmax(axis=1)]


@dataclass
class EvaluationSettings:
    ks: Sequence[int] = (1, 5, 11)  # kNN classification neighbours
    vote: str = "majority"
    temperature: float = 0.07
    project_groups: dict[str, str] | None = None  # project -> group, for "similar project" hits


def metrics(ranking: Ranking, settings: EvaluationSettings) -> dict[str, float]:
    """Every metric of one set of queries (see the module docstring)."""
    queries, support = ranking.queries, ranking.support
    n = len(queries)
    if n == 0:
        raise CbirError("no queries to evaluate")
    labels = ranking.neighbour(support.labels)
    out: dict[str, float] = {"queries": n}
    out.update(hit_rates(queries.labels, labels))
    out.update(hit_rates(queries.projects, ranking.neighbour(support.projects), "project_"))
    if settings.project_groups:
        group = np.vectorize(lambda p: settings.project_groups.get(p, p), otypes=[object])
        out.update(hit_rates(group(queries.projects), group(ranking.neighbour(support.projects)), "similar_"))
    out["precision5"] = precision_at(queries.labels, labels, 5)
    out["precision10"] = precision_at(queries.labels, labels, 10)
    precisions = ranking.average_precision
    if precisions is None:
        raise ValueError("mAP@R needs a ranking with average precisions (rank_all)")
    out["map_at_r"] = float(np.nanmean(precisions)) if np.isfinite(precisions).any() else float("nan")
    truth = queries.labels.astype(str)
    for k in settings.ks:
        predicted = knn_predict(labels, ranking.scores, k, settings.vote, settings.temperature).astype(str)
        out[f"knn{k}_accuracy"] = float((predicted == truth).mean())
        with _one_class_allowed():  # a per-class row: the recall of that class
            out[f"knn{k}_balanced_accuracy"] = float(balanced_accuracy_score(truth, predicted))
        out[f"knn{k}_macro_f1"] = float(f1_score(truth, predicted, labels=sorted(set(truth)), average="macro",
                                                 zero_division=0))
    out["model_ms"] = 1000 * queries.model_seconds / n
    out["search_ms"] = 1000 * ranking.search_seconds / n
    out["transfer_ms"] = 1000 * ranking.transfer_seconds / n
    return out


def confusion(ranking: Ranking, how: str = "top1") -> tuple[list[str], np.ndarray]:
    """(classes, matrix) of true class (rows) against the first neighbour's or the 5-vote's class."""
    labels = ranking.neighbour(ranking.support.labels)
    if how == "top1":
        predicted = labels[:, 0]
    else:
        predicted = knn_predict(labels, ranking.scores, 5)
    truth = ranking.queries.labels.astype(str)
    predicted = np.where(predicted == None, "(none)", predicted).astype(str)  # noqa: E711
    classes = sorted(set(truth) | set(predicted))
    with _one_class_allowed():  # a one-class database was warned about once already
        return classes, confusion_matrix(truth, predicted, labels=classes)


@contextlib.contextmanager
def _one_class_allowed():
    """Quiet scikit-learn's warnings about one class (a 1 x 1 matrix, predictions of other classes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"sklearn\.")
        yield


def knn_probabilities(neighbour_labels: np.ndarray, scores: np.ndarray, k: int, classes: Sequence[str],
                      temperature: float) -> np.ndarray:
    """(n, classes) class distribution of the first ``k`` neighbours, weighted by exp(similarity / T)."""
    labels = neighbour_labels[:, :k]
    similarity = np.nan_to_num(scores[:, :k].astype(np.float64), nan=-np.inf)
    weights = np.exp((similarity - np.nanmax(np.where(np.isfinite(similarity), similarity, np.nan), axis=1,
                                                 keepdims=True)) / temperature)
    weights = np.nan_to_num(weights)
    probabilities = np.zeros((len(labels), len(classes)))
    for column, label in enumerate(classes):
        probabilities[:, column] = (weights * (labels == label)).sum(axis=1)
    return probabilities / np.maximum(probabilities.sum(axis=1, keepdims=True), 1e-12)

