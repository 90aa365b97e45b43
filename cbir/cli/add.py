"""`cbir add` (add_images.py): index images into a database."""
from __future__ import annotations

import sys

from cbir.cli.flags import (
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_REAL,
    POSITIVE,
    SOME_FILES_SKIPPED,
    SOURCES,
    counted,
    extractor_arguments,
    skipped_summary,
    source_arguments,
    store_arguments,
    writer_arguments,
)


def run(args) -> int:
    from cbir import api

    items = api.load_items(args.path, split=args.split, project=args.project, projects_in_names=args.projects,
                           label=args.label, names_by_project=args.names_by_project)
    store = api.open_database(args.db_name, args.redis_url, args.wait)
    extractor = api.model_for_add(store, args.extractor, args.weights, args.input_size, args.device,
                                  args.num_features, fresh=args.rewrite, pooling=args.pooling, flip=args.flip)
    # Only now, with the model built and its flags checked: a mistyped --weights must not cost the database.
    if args.rewrite and api.start_over(store):
        print(f"--rewrite: deleted database '{args.db_name}'")
    print(f"{counted(len(items), 'image')} from {args.path} -> '{args.db_name}' on {api.where(store)}, "
          f"model {extractor.spec.description}, {extractor.spec.embedding_dim}-d")
    ray = None
    if args.engine == "ray":
        from cbir.pipeline.distributed import RayCluster

        ray = RayCluster(address=args.ray_address, workers=args.workers or None, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker)
    report = api.add(store, items, extractor, weights=args.weights, chunk_size=args.chunk_size,
                     batch_size=args.batch_size, workers=args.workers, progress=not args.quiet, update=args.update,
                     durable=args.durable, thumbnails=not args.no_thumbnails, ray=ray, redis_url=args.redis_url)
    rate = (report.written / report.seconds) if report.seconds else 0.0
    conflicts = f"{len(report.conflicts)} conflicting, " if report.conflicts else ""
    print(f"'{args.db_name}': {report.new} new, {report.updated} updated, "
          f"{report.unchanged} unchanged, {conflicts}{report.duplicates} duplicate names, "
          f"{len(report.failures)} failed in {report.seconds:.1f} s ({rate:.1f} images/s indexed); {counted(store.count(), 'image')} stored")
    if report.conflicts:
        print(f"{counted(len(report.conflicts), 'stored name')} with other content, kept as stored (--update replaces "
              "them; --names-by-project keeps both, named <project>/<name>):", file=sys.stderr)
        for conflict in report.conflicts:
            print(f"  {conflict}", file=sys.stderr)
    return skipped_summary(report.failures) or (SOME_FILES_SKIPPED if report.conflicts else 0)


def register(commands) -> None:
    add = commands.add_parser("add", help="index images into a database",
                              description="Embed images and store their vectors and records in Redis. "
                                          "Re-running is safe: stored images are skipped.")
    store_arguments(add)
    writer_arguments(add)
    source_arguments(add, f"images to index: {SOURCES}")
    extractor_arguments(add)
    add.add_argument("--num-features", type=COUNT, default=None,
                     help="expected embedding size (checked against the model; a checkpoint sets its own)")
    add.add_argument("--pooling", default=None, choices=["avg", "gem"],
                     help="pooling of the backbone's last feature map for a new database's model: avg (default, the "
                          "backbone's own) or gem (generalised mean, p = 3)")
    add.add_argument("--flip", action="store_true",
                     help="test-time augmentation for a new database's model: each vector is the mean of the image's "
                          "and its mirror image's features (twice the model time, queries included)")
    add.add_argument("--rewrite", action="store_true", help="delete this database (only this one) first")
    add.add_argument("--update", action="store_true",
                     help="replace stored images whose name comes again with other content (without it, such a "
                          "name is a conflict: listed, kept as stored, exit status 1)")
    add.add_argument("--no-thumbnails", action="store_true",
                     help="store no thumbnail (a 128 px JPEG of each image, a few KB, that the service's pages show)")
    add.add_argument("--names-by-project", action="store_true",
                     help="name each image <project>/<name>, so that sources sharing file names (two hospitals' "
                          "exports) are stored side by side; the project is --project, else the folder's name")
    add.add_argument("--project", default=None,
                     help="project of every image (default: the folder's or the .npz's name; none for an image file)")
    add.add_argument("--projects", action="store_true",
                     help="class folders are named <project>_<class>: take the project from the name")
    add.add_argument("--label", default=None,
                     help="label of every image: of a single image file (default: its folder's name) or of "
                          "all files under a folder, sub-folders too (default: one class per sub-folder)")
    add.add_argument("--batch-size", type=COUNT, default=32, help="images per model batch (default: 32)")
    add.add_argument("--workers", type=NON_NEGATIVE, default=None,
                     help="decoding threads, or processes when the model runs on a GPU (default: one per core; "
                          "0 decodes in the main thread); with --engine ray, Ray workers, each with its own model "
                          "(default: as many as the cluster's CPUs, or GPUs, allow)")
    add.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: decode and embed in this process (default); ray: on the workers of a Ray "
                          "cluster (this process still writes, holding the database's lock)")
    add.add_argument("--ray-address", default=None,
                     help="with --engine ray: the cluster (auto, or ray://HOST:10001); default: start a local Ray "
                          "on this machine for the run")
    add.add_argument("--cpus-per-worker", type=POSITIVE, default=None,
                     help="with --engine ray: CPUs of each worker (default: every core of this machine for a local "
                          "Ray, else 4)")
    add.add_argument("--gpus-per-worker", type=NON_NEGATIVE_REAL, default=0.0,
                     help="with --engine ray: GPUs of each worker (default: 0, the CPU)")
    add.add_argument("--chunk-size", type=COUNT, default=None,
                     help="vectors per Redis chunk key of a new database (default: what fits in 512 KiB)")
    add.add_argument("--quiet", action="store_true", help="no progress bar")
    add.set_defaults(run=run, after_stop="what was stored is kept; re-run the same command to add the rest")
