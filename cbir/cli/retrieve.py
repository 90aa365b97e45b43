"""`cbir retrieve` (retrieve_images.py): the stored images nearest to queries."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from cbir.cli.flags import (
    COUNT,
    NON_NEGATIVE,
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    open_store,
    skipped_summary,
    source_arguments,
    store_arguments,
)
from cbir.files import write_text
from cbir.images.sources import query_items, some_labels
from cbir.options import DEFAULT_NEIGHBOURS, PICTURE_COLUMNS, PICTURE_ROWS


def run(args) -> int:
    store = open_store(args)
    store.require()
    queries = query_items(args.path, split=args.split, seed=args.seed, count=args.n_queries)
    # Imported once the database and the queries are found: torch and timm take seconds to import.
    from cbir.pipeline.embed import DEFAULT_BATCH_SIZE
    from cbir.pipeline.model import extractor_for_store
    from cbir.pipeline.retrieve import Retriever

    extractor = extractor_for_store(store, weights=args.weights, device=args.device)
    retriever = Retriever(store, extractor, exact=args.exact)
    if args.nrt_neigh is not None and args.nrt_neigh > retriever.stored:  # the default asks for no more than there is
        warnings.warn(f"--nrt_neigh {args.nrt_neigh} is more than the {retriever.stored} images of '{args.db_name}': "
                      f"each query gets all {retriever.stored}")
    retrievals, failures = retriever.query(queries.items, k=args.nrt_neigh or DEFAULT_NEIGHBOURS,
                                           known_labels=queries.labelled,
                                           progress=len(queries.items) > DEFAULT_BATCH_SIZE)
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
    return skipped_summary(failures)


def register(commands) -> None:
    retrieve = commands.add_parser("retrieve", help="find the stored images most similar to a query",
                                   description="Print the nearest stored images of a query image (or of one "
                                               "random image per class of a folder/.npz, or of every image of "
                                               "a folder without sub-folders), their kNN vote, and save a picture.")
    store_arguments(retrieve)
    source_arguments(retrieve, "an image (or DICOM file); a folder with one sub-folder per class or a "
                                 "MedMNIST-style .npz (one random image per class); or a folder of unlabelled "
                                 "images (each one)")
    retrieve.add_argument("--nrt_neigh", type=COUNT, default=None,
                          help=f"neighbours to return (default: {DEFAULT_NEIGHBOURS}, or all where fewer are stored)")
    retrieve.add_argument("--results_dir", type=OUTPUT_FOLDER, default=Path("results"),
                          help="where the picture goes (default: results)")
    retrieve.add_argument("--json", type=OUTPUT_FILE, default=None, help="also write the results as JSON to this file")
    retrieve.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed for picking the queries of a folder/.npz")
    retrieve.add_argument("--n_queries", type=COUNT, default=None,
                          help="queries of a folder/.npz, classes taking turns (default: one per class; of "
                               "unlabelled images: all), picked at random (--seed)")
    retrieve.add_argument("--html", type=OUTPUT_FILE, default=None,
                          help=f"also write every query's row as a self-contained HTML page here (the picture "
                               f"shows the first {PICTURE_ROWS} queries, {PICTURE_COLUMNS} neighbours each)")
    retrieve.add_argument("--weights", default=None,
                          help="the database's checkpoint, if it moved since the database was built")
    retrieve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    retrieve.add_argument("--no_picture", action="store_true", help="do not save the picture")
    retrieve.add_argument("--exact", action="store_true", help="exact search even if an index was trained")
    retrieve.set_defaults(run=run)
