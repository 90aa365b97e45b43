"""Pictures of a database and of a dataset: t-SNE of stored vectors, class counts, sizes, intensities.

Charts go through :mod:`cbir.viz.plots` (one style); grids of images through :mod:`cbir.viz.pictures`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from cbir.errors import CbirError
from cbir.images.sources import ImageItem
from cbir.options import MIN_TSNE_POINTS
from cbir.store.database import VectorStore
from cbir.viz import plots

PCA_DIMS = 50  # t-SNE on 50 principal components: the usual speed-up, little change in the picture


@dataclass
class Picture:
    path: Path
    panels: int
    points: int = 0


def stratified_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Row numbers of at most ``limit`` rows, each class keeping its share (at least one), seeded."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels.astype(str), return_counts=True)
    shares = counts * limit / len(labels)
    quota = np.maximum(1, np.floor(shares)).astype(int)
    # Rows left by rounding down go to the largest remainders, so the sample is ``limit`` rows.
    left = max(0, limit - int(quota.sum()))
    quota[np.argsort(quota - shares, kind="stable")[:left]] += 1
    rows = [rng.choice(np.flatnonzero(labels.astype(str) == c), q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(rows))


def tsne_2d(vectors: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of ``vectors`` after PCA to at most 50 dimensions."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if len(vectors) < MIN_TSNE_POINTS:
        raise CbirError(f"t-SNE needs at least {MIN_TSNE_POINTS} images, got {len(vectors)}")
    reduced = vectors
    if vectors.shape[1] > PCA_DIMS and len(vectors) > PCA_DIMS:
        reduced = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(vectors)
    perplexity = min(perplexity, (len(vectors) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def save_tsne(store: VectorStore, path: str | Path, perplexity: float = 30.0, max_points: int = 5000,
              by_project: bool = False, seed: int = 0) -> Picture:
    """The database's vectors in 2-D coloured by class (and, optionally, a panel by project)."""
    ids, vectors, records = store.load_with_records()
    if len(ids) < MIN_TSNE_POINTS:
        raise CbirError(f"t-SNE needs at least {MIN_TSNE_POINTS} images, database '{store.name}' holds {len(ids)}")
    labels = np.array([r.label for r in records], dtype=object)
    rows = stratified_sample(labels, max(max_points, MIN_TSNE_POINTS), seed)
    points = tsne_2d(vectors[rows], perplexity, seed)
    sampled = f"{len(rows):,} of {len(ids):,} images, stratified sample" if len(rows) < len(ids) else f"{len(ids):,} images"
    panels = [("class", labels[rows])]
    if by_project:
        panels.append(("project", np.array([records[i].project for i in rows.tolist()], dtype=object)))
    with plots.figure(path, columns=len(panels), width=6.0, height=5.2) as axes:
        for ax, (what, values) in zip(axes[0], panels):
            plots.scatter(ax, points, values, f"t-SNE of '{store.name}' by {what}\n({sampled})")
    return Picture(Path(path), len(panels), len(rows))


# ------------------------------------------------------------ dataset overview
@dataclass
class DatasetStats:
    labels: list[str]
    widths: np.ndarray
    heights: np.ndarray
    means: np.ndarray  # mean grey intensity per image, 0-255
    failures: list[str]


def dataset_stats(items: Sequence[ImageItem], progress: bool = True) -> DatasetStats:
    labels, widths, heights, means, failures = [], [], [], [], []
    for item in tqdm(items, desc="reading", unit="img", disable=not progress):
        try:
            image, _ = item.read()
        except CbirError as exc:
            failures.append(str(exc))
            continue
        labels.append(item.label)
        widths.append(image.width)
        heights.append(image.height)
        means.append(float(np.asarray(image.convert("L"), dtype=np.float32).mean()))
    if not labels:
        raise CbirError("no image of the dataset could be read")
    return DatasetStats(labels, np.array(widths), np.array(heights), np.array(means), failures)


def save_dataset_charts(stats: DatasetStats, directory: str | Path, name: str) -> list[Picture]:
    """Images per class (bars), image sizes and mean intensities (histograms)."""
    directory = Path(directory)
    counts = Counter(stats.labels)
    classes = sorted(counts)
    saved = []
    path = directory / f"{name}_classes.png"
    with plots.figure(path, width=max(4.5, 0.6 * len(classes) + 2)) as axes:
        plots.bars(axes[0, 0], classes, [counts[c] for c in classes],
                   f"{name}: images per class ({len(stats.labels):,} in all)", "images")
    saved.append(Picture(path, 1))
    path = directory / f"{name}_sizes_intensity.png"
    with plots.figure(path, columns=2, width=4.8) as axes:
        sizes = {"width": stats.widths, "height": stats.heights}
        plots.histograms(axes[0, 0], sizes, f"{name}: image sizes", "pixels")
        per_class = {c: stats.means[np.array(stats.labels) == c] for c in classes}
        plots.histograms(axes[0, 1], per_class, f"{name}: mean grey level per image", "intensity (0-255)")
    saved.append(Picture(path, 2))
    return saved
