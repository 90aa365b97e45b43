"""Accuracy reports: a terminal table, an Excel workbook (openpyxl) and JSON.

Workbook layout: ``summary`` (one row per protocol run, appended run after run), one sheet per
protocol run (its rows: steps, classes or repeats), and ``config`` (one row per run: database,
model fingerprint, dataset, seed, date, versions). Running again with another ``--name``
appends sheets to the same workbook; an existing sheet name gets a numbered suffix.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from openpyxl import Workbook, load_workbook
from openpyxl.styles import Font
from openpyxl.utils import get_column_letter

from cbir.errors import CbirError
from cbir.evaluation.metrics import confusion
from cbir.evaluation.protocols import ProtocolResult
from cbir.files import write_text, written_whole
from cbir.viz import plots

SUMMARY_COLUMNS = ["date", "sheet", "measure", "database", "queries", "top1", "top5", "majority5",
                   "project_top1", "similar_top1", "precision5", "precision10", "map_at_r"]
TABLE_COLUMNS = ["queries", "top1", "top5", "majority5", "precision5", "map_at_r"]
MAX_SHEET_NAME = 31  # Excel's limit


def metric_columns(rows: Sequence[dict], first: Sequence[str]) -> list[str]:
    """The describing columns, then every metric, in first-seen order."""
    seen = list(first)
    for row in rows:
        seen += [key for key in row if key not in seen]
    return seen


def _cell(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


MAX_CELL = 40  # characters of a cell in the terminal table: a long class name does not push the rest away


def format_table(result: ProtocolResult) -> str:
    """The protocol's rows with the headline metrics (kNN accuracies included)."""
    rows = result.rows
    knn = [k for k in rows[0] if k.startswith("knn") and k.endswith("_accuracy") and "balanced" not in k]
    if "top1" in rows[0]:
        columns = list(result.columns_first) + TABLE_COLUMNS + knn
    else:
        columns = metric_columns(rows, result.columns_first)

    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        text = f"{value:.3f}" if isinstance(value, float) and column not in ("removed_fraction",) else str(value)
        return text[:MAX_CELL]

    table = [[cell(row, column) for column in columns] for row in rows]
    widths = [max(len(column), 8, *(len(line[i]) for line in table)) for i, column in enumerate(columns)]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in [columns, *table])


def _unique_sheet(workbook: Workbook, wanted: str) -> str:
    base = "".join(c if c not in "[]:*?/\\" else "_" for c in wanted)[:MAX_SHEET_NAME] or "run"
    name, number = base, 2
    while name in workbook.sheetnames:
        suffix = f"_{number}"
        name, number = base[: MAX_SHEET_NAME - len(suffix)] + suffix, number + 1
    return name


def _append_row(sheet, header: list[str], row: dict) -> None:
    """Append ``row`` under the sheet's header, adding header cells for new keys."""
    for key in row:
        if key not in header:
            header.append(key)
            sheet.cell(row=1, column=len(header), value=key).font = Font(bold=True)
    _append_values(sheet, [_cell(row.get(key)) for key in header])


def _append_values(sheet, values: list) -> None:
    """Append a row; text that looks like a formula (a class folder named "=1+1", a path) stays text,
    so that opening the workbook runs nothing."""
    sheet.append(values)
    for cell in sheet[sheet.max_row]:
        if cell.data_type == "f":
            cell.data_type = "s"


def _header(sheet) -> list[str]:
    return [cell.value for cell in sheet[1] if cell.value is not None] if sheet.max_row >= 1 else []


def _sheet_with_header(workbook: Workbook, title: str, columns: list[str]):
    if title in workbook.sheetnames:
        sheet = workbook[title]
        return sheet, _header(sheet)
    sheet = workbook.create_sheet(title)
    sheet.append(columns)
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = "A2"
    return sheet, list(columns)


def open_workbook(path: str | Path) -> Workbook:
    """The workbook at ``path`` to extend, or a new one if there is none. Opened before the
    protocols run, so a file that is no workbook costs no evaluation."""
    path = Path(path)
    if not path.exists():
        workbook = Workbook()
        workbook.remove(workbook.active)
        return workbook
    try:
        return load_workbook(path)
    except Exception as exc:  # openpyxl raises what its zip and XML readers meet first
        raise CbirError(f"{path}: not an Excel workbook that can be extended ({type(exc).__name__}: {exc}); "
                        "give another --excel-path or move the file away") from exc


def write_workbook(path: str | Path, results: Sequence[ProtocolResult], config: dict,
                   name: str | None = None, workbook: Workbook | None = None) -> list[str]:
    """Add the results (and a config row) to the workbook at ``path`` (or to ``workbook``, opened
    from there by :func:`open_workbook`) and save it there; returns the new sheet names."""
    path = Path(path)
    workbook = open_workbook(path) if workbook is None else workbook
    summary, summary_header = _sheet_with_header(workbook, "summary", SUMMARY_COLUMNS)
    created = []
    for result in results:
        wanted = f"{name}_{result.measure}" if name and len(results) > 1 else (name or result.measure)
        title = _unique_sheet(workbook, wanted)
        columns = metric_columns(result.rows, result.columns_first)
        sheet, _ = _sheet_with_header(workbook, title, columns)
        for row in result.rows:
            _append_values(sheet, [_cell(row.get(c)) for c in columns])
        for number, column in enumerate(columns, 1):
            sheet.column_dimensions[get_column_letter(number)].width = max(10, min(28, len(column) + 2))
        created.append(title)
        _append_row(summary, summary_header, {"date": config.get("date"), "sheet": title, "measure": result.measure,
                                              "database": config.get("database"),
                                              **{k: v for k, v in result.summary.items() if k not in result.columns_first
                                                 or k == "queries"}})
    settings, settings_header = _sheet_with_header(workbook, "config", ["sheets"] + list(config))
    _append_row(settings, settings_header, {"sheets": ", ".join(created), **config})
    with written_whole(path) as partial:
        workbook.save(partial)
    return created


def write_json(path: str | Path, results: Sequence[ProtocolResult], config: dict) -> None:
    clean = lambda rows: [{k: _cell(v) for k, v in row.items()} for row in rows]  # noqa: E731  (NaN -> null)
    payload = {"config": config,
               "results": {r.measure: clean(r.rows) if len(r.rows) > 1 else clean(r.rows)[0] for r in results}}
    write_text(path, json.dumps(payload, indent=2, default=str))


def save_figures(results: Sequence[ProtocolResult], directory: str | Path, stem: str) -> list[Path]:
    """Confusion matrices (top-1 and majority@5 vote) of ranked protocols; curves of stepped ones."""
    directory = Path(directory)
    saved = []
    for result in results:
        if result.curve:
            x, ys = result.curve
            path = directory / f"{stem}_{result.measure}_curve.png"
            series = {metric: [row[metric] for row in result.rows] for metric in ys}
            with plots.figure(path, width=5.5) as axes:
                plots.curves(axes[0, 0], [row[x] for row in result.rows], series,
                             f"{result.measure}: accuracy by {x.replace('_', ' ')}", x.replace("_", " "), "accuracy")
            saved.append(path)
        elif result.ranking is not None and result.measure in ("all", "loo", "remove", "random"):
            path = directory / f"{stem}_{result.measure}_confusion.png"
            with plots.figure(path, columns=2, width=4.6, height=4.2) as axes:
                for ax, how, title in zip(axes[0], ("top1", "majority"), ("first neighbour", "5-neighbour vote")):
                    classes, matrix = confusion(result.ranking, how)
                    plots.confusion_matrix(ax, classes, matrix, f"{result.measure}: {title}")
            saved.append(path)
    return saved
