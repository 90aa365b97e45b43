"""`cbir retrieve` (retrieve_images.py): the stored images nearest to queries."""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

from cbir.cli.flags import (
    COUNT,
    NON_NEGATIVE,
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    RERANK_HELP,
    skipped_summary,
    source_arguments,
    store_arguments,
)
from cbir.files import write_text
from cbir.images.sources import some_labels
from cbir.options import DEFAULT_NEIGHBOURS, PICTURE_COLUMNS, PICTURE_ROWS

PROGRESS_FROM = 32  # queries: fewer are embedded in about a second


def run(args) -> int:
    clock = Stopwatch()
    from cbir import api

    store = api.open_database(args.db_name, args.redis_url)
    store.require()
    queries = api.query_items(args.path, split=args.split, seed=args.seed, count=args.n_queries)
    clock.lap("redis")
    # Only once the database and the queries are found: a mistake must not wait for torch.
    from cbir.pipeline import retrieve  # noqa: F401  torch and FAISS, imported here to be timed as imports

    clock.lap("imports")
    retriever = api.retriever(store, weights=args.weights, device=args.device, exact=args.exact, rerank=args.rerank)
    clock.lap("model+index")
    if args.nrt_neigh is not None and args.nrt_neigh > retriever.stored:  # the default asks for no more than there is
        warnings.warn(f"--nrt-neigh {args.nrt_neigh} is more than the {retriever.stored} images of '{args.db_name}': "
                      f"each query gets all {retriever.stored}")
    retrievals, failures = retriever.query(queries.items, k=args.nrt_neigh or DEFAULT_NEIGHBOURS,
                                           known_labels=queries.labelled,
                                           progress=len(queries.items) > PROGRESS_FROM)
    clock.lap("query")
    for retrieval in retrievals:
        label = f" (label: {retrieval.query_label})" if retrieval.query_label else ""
        print(f"\nquery: {retrieval.query}{label}")
        print(f"{'rank':>4}  {'similarity':>10}  {'label':<16} {'project':<12} name")
        for n in retrieval.neighbours:
            print(f"{n.rank:>4}  {n.score:>10.4f}  {n.label:<16} {n.project:<12} {n.name}")
        print(f"vote: {retrieval.vote_summary()}")
    unstored = retriever.unstored_labels(retrievals)
    if unstored:
        warnings.warn(f"'{args.db_name}' holds no image labelled {some_labels(unstored)}: no neighbour of such a "
                      f"query can share its label")
    if not args.no_picture and retrievals:
        from cbir.viz.pictures import save_retrieval_grid

        stamp = time.strftime("%Y%m%d-%H%M%S")
        picture = save_retrieval_grid(retrievals, Path(args.results_dir) / f"retrieval_{args.db_name}_{stamp}.png")
        left_out = [f"the first {PICTURE_ROWS} of {len(retrievals)} queries"] if len(retrievals) > PICTURE_ROWS else []
        neighbours = max(len(retrieval.neighbours) for retrieval in retrievals)
        if neighbours > PICTURE_COLUMNS:
            left_out.append(f"the first {PICTURE_COLUMNS} of {neighbours} neighbours")
        part = f" ({', '.join(left_out)}; --html and --json take them all)" if left_out else ""
        print(f"\npicture: {picture}{part}")
    if args.html and retrievals:
        from cbir.viz.pictures import save_retrieval_html

        page = save_retrieval_html(retrievals, args.html, title=f"Retrieval from '{args.db_name}'")
        print(f"html: {page}")
    if args.json:
        payload = [r.to_json() for r in retrievals]
        write_text(args.json, json.dumps(payload[0] if len(payload) == 1 and queries.one_image else payload, indent=2))
        print(f"json: {args.json}")
    clock.lap("output")
    if args.verbose:
        print(clock.breakdown(retriever.timings), file=sys.stderr)
    return skipped_summary(failures)


class Stopwatch:
    """Where a one-shot command's time goes (``--verbose``)."""

    def __init__(self):
        from cbir import IMPORTED_AT

        self.last = time.perf_counter()
        self.laps = {"cli": self.last - IMPORTED_AT}  # importing the command line (not the interpreter's start)

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = now - self.last
        self.last = now

    def breakdown(self, inside: dict[str, float]) -> str:
        """One line: each lap, and the steps measured inside the retriever, in seconds."""
        laps = " ".join(f"{step} {seconds:.3f}" for step, seconds in self.laps.items())
        steps = " ".join(f"{step} {seconds:.3f}" for step, seconds in inside.items())
        return f"seconds: {laps}; total {sum(self.laps.values()):.2f} (of which {steps})"


def register(commands) -> None:
    retrieve = commands.add_parser("retrieve", help="find the stored images most similar to a query",
                                   description="Print the nearest stored images of a query image (or of one "
                                               "random image per class of a folder/.npz, or of every image of "
                                               "a folder without sub-folders), their kNN vote, and save a picture.")
    store_arguments(retrieve)
    source_arguments(retrieve, "an image (or DICOM file); a folder with one sub-folder per class or a "
                                 "MedMNIST-style .npz (one random image per class); or a folder of unlabelled "
                                 "images (each one)")
    retrieve.add_argument("--nrt-neigh", type=COUNT, default=None,
                          help=f"neighbours to return (default: {DEFAULT_NEIGHBOURS}, or all where fewer are stored)")
    retrieve.add_argument("--results-dir", type=OUTPUT_FOLDER, default=Path("results"),
                          help="where the picture goes (default: results)")
    retrieve.add_argument("--json", type=OUTPUT_FILE, default=None, help="also write the results as JSON to this file")
    retrieve.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed for picking the queries of a folder/.npz")
    retrieve.add_argument("--n-queries", type=COUNT, default=None,
                          help="queries of a folder/.npz, classes taking turns (default: one per class; of "
                               "unlabelled images: all), picked at random (--seed)")
    retrieve.add_argument("--html", type=OUTPUT_FILE, default=None,
                          help=f"also write every query's row as a self-contained HTML page here (the picture "
                               f"shows the first {PICTURE_ROWS} queries, {PICTURE_COLUMNS} neighbours each)")
    retrieve.add_argument("--weights", default=None,
                          help="the database's checkpoint, if it moved since the database was built")
    retrieve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    retrieve.add_argument("--no-picture", action="store_true", help="do not save the picture")
    retrieve.add_argument("--exact", action="store_true", help="exact search even if an index was trained")
    retrieve.add_argument("--rerank", action="store_true", help=RERANK_HELP)
    retrieve.add_argument("--verbose", action="store_true",
                          help="print where the time went (imports, Redis, model, index, search, records) on stderr")
    retrieve.set_defaults(run=run)
