"""The ``cbir`` command line: thin wrappers over the package, one sub-command per capability.

The root scripts (``add_images.py``, ``retrieve_images.py``, ...) call :func:`main` with their
sub-command, so ``python add_images.py ...`` and ``cbir add ...`` are the same command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__, interrupts
from .connection import URL_ENV, connect, describe
from .data import NPZ_SPLITS, content_digests, every_item, load_items, query_items, some_labels, source_path
from .errors import CbirError, StoreError
from .files import write_text
from .options import (DEFAULT_NEIGHBOURS, INDEX_KINDS, LOSSES, MAX_EMBEDDING_DIM, MEASURES, MIN_TSNE_POINTS,
                      PICTURE_COLUMNS, PICTURE_ROWS, SAMPLE_COLUMNS, SCHEDULERS, VOTES, check_protocol_options)
from .store import VectorStore, database_names

DEFAULT_EXTRACTOR = "efficientnet_lite0"


def _whole(minimum: int, maximum: int | None = None):
    """argparse type: a whole number of at least ``minimum`` (and at most ``maximum``)."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return whole_number


def _real(minimum: float, maximum: float = math.inf, *, above: bool = False, below: bool = False):
    """argparse type: a finite number from ``minimum`` to ``maximum``, excluding an end with ``above``/``below``."""
    if maximum == math.inf:
        allowed = f"above {minimum:g}" if above else f"at least {minimum:g}"
    else:
        allowed = f"in {'(' if above else '['}{minimum:g}, {maximum:g}{')' if below else ']'}"

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        fits = (value > minimum if above else value >= minimum) and (value < maximum if below else value <= maximum)
        if not (math.isfinite(value) and fits):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    return number


def _output(folder: bool = False):
    """argparse type: a file (or with ``folder``, a folder) this command may write or make, checked
    before the work whose results it would hold. Files are written beside their final name first,
    so it is the folder that must be writable."""
    def output_path(text: str) -> str:
        path = Path(text).absolute()
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):  # to be made; a file on the way is named below
            pass
        except OSError as exc:  # a name too long, a loop of links
            raise argparse.ArgumentTypeError(f"{text}: {exc.strerror}") from None
        if path.exists() and path.is_dir() != folder:
            raise argparse.ArgumentTypeError(f"{text} is a {'file' if folder else 'folder'}, not a "
                                             f"{'folder' if folder else 'file'}")
        existing = next(p for p in ([path] if folder else []) + list(path.parents) if p.exists())
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"{existing} is a file, so {text} cannot be made in it")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{existing} is not writable")
        return text
    return output_path


OUTPUT_FILE, OUTPUT_FOLDER = _output(), _output(folder=True)


def _typed_file(suffixes: tuple[str, ...], what: str):
    """argparse type: an OUTPUT_FILE whose name ends in one of ``suffixes`` (the writer goes by it)."""
    def typed_output_file(text: str) -> str:
        OUTPUT_FILE(text)
        if Path(text).suffix.lower().lstrip(".") not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: the name of {what} must end in "
                                             f"{', '.join('.' + s for s in suffixes)}")
        return text
    return typed_output_file


PICTURE_FILE = _typed_file(("png", "jpg", "jpeg", "pdf", "svg", "tif", "tiff", "webp", "eps"), "a picture")
WORKBOOK_FILE = _typed_file(("xlsx",), "an Excel workbook")  # openpyxl writes and reads back only these
COUNT = _whole(1)  # sizes, counts, k
NON_NEGATIVE = _whole(0)  # seeds, worker numbers
POSITIVE = _real(0, above=True)  # rates, temperatures
NON_NEGATIVE_REAL = _real(0)  # weights that 0 turns off, waits

