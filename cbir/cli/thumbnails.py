"""`cbir thumbnails`: make the thumbnails a database built before them lacks."""
from __future__ import annotations

from cbir.cli.flags import counted, skipped_summary, store_arguments, writer_arguments


def run(args) -> int:
    from cbir import api

    store = api.open_database(args.db_name, args.redis_url, args.wait)
    report = api.backfill_thumbnails(store, progress=not args.quiet)
    mean = f", {report.bytes / report.made:,.0f} bytes each on average" if report.made else ""
    print(f"'{args.db_name}': {counted(report.made, 'thumbnail')} made{mean}; "
          f"{counted(len(report.failures), 'image')} left without one")
    return skipped_summary(report.failures)


def register(commands) -> None:
    thumbnails = commands.add_parser("thumbnails", help="make the thumbnails a database built before them lacks",
                                     description="A 128 px JPEG picture of each stored image without one, made from "
                                                 "its source file as recorded at add time (a source gone, or "
                                                 "changed since, is listed and skipped).")
    store_arguments(thumbnails)
    writer_arguments(thumbnails)
    thumbnails.add_argument("--quiet", action="store_true", help="no progress bar")
    thumbnails.set_defaults(run=run, after_stop="the thumbnails made are kept; re-run to make the rest")
