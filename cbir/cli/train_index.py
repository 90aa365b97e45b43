"""`cbir train-index` (train_index.py): a FAISS index for approximate search."""
from __future__ import annotations

import json

from cbir.cli.flags import COUNT, NON_NEGATIVE, OUTPUT_FILE, real, store_arguments, writer_arguments
from cbir.files import write_text
from cbir.options import INDEX_KINDS


def run(args) -> int:
    from cbir import api

    store = api.open_database(args.db_name, args.redis_url, args.wait)
    store.require()
    if args.delete:
        deleted = api.delete_index(store)
        print(f"'{args.db_name}': {'trained index deleted' if deleted else 'had no trained index'}; "
              "searches are exact")
        return 0
    print(f"training an index ({args.index}) over '{args.db_name}' on {api.where(store)}")
    report = api.train_index(store, kind=args.index, durable=args.durable, nlist=args.nlist, m=args.m,
                             breadth=args.nprobe, target_recall=args.target_recall, seed=args.seed)
    params = ", ".join(f"{k}={v}" for k, v in report.params.items()) or "exact"
    print(f"  parameters: {params}")
    print(f"  read {report.count} vectors from Redis in {report.load_seconds:.2f} s; built in "
          f"{report.build_seconds:.2f} s; tuned in {report.tune_seconds:.2f} s")
    print(f"  size: {report.bytes / 2**20:.1f} MiB ({report.bytes_per_vector:.1f} bytes/vector), saved in Redis")
    if report.tuning and report.tuning.tried:
        refined = args.index == "ivfpq"  # candidates re-ranked by their vectors in Redis
        print(f"  {'breadth':>8}{' re-rank' if refined else ''} {'recall@1':>9} {'recall@10':>10} {'queries/s':>10}"
              "   (vs exact search)")
        for point in report.tuning.tried:
            mark = "  <- chosen" if point is report.tuning.chosen else ""
            print(f"  {point.breadth:>8}{f' {point.refine:>6}x' if refined else ''} {point.recall1:>9.3f} "
                  f"{point.recall10:>10.3f} {point.queries_per_second:>10.0f}{mark}")
        if not report.tuning.reached:
            print(f"  recall@10 {report.tuning.chosen.recall10:.3f} stays under the target {args.target_recall}: "
                  f"{_recall_advice(args.index, args.nprobe, report.tuning.chosen.breadth)}")
    if args.json:
        write_text(args.json, json.dumps(report.as_dict(), indent=2))
    return 0


def _recall_advice(kind: str, given_breadth: int | None, breadth: int) -> str:
    """What would raise the recall of an index that stays under its target at search ``breadth``."""
    if kind == "ivfpq":
        return "the PQ codes limit it, even re-ranking 16 x the candidates (try a larger --m, or ivf)"
    if given_breadth is not None:
        return f"try a larger --nprobe than {breadth}, or leave it out to have it tuned"
    if kind == "hnsw":
        return "more search breadth stopped helping; try a larger --m"
    return f"more lists visited stopped helping; try --nprobe above {breadth}"


def register(commands) -> None:
    train_index = commands.add_parser("train-index", help="train a FAISS index for approximate search",
                                      description="Read the database's vectors, train a FAISS index (cosine "
                                                  "similarity), tune its search breadth against exact search "
                                                  "and store it in Redis; later searches use it, kept up to "
                                                  "date with later additions and removals.")
    store_arguments(train_index)
    writer_arguments(train_index)
    train_index.add_argument("--index", default="ivf", choices=INDEX_KINDS,
                             help="ivf (IVF-Flat, default), ivfpq (compressed 8-bit PQ codes; its candidates are "
                                  "re-ranked by their vectors in Redis), hnsw, or flat (exact)")
    train_index.add_argument("--nlist", type=COUNT, default=None,
                             help="inverted lists of ivf/ivfpq (default: about 4·sqrt(N))")
    train_index.add_argument("--nprobe", type=COUNT, default=None,
                             help="search breadth: lists visited (ivf/ivfpq) or efSearch (hnsw); "
                                  "default: the smallest that reaches --target-recall")
    train_index.add_argument("--m", type=COUNT, default=None,
                             help="ivfpq: sub-quantisers (code bytes per vector; default up to 32); "
                                  "hnsw: links per node (32)")
    train_index.add_argument("--target-recall", type=real(0, 1, above=True), default=0.95,
                             help="recall@10 against exact search that tuning aims for (default: 0.95)")
    train_index.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the training and tuning samples")
    train_index.add_argument("--delete", action="store_true",
                             help="delete the trained index (searches become exact)")
    train_index.add_argument("--json", type=OUTPUT_FILE, default=None,
                             help="also write the report as JSON to this file")
    train_index.set_defaults(run=run, after_stop="the index trained before, if any, is kept")
