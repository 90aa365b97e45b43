"""`cbir evaluate` (test_accuracy.py): accuracy protocols, into Excel."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cbir import __version__
from cbir.cli.flags import (
    COUNT,
    NON_NEGATIVE,
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    POSITIVE,
    RERANK_HELP,
    WORKBOOK_FILE,
    skipped_summary,
    store_arguments,
)
from cbir.errors import CbirError
from cbir.images.sources import NPZ_SPLITS, load_items
from cbir.options import MEASURES, VOTES, check_protocol_options


def _read_mapping(path: str | None, what: str) -> dict[str, str] | None:
    """A two-column CSV (key,value; a header line is allowed) as a dict."""
    import csv

    if not path:
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except OSError as exc:
        raise CbirError(f"{path}: cannot read the {what} CSV ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:  # a picture or a spreadsheet given for the CSV
        raise CbirError(f"{path}: the {what} CSV is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except csv.Error as exc:
        raise CbirError(f"{path}: the {what} CSV cannot be parsed ({exc})") from exc
    if not rows or any(len(row) < 2 for row in rows):
        raise CbirError(f"{path}: the {what} CSV needs two columns per line")
    return {row[0]: row[1] for row in rows}


def run(args) -> int:
    measures = list(dict.fromkeys(args.measure))
    check_protocol_options(measures, args.exclude_classes, with_queries=bool(args.path))
    items = load_items(args.path, split=args.split) if args.path else None
    from cbir import api

    store = api.open_database(args.db_name, args.redis_url)
    store.require()
    groups = _read_mapping(args.groups, "groups")
    project_groups = _read_mapping(args.project_groups, "project groups")
    # Imported once the flags, files and database are found: torch and timm take seconds to import.

    import faiss
    import torch

    from cbir.evaluation.metrics import EvaluationSettings
    from cbir.evaluation.protocols import ProtocolOptions
    from cbir.evaluation.report import format_table, open_workbook, save_figures, write_json, write_workbook

    options = ProtocolOptions(n_queries=args.n_queries, repeats=args.repeats,
                              exclude_classes=args.exclude_classes, seed=args.seed)
    excel = Path(args.excel_path or Path(args.results_dir) / f"accuracy_{args.db_name}.xlsx")
    workbook = open_workbook(excel)
    settings = EvaluationSettings(ks=args.k, vote=args.vote, temperature=args.temperature,
                                  project_groups=project_groups)
    results, ran = api.evaluate(store, measures, settings, options, items=items, groups=groups, exact=args.exact,
                                rerank=args.rerank, weights=args.weights, device=args.device, progress=not args.quiet)
    what = f"{ran['queries']} queries from {args.path}" if items is not None else "the stored images (leave-one-out)"
    print(f"'{args.db_name}': {ran['support']} stored images, {what}; "
          f"{'exact search' if ran['index'] == 'flat' else ran['index'] + ' index (mAP@R by exact search)'}, "
          f"kNN vote {args.vote}")
    if "interpolate" in measures:
        print("interpolate: head = " + ("the extractor's trained classifier" if ran["head"] else
                                        "a logistic-regression probe fitted on the stored vectors"))
    for result in results:
        print(f"\n{result.measure}")
        print(format_table(result))
    config = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "database": args.db_name,
              "redis": api.where(store), "model": store.model_spec.get("description", ""),
              "fingerprint": store.model, "dataset": str(args.path or "(stored images)"),
              "split": args.split if args.path else "", "index": ran["index"], "k": " ".join(map(str, args.k)),
              "vote": args.vote, "seed": args.seed, "cbir": __version__, "torch": torch.__version__,
              "faiss": faiss.__version__, "numpy": np.__version__}
    sheets = write_workbook(excel, results, config, name=args.name, workbook=workbook)
    print(f"\nexcel: {excel} (sheets {', '.join(sheets)})")
    if not args.no_picture:
        for path in save_figures(results, excel.parent, excel.stem + (f"_{args.name}" if args.name else "")):
            print(f"picture: {path}")
    if args.json:
        write_json(args.json, results, config)
        print(f"json: {args.json}")
    return skipped_summary(ran["failures"])


def register(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="retrieval and kNN accuracy protocols, into Excel",
                                   description="Search the database with labelled query images (or its own "
                                               "images, leave-one-out) and report top-1/top-5/majority@5, "
                                               "precision@k, mAP@R and kNN classification for each protocol; "
                                               "a terminal table, an Excel workbook and pictures.")
    store_arguments(evaluate)
    evaluate.add_argument("--path", default=None,
                          help="query images with labels: a class-per-folder directory or an .npz (see --split); "
                               "not needed for loo, incremental, removal and interpolate (then the stored images "
                               "query the others)")
    evaluate.add_argument("--split", default="test", choices=NPZ_SPLITS, help="split of a .npz (default: test)")
    evaluate.add_argument("--measure", nargs="+", default=["all"], choices=MEASURES,
                          help="protocols: all, weighted (class-balanced), random (one per class in turn), stat "
                               "(random repeated), separated (per class), remove (--exclude-classes left out), "
                               "loo, incremental (continual learning), removal (data deletion), interpolate "
                               "(classifier head + kNN probabilities, λ chosen on validation); default: all")
    evaluate.add_argument("--k", nargs="+", type=COUNT, default=[1, 5, 11], help="kNN classification k (default: 1 5 11)")
    evaluate.add_argument("--vote", default="majority", choices=VOTES,
                          help="kNN vote: majority, distance (similarity-weighted) or softmax (temperature)")
    evaluate.add_argument("--temperature", type=POSITIVE, default=0.07, help="softmax vote temperature (default: 0.07)")
    evaluate.add_argument("--n-queries", type=COUNT, default=100, help="queries of random/stat (default: 100)")
    evaluate.add_argument("--repeats", type=COUNT, default=10, help="repeats of stat (default: 10)")
    evaluate.add_argument("--exclude-classes", nargs="+", default=[], help="classes the remove protocol leaves out")
    evaluate.add_argument("--groups", default=None,
                          help="CSV name,group (patient or slide id): neighbours from a query's own group are skipped")
    evaluate.add_argument("--project-groups", default=None,
                          help="CSV project,group: 'similar project' hits count neighbours of the same group")
    evaluate.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of random/stat/incremental/removal (default: 0)")
    evaluate.add_argument("--exact", action="store_true", help="exact search even if an index was trained")
    evaluate.add_argument("--rerank", action="store_true", help=RERANK_HELP)
    evaluate.add_argument("--excel-path", type=WORKBOOK_FILE, default=None,
                          help="workbook to write or extend (default: <results_dir>/accuracy_<db_name>.xlsx)")
    evaluate.add_argument("--name", default=None, help="sheet name of this run (default: the measure)")
    evaluate.add_argument("--results-dir", type=OUTPUT_FOLDER, default=Path("results"),
                          help="where the workbook and pictures go")
    evaluate.add_argument("--json", type=OUTPUT_FILE, default=None, help="also write the numbers as JSON to this file")
    evaluate.add_argument("--no-picture", action="store_true", help="no confusion matrices or curves")
    evaluate.add_argument("--weights", default=None, help="the database's checkpoint, if it moved")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=run)
