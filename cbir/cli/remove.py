"""`cbir remove` (remove_images.py): delete images by name, label or content."""
from __future__ import annotations

import sys
from pathlib import Path

from cbir.cli.flags import counted, skipped_summary, store_arguments, writer_arguments
from cbir.errors import CbirError
from cbir.images.sources import NPZ_SPLITS, some_labels


def run(args) -> int:
    from cbir import api

    if not (args.name or args.label or args.path):
        raise CbirError("nothing to remove: give --name, --label and/or --path")
    store = api.open_database(args.db_name, args.redis_url, args.wait)
    removal = api.remove(store, args.name, args.label, args.path, args.split, durable=args.durable)
    print(f"removed {counted(len(removal.removed), 'image')} from '{args.db_name}'; {store.count()} remain")
    if removal.missing_names:
        print(f"not stored in '{args.db_name}' (names as stored, e.g. as retrieve prints them): "
              f"{', '.join(removal.missing_names)}", file=sys.stderr)
    if removal.missing_labels:
        print(f"no image labelled {', '.join(removal.missing_labels)} in '{args.db_name}'", file=sys.stderr)
    if removal.unmatched:
        kind = "images" if Path(args.path).suffix == ".npz" else "files"
        print(f"no stored image has the content of {len(removal.unmatched)} of the {removal.given} {kind} of "
              f"{args.path}: {some_labels(removal.unmatched)}", file=sys.stderr)
    return skipped_summary(removal.failures)


def register(commands) -> None:
    remove = commands.add_parser("remove", help="delete images by name, label or content",
                                 description="Delete images (record, name and vector) from a database; "
                                             "they are never returned again. Names, labels and files that "
                                             "match nothing are listed.")
    store_arguments(remove)
    writer_arguments(remove)
    remove.add_argument("--name", nargs="+", default=[], help="image names (as stored, e.g. benign/x.png)")
    remove.add_argument("--label", nargs="+", default=[], help="remove every image of these labels")
    remove.add_argument("--path", default=None,
                        help="remove every stored image with the content (sha256) of a file here, whatever its "
                             "name: an image file, a folder (all files under it) or an .npz")
    remove.add_argument("--split", choices=NPZ_SPLITS, default="train", help="split of an .npz --path")
    remove.set_defaults(run=run, after_stop="what was removed stays removed; re-run the same command "
                                                  "to remove the rest")
