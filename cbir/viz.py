"""Pictures of retrievals: the query and its neighbours, titled with labels and similarities."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import ImageItem  # noqa: E402
from .errors import CbirError  # noqa: E402
from .retrieval import Retrieval  # noqa: E402

MATCH, MISMATCH, NEUTRAL = "#2e7d32", "#c62828", "#9e9e9e"


def _pixels(location: str) -> np.ndarray | None:
    """The image at a record's source, or None when it is no longer there."""
    if not location:
        return None
    try:
        image, _ = ImageItem(name="", label="", project="", location=location).read()
    except CbirError:
        return None
    return np.asarray(image)


def _panel(ax, pixels: np.ndarray | None, title: str, colour: str) -> None:
    if pixels is None:
        ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", fontsize=8)
        ax.set_facecolor("#eeeeee")
    else:
        ax.imshow(pixels)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    ax.set_title(title, fontsize=8)


def save_retrieval_grid(retrievals: Sequence[Retrieval], path: str | Path) -> Path:
    """One row per query: the query, then its neighbours (green frame: same label, red: not)."""
    columns = 1 + max(len(r.neighbours) for r in retrievals)
    rows = len(retrievals)
    figure, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.0 * rows), squeeze=False)
    for axis_row, retrieval in zip(axes, retrievals):
        query_title = f"query\n{retrieval.query_label or ''}".rstrip()
        _panel(axis_row[0], _pixels(retrieval.location), query_title, "#1565c0")
        for ax, neighbour in zip(axis_row[1:], retrieval.neighbours):
            if retrieval.query_label is None:
                colour = NEUTRAL
            else:
                colour = MATCH if neighbour.label == retrieval.query_label else MISMATCH
            _panel(ax, _pixels(neighbour.source), f"#{neighbour.rank} {neighbour.label}\n{neighbour.score:.3f}", colour)
        for ax in axis_row[1 + len(retrieval.neighbours):]:
            ax.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
