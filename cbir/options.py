"""The names and limits users choose from on the command line, and which of them go together, kept
free of heavy imports so that ``--help`` is instant and a wrong choice is refused at once; the
modules that implement them import them from here."""
from __future__ import annotations

from typing import Sequence

from cbir.errors import CbirError

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
MEASURES = ("all", "weighted", "random", "stat", "separated", "remove", "loo", "incremental", "removal",
            "interpolate")
SUPPORT_MEASURES = ("loo", "incremental", "removal", "interpolate")  # need no query images of their own
VOTES = ("majority", "distance", "softmax")
LOSSES = ("margin", "proxy_nca", "proxy_anchor", "softtriple", "normsoftmax", "arcface", "triplet",
          "contrastive", "ntxent", "cross_entropy")
SCHEDULERS = ("cosine", "step", "exponential", "none")
DEFAULT_EXTRACTOR = "efficientnet_lite0"  # ImageNet weights ship in a package: works offline
DEFAULT_NEIGHBOURS = 10  # returned per query unless --nrt-neigh says otherwise
# Queries drawn in one retrieval picture: a folder of 780 queries would draw for minutes into a
# picture 171,600 pixels high.
PICTURE_ROWS = 20
# Neighbours drawn per query: 500 made a picture 93,687 pixels wide.
PICTURE_COLUMNS = 20
MIN_TSNE_POINTS = 5  # fewer points show no structure worth a t-SNE picture
# Images per class in a dataset's sample grid: 437 (BUSI's benign class) made a picture 176,000
# pixels wide, 20 MB, past Pillow's decompression-bomb limit for whoever opens it.
SAMPLE_COLUMNS = 30
# Embedding size of a trained head: --num-features 1000000 (a slip for 1000) asked for a 5 GB head
# and its optimiser state, and the kernel killed training on 24 GiB; metric learning uses 64-2048.
MAX_EMBEDDING_DIM = 8192


def check_protocol_options(measures: Sequence[str], exclude_classes: Sequence[str], with_queries: bool) -> None:
    """Refuse measures and options that do not go together, before any image is read."""
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise CbirError(f"unknown --measure {', '.join(sorted(unknown))}; choose from {', '.join(MEASURES)}")
    if not with_queries and set(measures) - set(SUPPORT_MEASURES):
        raise CbirError(f"--measure {' '.join(measures)} needs --path with the query images "
                        f"(only {', '.join(SUPPORT_MEASURES)} run on the stored images alone)")
    if "remove" in measures and not exclude_classes:
        raise CbirError("--measure remove needs --exclude-classes (the query classes it leaves out)")
    if exclude_classes and "remove" not in measures:
        raise CbirError("--exclude-classes applies to --measure remove only; add remove to --measure")
