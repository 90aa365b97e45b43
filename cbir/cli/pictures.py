"""`cbir tsne` (tsne.py) and `cbir dataset`: pictures of a database and of a dataset."""
from __future__ import annotations

from pathlib import Path

from cbir.cli.flags import (
    NON_NEGATIVE,
    OUTPUT_FOLDER,
    PICTURE_FILE,
    POSITIVE,
    SOURCES,
    skipped_summary,
    source_arguments,
    store_arguments,
    whole,
)
from cbir.options import MIN_TSNE_POINTS, SAMPLE_COLUMNS


def run_tsne(args) -> int:
    from cbir import api

    store = api.open_database(args.db_name, args.redis_url)
    out = args.out or Path(args.out_dir) / f"tsne_{args.db_name}.png"
    picture = api.tsne(store, out, perplexity=args.perplexity, max_points=args.max_points,
                       by_project=args.by_project, seed=args.seed)
    print(f"t-SNE of {picture.points} images of '{args.db_name}': {picture.path}")
    return 0


def run_dataset(args) -> int:
    from cbir import api

    items = api.load_items(args.path, split=args.split)
    name = args.name or Path(args.path).stem + (f"_{args.split}" if str(args.path).endswith(".npz") else "")
    stats, pictures = api.dataset_pictures(items, args.out_dir, name, args.per_class, args.seed,
                                           progress=not args.quiet)
    print(f"{len(stats.labels)} images, {len(set(stats.labels))} classes, sizes "
          f"{stats.widths.min()}-{stats.widths.max()} x {stats.heights.min()}-{stats.heights.max()} px")
    for picture in pictures:
        print(f"picture: {picture}")
    return skipped_summary(stats.failures)


def register(commands) -> None:
    tsne = commands.add_parser("tsne", help="t-SNE picture of a database's vectors",
                               description="2-D t-SNE (PCA to 50 dims first) of the stored vectors, coloured by "
                                           "class; large databases are sampled (stratified, seeded).")
    store_arguments(tsne)
    tsne.add_argument("--perplexity", type=POSITIVE, default=30.0, help="t-SNE perplexity (default: 30)")
    tsne.add_argument("--max-points", type=whole(MIN_TSNE_POINTS), default=5000,
                      help="sample size for large databases (default: 5000)")
    tsne.add_argument("--by-project", action="store_true", help="add a second panel coloured by project")
    tsne.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the sample and of t-SNE")
    tsne.add_argument("--out", type=PICTURE_FILE, default=None,
                      help="picture to write, .png, .pdf, .svg, ... (default: <out_dir>/tsne_<db_name>.png)")
    tsne.add_argument("--out-dir", type=OUTPUT_FOLDER, default=Path("data_visualization"),
                      help="default folder of --out")
    tsne.set_defaults(run=run_tsne)

    dataset = commands.add_parser("dataset", help="overview pictures of a folder or .npz of images",
                                  description="Images per class, image sizes, mean intensities per class, and a "
                                              "grid of sample images per class.")
    source_arguments(dataset, f"the dataset: {SOURCES}")
    dataset.add_argument("--out-dir", type=OUTPUT_FOLDER, default=Path("data_visualization"),
                         help="where pictures go (default: data_visualization)")
    dataset.add_argument("--name", default=None, help="file name prefix (default: the source's name)")
    dataset.add_argument("--per-class", type=whole(1, SAMPLE_COLUMNS), default=6,
                         help=f"sample images per class in the grid (default: 6, at most {SAMPLE_COLUMNS})")
    dataset.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the sample images")
    dataset.add_argument("--quiet", action="store_true", help="no progress bar")
    dataset.set_defaults(run=run_dataset)
