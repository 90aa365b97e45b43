"""`cbir remove` (remove_images.py): delete images by name, label or content."""
from __future__ import annotations

import sys
from pathlib import Path

from cbir.cli.flags import counted, open_store, skipped_summary, store_arguments, writer_arguments
from cbir.errors import CbirError
from cbir.images.sources import NPZ_SPLITS, content_digests, every_item, some_labels


def run(args) -> int:
    store = open_store(args)
    store.require()
    if not args.name and not args.label and not args.path:
        raise CbirError("nothing to remove: give --name, --label and/or --path")
    digests, failures = content_digests(every_item(args.path, split=args.split)) if args.path else ({}, [])
    with store.writing():
        removed = store.remove_names(args.name) if args.name else []
        removed += store.remove_matching(args.label, digests) if args.label or digests else []
    print(f"removed {counted(len(removed), 'image')} from '{args.db_name}'; {store.count()} remain")
    # Said, not an error: a removal run again after it succeeded finds nothing, and must still succeed.
    missing_names = sorted(set(args.name) - {record.name for record in removed})
    missing_labels = sorted(set(args.label) - {record.label for record in removed})
    if missing_names:
        print(f"not stored in '{args.db_name}' (names as stored, e.g. as retrieve prints them): "
              f"{', '.join(missing_names)}", file=sys.stderr)
    if missing_labels:
        print(f"no image labelled {', '.join(missing_labels)} in '{args.db_name}'", file=sys.stderr)
    removed_digests = {record.sha256 for record in removed}
    unmatched = [name for digest, names in digests.items() if digest not in removed_digests for name in names]
    if unmatched:
        given = sum(map(len, digests.values()))
        kind = "images" if Path(args.path).suffix == ".npz" else "files"
        print(f"no stored image has the content of {len(unmatched)} of the {given} {kind} of {args.path}: "
              f"{some_labels(unmatched)}", file=sys.stderr)
    return skipped_summary(failures)


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