SOME_FILES_SKIPPED = 1  # the work is done, and a script can tell that some files were not part of it
OUTPUT_CLOSED = 128 + signal.SIGPIPE  # what a shell reports for a tool its pipe reader left
EXIT_STATUSES = ("exit status: 0 done; 1 done, but some input files were skipped (listed last on stderr); "
                 "2 an error (one line on stderr); 130 / 143 interrupted by Ctrl-C / SIGTERM; 141 the "
                 "output's reader left (| head)")


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with its noun: "1 image", "2 images"."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _skipped_summary(failures: list[str]) -> int:
    """List the files a command skipped (file: reason) at the end of its output; its exit status."""
    if not failures:
        return 0
    print(f"{counted(len(failures), 'file')} skipped:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return SOME_FILES_SKIPPED


def _store_arguments(parser: argparse.ArgumentParser, db_help: str | None = None) -> None:
    """--db_name (required unless ``db_help`` says what leaving it out does) and --redis-url."""
    parser.add_argument("--db_name", required=db_help is None,
                        help=db_help or "database name (its keys live under cbir:<db_name>:)")
    parser.add_argument("--redis-url", "--redis_url", dest="redis_url", default=None,
                        help=f"Redis URL (redis://, rediss://, with password, or unix:///path/redis.sock; a "
                             f"Cluster node works too; a private CA: rediss://...?ssl_ca_certs=ca.pem). "
                             f"Default: ${URL_ENV}, else an embedded Redis under $CBIR_HOME")


def _writer_arguments(parser: argparse.ArgumentParser) -> None:
    """--wait, for a command that takes the database's writer lock."""
    parser.add_argument("--wait", type=NON_NEGATIVE_REAL, default=0.0, metavar="SECONDS",
                        help="wait up to this long for another process writing the database to finish "
                             "(default: 0, refuse at once)")


SOURCES = ("a folder with one sub-folder per class, a MedMNIST-style .npz, or an image (any format Pillow "
           "reads, or DICOM)")


def _source_arguments(parser: argparse.ArgumentParser, path_help: str) -> None:
    parser.add_argument("--path", required=True, help=path_help)
    parser.add_argument("--split", default="train", choices=NPZ_SPLITS, help="split of a .npz (default: train)")


def _open_store(args) -> VectorStore:
    return VectorStore(connect(args.redis_url), args.db_name, lock_wait=getattr(args, "wait", 0.0))


def _extractor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", default=None,
                        help=f"backbone (default: the database's model, else {DEFAULT_EXTRACTOR}, whose "
                             "ImageNet weights ship in a package and work offline)")
    parser.add_argument("--weights", default=None,
                        help="a cbir checkpoint (.safetensors, describes itself) or backbone weights for "
                             "--extractor (.pth/.pt/.safetensors, e.g. KimiaNet for densenet121)")
    parser.add_argument("--input_size", type=COUNT, default=None,
                        help="image side in pixels fed to the model (default: the backbone's, 224 mostly)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


# ----------------------------------------------------------------------- add
def _check_model_flags(args, spec) -> None:
    """A self-describing checkpoint sets the model; flags that say otherwise are refused, not ignored."""
    from .models import resolve_backbone

    if args.extractor and resolve_backbone(args.extractor).name != spec.architecture:
        raise CbirError(f"--extractor {args.extractor}, but {args.weights} is a checkpoint of {spec.architecture}; "
                        "leave --extractor out (a checkpoint describes its model)")
    if args.input_size and args.input_size != spec.input_size:
        raise CbirError(f"--input_size {args.input_size}, but {args.weights} takes {spec.input_size} px "
                        "images; leave --input_size out (a checkpoint describes its model)")
    if args.num_features and args.num_features != spec.embedding_dim:
        way_out = ("a checkpoint sets its own size" if args.weights
                   else "train a checkpoint with --num_features for another")
        raise CbirError(f"--num_features {args.num_features}, but {args.weights or spec.description} gives "
                        f"{spec.embedding_dim}-d vectors ({way_out})")


def _cmd_add(args) -> int:
    items = load_items(args.path, split=args.split, project=args.project,
                       projects_in_names=args.projects, label=args.label)
    store = _open_store(args)
    # Imported once the path and Redis have answered: torch and timm take seconds to import.
    from .indexing import extractor_for_store, index_images, register_model
    from .models import create_extractor

    if args.rewrite or args.extractor or args.weights or args.input_size or not store.exists:
        extractor = create_extractor(args.extractor or DEFAULT_EXTRACTOR, weights=args.weights,
                                     input_size=args.input_size, device=args.device)
    else:
        extractor = extractor_for_store(store, device=args.device)
    _check_model_flags(args, extractor.spec)
    # Only now, with the model built and its flags checked: a mistyped --weights must not cost the database.
    if args.rewrite and store.exists:
        with store.writing():  # not under a writer still at work
            store.drop()
        print(f"--rewrite: deleted database '{args.db_name}'")
    register_model(store, extractor, weights=args.weights, chunk_size=args.chunk_size)
    print(f"{counted(len(items), 'image')} from {args.path} -> '{args.db_name}' on {describe(store.client)}, "
          f"model {extractor.spec.description}, {extractor.spec.embedding_dim}-d")
    report = index_images(store, items, extractor, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.quiet)
    rate = (report.written / report.seconds) if report.seconds else 0.0
    print(f"'{args.db_name}': {report.new} new, {report.updated} updated, "
          f"{report.unchanged} unchanged, {report.duplicates} duplicate names, {len(report.failures)} failed "
          f"in {report.seconds:.1f} s ({rate:.1f} images/s indexed); {counted(store.count(), 'image')} stored")
    return _skipped_summary(report.failures)


# ------------------------------------------------------------------ retrieve
def _cmd_retrieve(args) -> int:
    store = _open_store(args)
    store.require()
    queries = query_items(args.path, split=args.split, seed=args.seed, count=args.n_queries)
    # Imported once the database and the queries are found: torch and timm take seconds to import.
    from .indexing import DEFAULT_BATCH_SIZE, extractor_for_store
    from .retrieval import Retriever

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
        from .viz import save_retrieval_grid

        stamp = time.strftime("%Y%m%d-%H%M%S")
        picture = save_retrieval_grid(retrievals, Path(args.results_dir) / f"retrieval_{args.db_name}_{stamp}.png")
        left_out = [f"the first {PICTURE_ROWS} of {len(retrievals)} queries"] if len(retrievals) > PICTURE_ROWS else []
        neighbours = max(len(retrieval.neighbours) for retrieval in retrievals)
        if neighbours > PICTURE_COLUMNS:
            left_out.append(f"the first {PICTURE_COLUMNS} of {neighbours} neighbours")
        part = f" ({', '.join(left_out)}; --html and --json take them all)" if left_out else ""
        print(f"\npicture: {picture}{part}")
    if args.html and retrievals:
        from .viz import save_retrieval_html

        page = save_retrieval_html(retrievals, args.html, title=f"Retrieval from '{args.db_name}'")
        print(f"html: {page}")
    if args.json:
        payload = [r.to_json() for r in retrievals]
        write_text(args.json, json.dumps(payload[0] if len(payload) == 1 and queries.one_image else payload, indent=2))
        print(f"json: {args.json}")
    return _skipped_summary(failures)


# -------------------------------------------------------------------- remove
def _cmd_remove(args) -> int:
    store = _open_store(args)
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
    return _skipped_summary(failures)


# --------------------------------------------------------------- train-index
def _cmd_train_index(args) -> int:
    from .trained_index import delete_index, train_index

    store = _open_store(args)
    store.require()
    if args.delete:
        deleted = delete_index(store)
        print(f"'{args.db_name}': {'trained index deleted' if deleted else 'had no trained index'}; "
              "searches are exact")
        return 0
    print(f"training an index ({args.index}) over '{args.db_name}' on {describe(store.client)}")
    report = train_index(store, kind=args.index, nlist=args.nlist, m=args.m, breadth=args.nprobe,
                         target_recall=args.target_recall, seed=args.seed)
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


# --------------------------------------------------------------------- train
def _cmd_train(args) -> int:
    for data in filter(None, (args.training_data, args.validation_data)):
        source_path(data)  # a mistyped path refused at once, not after seconds of importing torch
    from .training import TrainConfig, train_extractor

    config = TrainConfig(
        training_data=args.training_data, out_dir=args.weights, validation_data=args.validation_data,
        val_fraction=args.val_fraction, model=args.model, weights=args.backbone_weights,
        pretrained=not args.no_pretrained, input_size=args.input_size, loss=args.loss,
        num_features=args.num_features, num_epochs=args.num_epochs, batch_size=args.batch_size,
        m_per_class=args.m_per_class, optimizer=args.optimizer, lr=args.lr, lr_proxies=args.lr_proxies,
        beta_lr=args.beta_lr, decay=args.decay, scheduler=args.scheduler, step_size=args.step_size,
        gamma=args.gamma, freeze=args.freeze, dr_model=args.dr_model, head_init=args.head_init, knn_weighting=args.knn_weighting, knn_boost=args.knn_boost,
        generalise=args.generalise, train_classes=args.train_classes, seed=args.seed, workers=args.workers,
        device=args.device, max_batches=args.max_batches, resume=args.load, overwrite=args.overwrite)
    report = train_extractor(config, progress=not args.quiet)
    best = report.best_metrics
    mean_epoch = sum(report.epoch_seconds) / max(len(report.epoch_seconds), 1)
    print(f"best epoch {report.best_epoch}: precision@1 {float(best.get('precision_at_1', 0)):.3f}, "
          f"MAP@R {float(best.get('mean_average_precision_at_r', 0)):.3f} (validation vs training images)")
    print(f"{len(report.epoch_seconds)} epoch(s) this run, {mean_epoch:.1f} s per epoch")
    if report.unseen_classes:
        print(f"unseen classes (not trained on): {', '.join(report.unseen_classes)}")
    print(f"checkpoints: {report.best} (best), {report.last} (last); log {report.log}; curves {report.curves}")
    print(f"index with it: python add_images.py --db_name DB --path DIR --weights {report.best}")
    return 0


# ------------------------------------------------------------------ pictures
def _cmd_tsne(args) -> int:
    from .overview import save_tsne

    store = _open_store(args)
    store.require()
    out = args.out or Path(args.out_dir) / f"tsne_{args.db_name}.png"
    picture = save_tsne(store, out, perplexity=args.perplexity, max_points=args.max_points,
                        by_project=args.by_project, seed=args.seed)
    print(f"t-SNE of {picture.points} images of '{args.db_name}': {picture.path}")
    return 0


def _cmd_dataset(args) -> int:
    items = load_items(args.path, split=args.split)
    from .overview import dataset_stats, save_dataset_charts  # after the path is found: they import torch
    from .viz import save_class_samples

    name = args.name or Path(args.path).stem + (f"_{args.split}" if str(args.path).endswith(".npz") else "")
    stats = dataset_stats(items, progress=not args.quiet)
    pictures = [p.path for p in save_dataset_charts(stats, args.out_dir, name)]
    pictures.append(save_class_samples(items, Path(args.out_dir) / f"{name}_samples.png", args.per_class, args.seed))
    print(f"{len(stats.labels)} images, {len(set(stats.labels))} classes, sizes "
          f"{stats.widths.min()}-{stats.widths.max()} x {stats.heights.min()}-{stats.heights.max()} px")
    for picture in pictures:
        print(f"picture: {picture}")
    return _skipped_summary(stats.failures)


# ---------------------------------------------------------------------- info
def _list_databases(client) -> int:
    names = database_names(client)
    print(f"{counted(len(names), 'database')} on {describe(client)}"
          + ("" if names else ": add images with `cbir add` (add_images.py)"))
    for name in names:
        store = VectorStore(client, name)
        try:
            store.require()
        except StoreError as exc:  # an older schema's layout, say: named, not read
            print(f"  {name:<24} {'?':>9}          {exc}")
            continue
        images = counted(store.count(), "image")
        print(f"  {name:<24} {images:>16}   {store.model_spec.get('description', '?')}")
    return 0


def _cmd_info(args) -> int:
    from .trained_index import index_info

    if args.db_name is None:
        return _list_databases(connect(args.redis_url))
    store = _open_store(args)
    info = store.describe()
    labels = store.label_counts()
    print(f"database '{info.name}' on {describe(store.client)}")
    print(f"  images: {info.count}   dim: {info.dim}   version: {info.version}")
    print(f"  model: {info.model_spec.get('description', '?')} (fingerprint {info.model})")
    print(f"  created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}")
    trained = index_info(store)
    if trained:
        print(f"  index: {trained['kind']} {trained['params']}, built at version {trained['version']}, "
              f"{int(trained['bytes']) / 2**20:.1f} MiB, recall@10 {float(trained['recall10'] or 1):.3f}")
    else:
        print("  index: exact search (no trained index; see train_index.py)")
    for label, count in sorted(labels.items()):
        print(f"  {label:<24} {count}")
    return 0


# ------------------------------------------------------------------ evaluate
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


def _cmd_evaluate(args) -> int:
    measures = list(dict.fromkeys(args.measure))
    check_protocol_options(measures, args.exclude_classes, with_queries=bool(args.path))
    items = load_items(args.path, split=args.split) if args.path else None
    store = _open_store(args)
    store.require()
    groups = _read_mapping(args.groups, "groups")
    project_groups = _read_mapping(args.project_groups, "project groups")
    # Imported once the flags, files and database are found: torch and timm take seconds to import.
    from dataclasses import replace

    import faiss
    import torch

    from .evaluation import EvaluationSettings, ProtocolOptions, Queries, Support, check_support, run_protocols
    from .indexing import extractor_for_store
    from .report import format_table, open_workbook, save_figures, write_json, write_workbook
    from .trained_index import search_index

    options = ProtocolOptions(n_queries=args.n_queries, repeats=args.repeats,
                              exclude_classes=args.exclude_classes, seed=args.seed)
    excel = Path(args.excel_path or Path(args.results_dir) / f"accuracy_{args.db_name}.xlsx")
    workbook = open_workbook(excel)
    support = Support.from_store(store, groups)
    check_support(support, f"database '{args.db_name}'")
    queries, head, failures = None, None, []
    if args.path or "interpolate" in measures:
        extractor = extractor_for_store(store, weights=args.weights, device=args.device)
        if extractor.classifier is not None:
            head = (list(extractor.spec.class_names), extractor.class_probabilities)
    if args.path:
        queries, failures = Queries.embed(items, extractor, groups, progress=not args.quiet)
    index = search_index(store, exact=args.exact)
    settings = EvaluationSettings(ks=args.k, vote=args.vote, temperature=args.temperature,
                                  project_groups=project_groups)
    results = run_protocols(measures, support, queries, index, settings, replace(options, head=head), store=store)
    what = f"{len(queries)} queries from {args.path}" if queries is not None else "the stored images (leave-one-out)"
    print(f"'{args.db_name}': {len(support)} stored images, {what}; "
          f"{'exact search' if index.kind == 'flat' else index.kind + ' index (mAP@R by exact search)'}, "
          f"kNN vote {args.vote}")
    if "interpolate" in measures:
        print("interpolate: head = " + ("the extractor's trained classifier" if head else
                                        "a logistic-regression probe fitted on the stored vectors"))
    for result in results:
        print(f"\n{result.measure}")
        print(format_table(result))
    config = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "database": args.db_name,
              "redis": describe(store.client), "model": store.model_spec.get("description", ""),
              "fingerprint": store.model, "dataset": str(args.path or "(stored images)"),
              "split": args.split if args.path else "", "index": index.kind, "k": " ".join(map(str, args.k)),
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
    return _skipped_summary(failures)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description="Content-based medical image retrieval.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add", help="index images into a database",
                              description="Embed images and store their vectors and records in Redis. "
                                          "Re-running is safe: stored images are skipped.")
    _store_arguments(add)
    _writer_arguments(add)
    _source_arguments(add, f"images to index: {SOURCES}")
    _extractor_arguments(add)
    add.add_argument("--num_features", type=COUNT, default=None,
                     help="expected embedding size (checked against the model; a checkpoint sets its own)")
    add.add_argument("--rewrite", action="store_true", help="delete this database (only this one) first")
    add.add_argument("--project", default=None,
                     help="project of every image (default: the folder's or the .npz's name; none for an image file)")
    add.add_argument("--projects", action="store_true",
                     help="class folders are named <project>_<class>: take the project from the name")
    add.add_argument("--label", default=None,
                     help="label of every image: of a single image file (default: its folder's name) or of "
                          "all files under a folder, sub-folders too (default: one class per sub-folder)")
    add.add_argument("--batch_size", type=COUNT, default=32, help="images per model batch (default: 32)")
    add.add_argument("--workers", type=NON_NEGATIVE, default=None,
                     help="decoding threads, or processes when the model runs on a GPU (default: one per core; "
                          "0 decodes in the main thread)")
    add.add_argument("--chunk_size", type=COUNT, default=None,
                     help="vectors per Redis chunk key of a new database (default: what fits in 512 KiB)")
    add.add_argument("--quiet", action="store_true", help="no progress bar")
    add.set_defaults(run=_cmd_add, after_stop="what was stored is kept; re-run the same command to add the rest")

    retrieve = commands.add_parser("retrieve", help="find the stored images most similar to a query",
                                   description="Print the nearest stored images of a query image (or of one "
                                               "random image per class of a folder/.npz, or of every image of "
                                               "a folder without sub-folders), their kNN vote, and save a picture.")
    _store_arguments(retrieve)
    _source_arguments(retrieve, "an image (or DICOM file); a folder with one sub-folder per class or a "
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
    retrieve.set_defaults(run=_cmd_retrieve)

    remove = commands.add_parser("remove", help="delete images by name, label or content",
                                 description="Delete images (record, name and vector) from a database; "
                                             "they are never returned again. Names, labels and files that "
                                             "match nothing are listed.")
    _store_arguments(remove)
    _writer_arguments(remove)
    remove.add_argument("--name", nargs="+", default=[], help="image names (as stored, e.g. benign/x.png)")
    remove.add_argument("--label", nargs="+", default=[], help="remove every image of these labels")
    remove.add_argument("--path", default=None,
                        help="remove every stored image with the content (sha256) of a file here, whatever its "
                             "name: an image file, a folder (all files under it) or an .npz")
    remove.add_argument("--split", choices=NPZ_SPLITS, default="train", help="split of an .npz --path")
    remove.set_defaults(run=_cmd_remove, after_stop="what was removed stays removed; re-run the same command "
                                                  "to remove the rest")

    train_index = commands.add_parser("train-index", help="train a FAISS index for approximate search",
                                      description="Read the database's vectors, train a FAISS index (cosine "
                                                  "similarity), tune its search breadth against exact search "
                                                  "and store it in Redis; later searches use it, kept up to "
                                                  "date with later additions and removals.")
    _store_arguments(train_index)
    _writer_arguments(train_index)
    train_index.add_argument("--index", default="ivf", choices=INDEX_KINDS,
                             help="ivf (IVF-Flat, default), ivfpq (compressed 8-bit PQ codes; its candidates are "
                                  "re-ranked by their vectors in Redis), hnsw, or flat (exact)")
    train_index.add_argument("--nlist", type=COUNT, default=None,
                             help="inverted lists of ivf/ivfpq (default: about 4·sqrt(N))")
    train_index.add_argument("--nprobe", type=COUNT, default=None,
                             help="search breadth: lists visited (ivf/ivfpq) or efSearch (hnsw); "
                                  "default: the smallest that reaches --target_recall")
    train_index.add_argument("--m", type=COUNT, default=None,
                             help="ivfpq: sub-quantisers (code bytes per vector; default up to 32); "
                                  "hnsw: links per node (32)")
    train_index.add_argument("--target_recall", type=_real(0, 1, above=True), default=0.95,
                             help="recall@10 against exact search that tuning aims for (default: 0.95)")
    train_index.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the training and tuning samples")
    train_index.add_argument("--delete", action="store_true",
                             help="delete the trained index (searches become exact)")
    train_index.add_argument("--json", type=OUTPUT_FILE, default=None,
                             help="also write the report as JSON to this file")
    train_index.set_defaults(run=_cmd_train_index, after_stop="the index trained before, if any, is kept")

    train = commands.add_parser("train", help="train a metric-learned feature extractor",
                                description="Fine-tune a backbone with an embedding head so images of the same "
                                            "class embed close together (pytorch-metric-learning losses, "
                                            "class-balanced batches); validation every epoch; best and last "
                                            "self-describing checkpoints in --weights.")
    train.add_argument("--training_data", required=True, help="class-per-folder directory or MedMNIST-style .npz")
    train.add_argument("--validation_data", default=None,
                       help="validation folder (default: the .npz val split, else a stratified --val_fraction)")
    train.add_argument("--val_fraction", type=_real(0, 1, below=True), default=0.15,
                       help="hold-out share of a folder (default: 0.15)")
    train.add_argument("--weights", type=OUTPUT_FOLDER, required=True,
                       help="output folder for checkpoints, log and curves")
    train.add_argument("--model", default="densenet121",
                       help="backbone (default densenet121; efficientnet_lite0 has offline ImageNet weights)")
    train.add_argument("--backbone_weights", default=None, help="backbone weights file to start from (e.g. KimiaNet)")
    train.add_argument("--no_pretrained", action="store_true", help="start from random weights")
    train.add_argument("--input_size", type=COUNT, default=None, help="image side in pixels (default: the backbone's)")
    train.add_argument("--loss", default="margin", choices=LOSSES, help="metric-learning loss (default: margin)")
    train.add_argument("--num_features", type=_whole(1, MAX_EMBEDDING_DIM), default=128,
                       help=f"embedding size (default: 128, at most {MAX_EMBEDDING_DIM})")
    train.add_argument("--num_epochs", type=COUNT, default=10, help="epochs (default: 10)")
    train.add_argument("--batch_size", type=_whole(2), default=32,
                       help="images per batch, 2 or more: metric losses compare images (default: 32)")
    train.add_argument("--m_per_class", type=COUNT, default=4, help="images per class in a batch (default: 4)")
    train.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="default: adamw")
    train.add_argument("--lr", type=POSITIVE, default=1e-4, help="learning rate of the model (default: 1e-4)")
    train.add_argument("--lr_proxies", type=POSITIVE, default=1e-2, help="learning rate of proxies/class weights")
    train.add_argument("--beta_lr", type=POSITIVE, default=1e-2, help="learning rate of the margin loss's beta")
    train.add_argument("--decay", type=NON_NEGATIVE_REAL, default=1e-4, help="weight decay (default: 1e-4)")
    train.add_argument("--scheduler", default="cosine", choices=SCHEDULERS, help="learning-rate schedule")
    train.add_argument("--step_size", type=COUNT, default=5, help="epochs per step of the step scheduler")
    train.add_argument("--gamma", type=POSITIVE, default=0.5, help="decay factor of step/exponential schedulers")
    train.add_argument("--freeze", action="store_true", help="freeze the backbone: train the head only")
    train.add_argument("--head_init", default="pca", choices=["pca", "random"],
                       help="pca (default): the head starts as a projection onto the training features' principal "
                            "components and class weights at class means, so training starts from the pretrained "
                            "geometry; random: from scratch")
    train.add_argument("--dr_model", action="store_true",
                       help="Deep Ranking multi-scale model: backbone + two shallow branches on 4:1 and 8:1 "
                            "sub-sampled images, concatenated and projected")
    train.add_argument("--knn_weighting", action="store_true",
                       help="examples that kNN on the current embedding gets wrong weigh 1+--knn_boost")
    train.add_argument("--knn_boost", type=NON_NEGATIVE_REAL, default=1.0, help="extra weight of kNN-misclassified examples")
    train.add_argument("--generalise", action="store_true",
                       help="train on a subset of classes (--train_classes, default a seeded half); the rest "
                            "stay unseen for testing")
    train.add_argument("--train_classes", nargs="+", default=[], help="the classes --generalise trains on")
    train.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of everything random (default: 0)")
    train.add_argument("--workers", type=NON_NEGATIVE, default=None, help="decoding processes (default: min(4, cores))")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--max_batches", type=COUNT, default=None, help="batches per epoch at most (quick runs)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--load", "--resume", dest="load", action="store_true",
                       help="resume the run in --weights from its last finished epoch; a larger "
                            "--num_epochs trains on, the learning-rate schedule stretched to it; the flags that "
                            "shape the model (--model, --input_size, --num_features, --loss, --optimizer, "
                            "--freeze, --dr_model) and the classes must stay as they were")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --weights (without it or --load, a folder holding "
                            "checkpoints is refused: databases built with them find them there)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=_cmd_train, after_stop="the checkpoints of the last finished epoch are kept; re-run the "
                                                "same command with --load to resume")

    tsne = commands.add_parser("tsne", help="t-SNE picture of a database's vectors",
                               description="2-D t-SNE (PCA to 50 dims first) of the stored vectors, coloured by "
                                           "class; large databases are sampled (stratified, seeded).")
    _store_arguments(tsne)
    tsne.add_argument("--perplexity", type=POSITIVE, default=30.0, help="t-SNE perplexity (default: 30)")
    tsne.add_argument("--max_points", type=_whole(MIN_TSNE_POINTS), default=5000,
                      help="sample size for large databases (default: 5000)")
    tsne.add_argument("--by_project", action="store_true", help="add a second panel coloured by project")
    tsne.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the sample and of t-SNE")
    tsne.add_argument("--out", type=PICTURE_FILE, default=None,
                      help="picture to write, .png, .pdf, .svg, ... (default: <out_dir>/tsne_<db_name>.png)")
    tsne.add_argument("--out_dir", type=OUTPUT_FOLDER, default=Path("data_visualization"),
                      help="default folder of --out")
    tsne.set_defaults(run=_cmd_tsne)

    dataset = commands.add_parser("dataset", help="overview pictures of a folder or .npz of images",
                                  description="Images per class, image sizes, mean intensities per class, and a "
                                              "grid of sample images per class.")
    _source_arguments(dataset, f"the dataset: {SOURCES}")
    dataset.add_argument("--out_dir", type=OUTPUT_FOLDER, default=Path("data_visualization"),
                         help="where pictures go (default: data_visualization)")
    dataset.add_argument("--name", default=None, help="file name prefix (default: the source's name)")
    dataset.add_argument("--per_class", type=_whole(1, SAMPLE_COLUMNS), default=6,
                         help=f"sample images per class in the grid (default: 6, at most {SAMPLE_COLUMNS})")
    dataset.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the sample images")
    dataset.add_argument("--quiet", action="store_true", help="no progress bar")
    dataset.set_defaults(run=_cmd_dataset)

    info = commands.add_parser("info", help="describe a database, or list the databases")
    _store_arguments(info, db_help="the database to describe (default: list every database on this Redis with its "
                                   "image count and model)")
    info.set_defaults(run=_cmd_info)

    evaluate = commands.add_parser("evaluate", help="retrieval and kNN accuracy protocols, into Excel",
                                   description="Search the database with labelled query images (or its own "
                                               "images, leave-one-out) and report top-1/top-5/majority@5, "
                                               "precision@k, mAP@R and kNN classification for each protocol; "
                                               "a terminal table, an Excel workbook and pictures.")
    _store_arguments(evaluate)
    evaluate.add_argument("--path", default=None,
                          help="query images with labels: a class-per-folder directory or an .npz (see --split); "
                               "not needed for loo, incremental, removal and interpolate (then the stored images "
                               "query the others)")
    evaluate.add_argument("--split", default="test", choices=NPZ_SPLITS, help="split of a .npz (default: test)")
    evaluate.add_argument("--measure", nargs="+", default=["all"], choices=MEASURES,
                          help="protocols: all, weighted (class-balanced), random (one per class in turn), stat "
                               "(random repeated), separated (per class), remove (--exclude_classes left out), "
                               "loo, incremental (continual learning), removal (data deletion), interpolate "
                               "(classifier head + kNN probabilities, λ chosen on validation); default: all")
    evaluate.add_argument("--k", nargs="+", type=COUNT, default=[1, 5, 11], help="kNN classification k (default: 1 5 11)")
    evaluate.add_argument("--vote", default="majority", choices=VOTES,
                          help="kNN vote: majority, distance (similarity-weighted) or softmax (temperature)")
    evaluate.add_argument("--temperature", type=POSITIVE, default=0.07, help="softmax vote temperature (default: 0.07)")
    evaluate.add_argument("--n_queries", type=COUNT, default=100, help="queries of random/stat (default: 100)")
    evaluate.add_argument("--repeats", type=COUNT, default=10, help="repeats of stat (default: 10)")
    evaluate.add_argument("--exclude_classes", nargs="+", default=[], help="classes the remove protocol leaves out")
    evaluate.add_argument("--groups", default=None,
                          help="CSV name,group (patient or slide id): neighbours from a query's own group are skipped")
    evaluate.add_argument("--project_groups", default=None,
                          help="CSV project,group: 'similar project' hits count neighbours of the same group")
    evaluate.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of random/stat/incremental/removal (default: 0)")
    evaluate.add_argument("--exact", action="store_true", help="exact search even if an index was trained")
    evaluate.add_argument("--excel_path", type=WORKBOOK_FILE, default=None,
                          help="workbook to write or extend (default: <results_dir>/accuracy_<db_name>.xlsx)")
    evaluate.add_argument("--name", default=None, help="sheet name of this run (default: the measure)")
    evaluate.add_argument("--results_dir", type=OUTPUT_FOLDER, default=Path("results"),
                          help="where the workbook and pictures go")
    evaluate.add_argument("--json", type=OUTPUT_FILE, default=None, help="also write the numbers as JSON to this file")
    evaluate.add_argument("--no_picture", action="store_true", help="no confusion matrices or curves")
    evaluate.add_argument("--weights", default=None, help="the database's checkpoint, if it moved")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_cmd_evaluate)
    for command_parser in (parser, *commands.choices.values()):
        command_parser.epilog = EXIT_STATUSES
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        with interrupts.as_exceptions():
            return args.run(args)
    except CbirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output left (`cbir info | head`): stop as quietly as it did
        # Python flushes stdout once more at exit; pointing it at /dev/null keeps that from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OUTPUT_CLOSED
    except OSError as exc:  # a file the checks before the work could not foresee (a full disk, /proc)
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"error: {exc}",
              file=sys.stderr)
        return 2
    except (KeyboardInterrupt, interrupts.Terminated) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
        print(f"{reason}: {getattr(args, 'after_stop', 'no database was changed')}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM


def command(name: str) -> None:
    """Entry of a root script: ``python add_images.py ARGS`` == ``cbir add ARGS``."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
