"""The library's face: open a database, add images, search, remove, evaluate, train.

The command line (:mod:`cbir.cli`) is a thin shell over these functions: it parses flags, calls
one of them and prints what it returns. A notebook or a service calls them the same way::

    from cbir import api

    store = api.open_database("busi")                         # embedded Redis unless redis_url
    items = api.load_items("../shared/data/busi")
    report = api.add(store, items, api.model_for_add(store))
    retrievals, failures = api.search(store, api.load_items("query.png"), k=5)

Heavy modules (torch, timm, FAISS) are imported by the functions that need them, so that importing
this module, or asking a command for ``--help``, stays quick.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from cbir.errors import CbirError
from cbir.images.sources import ImageItem, content_digests, every_item, load_items, query_items
from cbir.options import DEFAULT_EXTRACTOR, DEFAULT_NEIGHBOURS
from cbir.store.database import DatabaseInfo, VectorStore, database_names
from cbir.store.layout import ImageRecord
from cbir.store.redis.connect import connect
from cbir.store.redis.connect import describe as describe_client
from cbir.store.redis.connect import make_durable as make_servers_durable

if TYPE_CHECKING:
    from cbir.evaluation.protocols import ProtocolResult
    from cbir.models.extractor import Extractor
    from cbir.pipeline.distributed import RayCluster
    from cbir.pipeline.ingest import IndexReport
    from cbir.pipeline.retrieve import Retrieval, Retriever
    from cbir.search.persisted import TrainReport
    from cbir.training.config import TrainConfig

__all__ = ["open_database", "list_databases", "Databases", "where", "load_items", "query_items", "model_for_add",
           "start_over", "add", "backfill_thumbnails", "Backfill", "make_durable", "retriever", "search", "remove", "Removal", "describe",
           "Description", "train_index", "delete_index", "evaluate", "train", "tsne", "dataset_pictures",
           "DEFAULT_EXTRACTOR"]

def open_database(name: str = "db", redis_url: str | None = None, lock_wait: float = 0.0) -> VectorStore:
    """The database ``name`` on the Redis at ``redis_url`` (default: ``$CBIR_REDIS_URL``, else the
    embedded server under ``$CBIR_HOME``); writers wait up to ``lock_wait`` s for another writer."""
    return VectorStore(connect(redis_url), name, lock_wait=lock_wait)


@dataclass
class Databases:
    where: str  # the Redis, in words
    stores: list[VectorStore]  # one per database, by name


def list_databases(redis_url: str | None = None) -> Databases:
    """Every database on the Redis at ``redis_url`` (found with SCAN, on every node of a Cluster)."""
    client = connect(redis_url)
    return Databases(describe_client(client), [VectorStore(client, name) for name in database_names(client)])


def where(store: VectorStore) -> str:
    """The Redis a store lives on, in words (its URL without the password, or the embedded server's folder)."""
    return describe_client(store.client)


@dataclass
class Description:
    info: DatabaseInfo
    labels: dict[str, int]  # images per label
    index: dict  # the trained index's metadata; empty where searches are exact


def describe(store: VectorStore) -> Description:
    """What a database holds: counts, model, version, images per label, its trained index."""
    from cbir.search.persisted import index_info

    info = store.describe()
    return Description(info=info, labels=dict(store.label_counts()), index=index_info(store))


def model_for_add(store: VectorStore, architecture: str | None = None, weights: str | None = None,
                  input_size: int | None = None, device: str | None = None, num_features: int | None = None,
                  fresh: bool = False, pooling: str | None = None, flip: bool = False) -> Extractor:
    """The extractor an ``add`` uses: the one asked for, else the database's own, else the default.
    A self-describing checkpoint sets the model: arguments that say otherwise are refused, not ignored.
    ``fresh``: the database is about to be started over, so its own model does not count.
    ``pooling`` ("avg", "gem") and ``flip`` (mirror-image test-time augmentation): see docs/QUALITY.md."""
    from cbir.models.factory import create_extractor
    from cbir.pipeline.model import extractor_for_store

    if fresh or architecture or weights or input_size or pooling or flip or not store.exists:
        extractor = create_extractor(architecture or DEFAULT_EXTRACTOR, weights=weights, input_size=input_size,
                                     device=device, pooling=pooling or "avg", flip=flip)
    else:
        extractor = extractor_for_store(store, device=device)
    _check_model_arguments(extractor.spec, architecture, weights, input_size, num_features)
    return extractor


def _check_model_arguments(spec, architecture: str | None, weights: str | None, input_size: int | None,
                           num_features: int | None) -> None:
    from cbir.models.registry import resolve_backbone

    if architecture and resolve_backbone(architecture).name != spec.architecture:
        raise CbirError(f"--extractor {architecture}, but {weights} is a checkpoint of {spec.architecture}; "
                        "leave --extractor out (a checkpoint describes its model)")
    if input_size and input_size != spec.input_size:
        raise CbirError(f"--input-size {input_size}, but {weights} takes {spec.input_size} px "
                        "images; leave --input-size out (a checkpoint describes its model)")
    if num_features and num_features != spec.embedding_dim:
        way_out = "a checkpoint sets its own size" if weights else "train a checkpoint with --num-features for another"
        raise CbirError(f"--num-features {num_features}, but {weights or spec.description} gives "
                        f"{spec.embedding_dim}-d vectors ({way_out})")


def start_over(store: VectorStore) -> bool:
    """Delete the database (only this one), once no other writer is at work; whether it existed."""
    if not store.exists:
        return False
    with store.writing():
        store.drop()
    return True


def add(store: VectorStore, items: Sequence[ImageItem], extractor: Extractor, weights: str | None = None,
        chunk_size: int | None = None, batch_size: int = 32, workers: int | None = None,
        progress: bool = True, update: bool = False, durable: bool = False, thumbnails: bool = True,
        ray: RayCluster | None = None, redis_url: str | None = None) -> IndexReport:
    """Embed ``items`` and store them. Re-running is safe: images stored with the same content are
    skipped before the model sees them; unreadable files are listed in the report's failures. A
    stored name with other content is never replaced silently: it is a conflict in the report,
    unless ``update`` asks for the new content to replace it. ``durable``: see :func:`make_durable`.
    ``thumbnails``: a small picture of each image stored with it (for pages showing neighbours).
    ``ray``: decode and embed on the workers of a Ray cluster (``workers`` is then ignored: the
    cluster says how many), which reach the database by ``redis_url`` (the one it was opened
    with; the embedded Redis is reached by the workers of a local Ray only)."""
    from cbir.pipeline.ingest import index_images
    from cbir.pipeline.model import register_model

    if durable:
        make_durable(store)
    register_model(store, extractor, weights=weights, chunk_size=chunk_size)
    if ray is not None:
        from cbir.pipeline.distributed import index_images_on_ray
        from cbir.store.redis.connect import is_embedded, url_for_others

        if ray.address and is_embedded(store.client):
            raise CbirError(f"the workers of the Ray cluster at {ray.address} cannot reach this machine's embedded "
                            "Redis: give the database's Redis by --redis-url (a server or Cluster they reach)")

        return index_images_on_ray(store, items, url_for_others(store.client, redis_url), ray, batch_size=batch_size,
                                   progress=progress, update=update, thumbnails=thumbnails)
    return index_images(store, items, extractor, batch_size=batch_size, workers=workers, progress=progress,
                        update=update, thumbnails=thumbnails)


def make_durable(store: VectorStore) -> None:
    """Writes to ``store`` acknowledged only once on disk (Redis ``appendfsync always``): the embedded
    server is set so; a server of the user's own is checked, and refused with the fix where it is not."""
    store.call("configuring", make_servers_durable, store.client)


@dataclass
class Backfill:
    made: int = 0
    bytes: int = 0  # of the thumbnails made
    failures: list[str] = field(default_factory=list)  # "source: reason" of each image left without one


def backfill_thumbnails(store: VectorStore, progress: bool = True) -> Backfill:
    """Thumbnails for the stored images that have none (a database built before they existed),
    made from each image's source file as recorded; a source gone or changed since is listed."""
    from tqdm import tqdm

    from cbir.errors import ImageError
    from cbir.images.thumbnails import thumbnail

    store.require()
    have = store.thumbnail_ids()
    todo = [(image_id, record) for image_id, record in store.iter_records() if image_id not in have]
    report = Backfill()
    with store.writing():
        for start in tqdm(range(0, len(todo), 64), desc=f"thumbnails of '{store.name}'", disable=not progress):
            ids, made = [], []
            for image_id, record in todo[start:start + 64]:
                item = ImageItem(name=record.name, label=record.label, project=record.project, location=record.source)
                try:
                    image, digest = item.read()
                except ImageError as exc:
                    report.failures.append(str(exc))
                    continue
                if record.sha256 and digest != record.sha256:
                    report.failures.append(f"{record.source}: changed since it was stored as {record.name}")
                    continue
                ids.append(image_id)
                made.append(thumbnail(image))
            if ids:
                store.set_thumbnails(ids, made)
                report.made += len(ids)
                report.bytes += sum(map(len, made))
    return report


def retriever(store: VectorStore, weights: str | None = None, device: str | None = None,
              exact: bool = False, rerank: bool = False) -> Retriever:
    """A searcher of ``store`` with the extractor that built it and its trained index (unless ``exact``);
    ``rerank``: k-reciprocal re-ranking of each query's nearest candidates."""
    from cbir.pipeline.model import extractor_for_store
    from cbir.pipeline.retrieve import Retriever

    store.require()
    started = time.perf_counter()
    extractor = extractor_for_store(store, weights=weights, device=device)
    built = time.perf_counter() - started
    searcher = Retriever(store, extractor, exact=exact, rerank=rerank)
    searcher.timings["model"] = built
    return searcher


def search(store: VectorStore, items: Sequence[ImageItem], k: int = DEFAULT_NEIGHBOURS, exact: bool = False,
           known_labels: bool = True, weights: str | None = None, device: str | None = None,
           progress: bool = False, rerank: bool = False) -> tuple[list[Retrieval], list[str]]:
    """The ``k`` nearest stored images of each readable item, with their kNN vote; and the
    failures (``file: reason``) of the others."""
    return retriever(store, weights, device, exact, rerank).query(items, k=k, known_labels=known_labels, progress=progress)


@dataclass
class Removal:
    removed: list[ImageRecord]
    missing_names: list[str] = field(default_factory=list)  # asked for, not stored
    missing_labels: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # files whose content no stored image has
    given: int = 0  # files (or .npz images) whose content was asked for
    failures: list[str] = field(default_factory=list)  # unreadable files


def remove(store: VectorStore, names: Iterable[str] = (), labels: Iterable[str] = (), path: str | None = None,
           split: str = "train", durable: bool = False, ids: Iterable[int] = (),
           digests: Iterable[str] = ()) -> Removal:
    """Delete images by name, by label, by id, or by content: that of the files under ``path`` or
    the sha256 ``digests`` given. What matched nothing is said, not an error (a removal run again
    finds nothing, and succeeds)."""
    names, labels, ids = list(names), list(labels), [int(i) for i in ids]
    store.require()
    found, failures = content_digests(every_item(path, split=split)) if path else ({}, [])
    for digest in digests:
        found.setdefault(digest.lower(), []).append(f"sha256:{digest.lower()}")
    if not (names or labels or ids or found or path):
        raise CbirError("nothing to remove: name the images, their labels or their content")
    if durable:
        make_durable(store)
    with store.writing():
        removed = store.remove(ids) if ids else []
        removed += store.remove_names(names) if names else []
        removed += store.remove_matching(labels, found) if labels or found else []
    removed_digests = {record.sha256 for record in removed}
    return Removal(removed=removed, failures=failures,
                   missing_names=sorted(set(names) - {record.name for record in removed}),
                   missing_labels=sorted(set(labels) - {record.label for record in removed}),
                   unmatched=[name for digest, named in found.items() if digest not in removed_digests
                              for name in named],
                   given=sum(map(len, found.values())))


def train_index(store: VectorStore, kind: str = "ivf", durable: bool = False, **options) -> TrainReport:
    """Train a FAISS index over the stored vectors, tune it against exact search and store it in
    Redis (see :func:`cbir.search.persisted.train_index` for the options)."""
    from cbir.search.persisted import train_index as train_and_store

    store.require()
    if durable:
        make_durable(store)
    return train_and_store(store, kind=kind, **options)


def delete_index(store: VectorStore) -> bool:
    """Delete the trained index (searches become exact); whether there was one."""
    from cbir.search.persisted import delete_index as delete

    store.require()
    return delete(store)


def evaluate(store: VectorStore, measures: Sequence[str], settings, options, items: Sequence[ImageItem] | None = None,
             groups: dict[str, str] | None = None, exact: bool = False, weights: str | None = None,
             device: str | None = None, progress: bool = True, rerank: bool = False) -> tuple[list[ProtocolResult], dict]:
    """Accuracy protocols over ``store`` (leave-one-out and the like) or with labelled query
    ``items``; returns their results and what they ran on (queries, index kind, head, failures).
    ``rerank``: the query-based protocols and leave-one-out search with k-reciprocal re-ranking."""
    from dataclasses import replace

    from cbir.evaluation.protocols import check_support, run_protocols
    from cbir.evaluation.ranking import Queries, Support
    from cbir.pipeline.model import extractor_for_store
    from cbir.search.persisted import search_index

    store.require()
    support = Support.from_store(store, groups)
    check_support(support, f"database '{store.name}'")
    queries, head, failures = None, None, []
    if items is not None or "interpolate" in measures:
        extractor = extractor_for_store(store, weights=weights, device=device)
        if extractor.classifier is not None:
            head = (list(extractor.spec.class_names), extractor.class_probabilities)
        if items is not None:
            queries, failures = Queries.embed(items, extractor, groups, progress=progress)
    index = search_index(store, exact=exact)
    if rerank:
        from cbir.search.rerank import reranked

        index = reranked(index, store)
    results = run_protocols(measures, support, queries, index, settings, replace(options, head=head), store=store)
    return results, {"support": len(support), "queries": None if queries is None else len(queries),
                     "index": index.kind, "head": head is not None, "failures": failures}


def train(config: TrainConfig, progress: bool = True):
    """Train a metric-learned extractor (see :class:`cbir.training.config.TrainConfig`)."""
    from cbir.training.loop import train_extractor

    return train_extractor(config, progress=progress)


def tsne(store: VectorStore, path, perplexity: float = 30.0, max_points: int = 5000, by_project: bool = False,
         seed: int = 0):
    """A 2-D t-SNE picture of the stored vectors at ``path``, coloured by class (and by project);
    a PNG, SVG or JPEG one is also kept with the database, where the service's page shows it."""
    from cbir.viz.overview import save_tsne

    store.require()
    picture = save_tsne(store, path, perplexity=perplexity, max_points=max_points, by_project=by_project, seed=seed)
    if picture.path.suffix.lower() in SHOWN_PICTURES:  # kept in Redis too, for the service's page
        store.set_picture(f"tsne{picture.path.suffix.lower()}", picture.path.read_bytes())
    return picture


SHOWN_PICTURES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def dataset_pictures(items: Sequence[ImageItem], directory, name: str, per_class: int = 6, seed: int = 0,
                     progress: bool = True):
    """Charts of a dataset (images per class, sizes, intensities) and a grid of samples per class;
    returns the statistics and the pictures' paths."""
    from pathlib import Path

    from cbir.viz.overview import dataset_stats, save_dataset_charts
    from cbir.viz.pictures import save_class_samples

    stats = dataset_stats(items, progress=progress)
    pictures = [picture.path for picture in save_dataset_charts(stats, directory, name)]
    pictures.append(save_class_samples(items, Path(directory) / f"{name}_samples.png", per_class, seed))
    return stats, pictures

