"""Charts (no dataset images): one style for confusion matrices, curves and bar charts.

Every figure goes through :func:`figure` and :func:`save`, so sizes, fonts and file handling
are the same everywhere; image grids live in :mod:`cbir.viz.pictures`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}
DPI = 120


@contextmanager
def figure(path: str | Path, columns: int = 1, rows: int = 1, width: float = 5.0,
           height: float = 4.0) -> Iterator[np.ndarray]:
    """Axes (rows x columns) of a new figure, written to ``path`` when the block ends."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
        try:
            yield axes
            fig.tight_layout()
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)


def confusion_matrix(ax, classes: Sequence[str], matrix: np.ndarray, title: str) -> None:
    """Counts, coloured by the share of each true class (row)."""
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [str(c)[:18] for c in classes], rotation=45, ha="right")
    ax.set_yticks(ticks, [str(c)[:18] for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if shares[i, j] > 0.6 else "black")


def curves(ax, x: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str,
           ylabel: str) -> None:
    for name, values in series.items():
        ax.plot(x, values, marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)  # never over the curves


def bars(ax, names: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> None:
    positions = np.arange(len(names))
    ax.bar(positions, values, color="#1565c0")
    ax.set_xticks(positions, [str(n)[:18] for n in names], rotation=45 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    for position, value in zip(positions, values):
        ax.annotate(f"{value:g}", (position, value), ha="center", va="bottom", fontsize=7)


def scatter(ax, points: np.ndarray, groups: np.ndarray, title: str) -> None:
    """2-D points coloured by group, with a legend (outside the axes when there are many groups)."""
    names = sorted(set(groups.astype(str).tolist()))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for number, name in enumerate(names):
        mine = groups.astype(str) == name
        ax.scatter(points[mine, 0], points[mine, 1], s=6, alpha=0.7, color=colours(number % colours.N),
                   label=f"{name[:24]} ({int(mine.sum())})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(markerscale=2, loc="best" if len(names) <= 8 else "upper left",
              bbox_to_anchor=None if len(names) <= 8 else (1.0, 1.0), frameon=False)


def histograms(ax, series: dict[str, np.ndarray], title: str, xlabel: str, bins: int = 30) -> None:
    """Overlaid histograms of each series."""
    values = np.concatenate([np.asarray(v, float) for v in series.values()])
    edges = np.histogram_bin_edges(values, bins=bins) if values.min() < values.max() else bins
    for name, data in series.items():
        ax.hist(np.asarray(data, float), bins=edges, alpha=0.55, label=f"{str(name)[:20]} ({len(data)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend()


def training_curves(csv_path: str | Path, path: str | Path) -> Path:
    """Loss and validation metrics per epoch from an extractor's training log (CSV with an epoch column)."""
    import csv

    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "epoch" not in rows[0]:
        raise ValueError(f"{csv_path}: a training log needs an 'epoch' column and at least one row")
    epochs = [float(r["epoch"]) for r in rows]
    numeric = [k for k in rows[0] if k != "epoch" and all(_is_number(r[k]) for r in rows)]
    losses = [k for k in numeric if "loss" in k]
    scores = [k for k in numeric if k not in losses and not k.endswith(("seconds", "lr"))]
    with figure(path, columns=2, width=4.8) as axes:
        curves(axes[0, 0], epochs, {k: [float(r[k]) for r in rows] for k in losses}, "training loss", "epoch", "loss")
        curves(axes[0, 1], epochs, {k: [float(r[k]) for r in rows] for k in scores}, "validation", "epoch", "score")
    return Path(path)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False
