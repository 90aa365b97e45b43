"""Pictures made of images: retrieval rows (PNG and HTML) and per-class sample grids.

Charts without dataset images are in :mod:`cbir.viz.plots`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cbir.errors import CbirError  # noqa: E402
from cbir.files import write_text  # noqa: E402
from cbir.images.sources import ImageItem  # noqa: E402
from cbir.options import PICTURE_COLUMNS, PICTURE_ROWS  # noqa: E402
from cbir.pipeline.retrieve import Retrieval  # noqa: E402

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


def save_retrieval_grid(retrievals: Sequence[Retrieval], path: str | Path, max_rows: int = PICTURE_ROWS,
                        max_neighbours: int = PICTURE_COLUMNS) -> Path:
    """One row per query, the first ``max_rows``: the query, then its first ``max_neighbours``
    neighbours (green frame: same label, red: not)."""
    retrievals = retrievals[:max_rows]
    columns = 1 + min(max_neighbours, max(len(r.neighbours) for r in retrievals))
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
    return _save(figure, path)


def save_class_samples(items: Sequence[ImageItem], path: str | Path, per_class: int = 6, seed: int = 0) -> Path:
    """A grid of ``per_class`` random images (seeded) for each class: one row per class."""
    import random

    by_class: dict[str, list[ImageItem]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    if not by_class:
        raise CbirError("no images to show")
    rng = random.Random(seed)
    rows = sorted(by_class)
    per_class = min(per_class, max(len(members) for members in by_class.values()))  # no empty columns
    figure, axes = plt.subplots(len(rows), per_class, figsize=(1.6 * per_class, 1.8 * len(rows)), squeeze=False)
    for axis_row, label in zip(axes, rows):
        chosen = rng.sample(by_class[label], min(per_class, len(by_class[label])))
        for column, ax in enumerate(axis_row):
            if column < len(chosen):
                _panel(ax, _pixels(chosen[column].location), "", NEUTRAL)
            else:
                ax.axis("off")
        axis_row[0].set_ylabel(f"{label[:16]}\n({len(by_class[label])})", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _data_uri(pixels: np.ndarray | None, side: int = 160) -> str:
    import base64
    import io

    from PIL import Image

    if pixels is None:
        return ""
    image = Image.fromarray(pixels)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def save_retrieval_html(retrievals: Sequence[Retrieval], path: str | Path, title: str = "Retrieval") -> Path:
    """Every query's row of :func:`save_retrieval_grid` on one self-contained HTML page (images embedded)."""
    from html import escape

    def cell(pixels, caption: str, colour: str) -> str:
        uri = _data_uri(pixels)
        image = f'<img src="{uri}" alt="{escape(caption)}">' if uri else "<div class=missing>image not available</div>"
        return f'<figure style="border-color:{colour}">{image}<figcaption>{escape(caption)}</figcaption></figure>'

    rows = []
    for retrieval in retrievals:
        cells = [cell(_pixels(retrieval.location), f"query: {retrieval.query} ({retrieval.query_label or '?'})", "#1565c0")]
        for n in retrieval.neighbours:
            colour = NEUTRAL if retrieval.query_label is None else MATCH if n.label == retrieval.query_label else MISMATCH
            cells.append(cell(_pixels(n.source), f"#{n.rank} {n.label} · {n.score:.3f} · {n.name}", colour))
        vote = f"vote: {escape(retrieval.vote_summary())}"
        rows.append(f'<section><h2>{escape(retrieval.query)}</h2><p>{vote}</p><div class=row>{"".join(cells)}</div></section>')
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .row{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;border:4px solid;padding:4px;width:170px}} img{{max-width:160px;display:block;margin:auto}}
figcaption{{font-size:11px;word-break:break-all}} .missing{{height:120px;background:#eee;font-size:11px}}
h2{{font-size:15px;margin-bottom:2px}}</style></head><body><h1>{escape(title)}</h1>
<p>Green frame: same label as the query; red: another label.</p>{"".join(rows)}</body></html>"""
    write_text(path, page)
    return Path(path)
