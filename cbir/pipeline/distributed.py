"""`add --engine ray`: decoding and the model spread over the workers of a Ray cluster.

Ray Data splits the items into blocks and streams them, with back-pressure, through a pool of
actors; each actor builds the database's extractor once, then per batch reads and hashes the
files, leaves out those the database already holds with the same content (before the model sees
them), decodes and embeds the rest. Vectors, records and thumbnails come back to this process,
the one writer: it holds the database's lock for the whole run and stores every batch through the
same write path as a local ``add`` (:func:`cbir.pipeline.ingest.index_images`), so ids, the
journal and the consistency rules are the same. Ray retries the batches of a worker that dies
(the actor is restarted), and the writer's plan skips whatever is already stored, so every image
is stored once however often a batch is embedded.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from cbir import interrupts
from cbir.errors import CbirError, StoreError
from cbir.images.sources import ImageItem, printable
from cbir.models.threads import ONE_ARENA, torch_thread
from cbir.pipeline.embed import DEFAULT_BATCH_SIZE, decode_batches
from cbir.pipeline.ingest import BackgroundWriter, IndexReport, write_batch
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord

_TEXT_COLUMNS = ("name", "label", "project", "location")
# Model batches per Ray task: fewer, larger tasks spread Ray's cost per task (scheduling, moving
# the block) over more images; a lost worker's task is done again whole.
BATCHES_PER_TASK = 8



@dataclass(frozen=True)
class RayCluster:
    """Where and how wide: ``address`` None starts a local Ray on this machine (stopped after the
    run); ``workers`` None: as many as the cluster's CPUs (or GPUs) allow."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float | None = None  # default: every core of this machine for a local Ray, else 4
    gpus_per_worker: float = 0.0


class Embedder:
    """A Ray Data actor: the database's extractor, built once, over batches of items."""

    def __init__(self, redis_url: str, db_name: str, update: bool, thumbnails: bool, batch_size: int):
        from cbir.pipeline.model import extractor_for_store
        from cbir.store.redis.connect import connect

        self.store = VectorStore(connect(redis_url), db_name)
        # Ray calls an actor from threads of its own: the model is built and run on one thread
        # (and the worker has one malloc arena, ONE_ARENA: see cbir.models.threads).
        self.torch = torch_thread()
        # On the device Ray gave this worker: a GPU where it has one (CUDA_VISIBLE_DEVICES), else the CPU.
        self.extractor = self.torch.submit(extractor_for_store, self.store).result()
        self.update, self.thumbnails, self.batch_size = update, thumbnails, batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.torch.submit(self._embedded, rows).result()

    def _embedded(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [ImageItem(*(str(rows[column][i]) for column in _TEXT_COLUMNS)) for i in range(len(rows["name"]))]
        count, dim = len(items), self.extractor.spec.embedding_dim
        out = {"sha256": np.full(count, "", object), "failure": np.full(count, "", object),
               "embedded": np.zeros(count, bool), "vector": np.zeros((count, dim), np.float32),
               "thumbnail": np.full(count, b"", object)}
        batches = decode_batches(items, self.extractor.preprocess, self.batch_size, thumbnails=self.thumbnails)
        for first, batch in zip(range(0, count, self.batch_size), batches):  # one batch per range, in order
            if batch.failures:
                decoded = set(batch.positions)
                failed = [p for p in range(first, min(first + self.batch_size, count)) if p not in decoded]
                out["failure"][failed] = batch.failures  # both in item order
            if not batch.positions:
                continue
            out["sha256"][batch.positions] = batch.sha256
            if batch.thumbnails is not None:
                out["thumbnail"][batch.positions] = batch.thumbnails
            wanted = self._to_embed([items[p].name for p in batch.positions], batch.sha256)
            if wanted:
                rows_wanted = [batch.positions[k] for k in wanted]
                out["vector"][rows_wanted] = self.extractor.embed(batch.images[wanted])
                out["embedded"][rows_wanted] = True
        return {**{column: rows[column] for column in _TEXT_COLUMNS}, **out}

    def _to_embed(self, names: list[str], digests: list[str]) -> list[int]:
        """Positions of the images the writer will store: not stored under their name, or stored
        with other content and ``update``. (The writer holds the lock, so nothing else changes.)"""
        ids = self.store.lookup(names)
        stored = self.store.records([i for i in ids if i is not None])
        digest_of = {record.name: record.sha256 for record in stored if record is not None}
        return [k for k, (name, digest) in enumerate(zip(names, digests))
                if name not in digest_of or (self.update and digest_of[name] != digest)]


def index_images_on_ray(store: VectorStore, items: Sequence[ImageItem], redis_url: str, cluster: RayCluster,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, update: bool = False,
                        thumbnails: bool = True) -> IndexReport:
    """:func:`cbir.pipeline.ingest.index_images` with decoding and the model on Ray's workers, which
    reach the database at ``redis_url``. The database's model must be registered."""
    report = IndexReport(total=len(items))
    if not items:  # nothing for Ray to do: not worth starting it
        return report
    ray = _ray()
    started_here = _start_ray(cluster)
    try:
        with store.writing(), store.lock_kept(), interrupts.held():
            started = time.perf_counter()
            rows = _embedded_rows(store, items, redis_url, cluster, batch_size, update, thumbnails)
            with tqdm(total=len(items), unit="img", desc=f"indexing into '{store.name}' on Ray",
                      disable=not progress) as bar, BackgroundWriter(store) as writer:
                for batch in rows:
                    interrupts.check()
                    _store_batch(store, batch, update, thumbnails, writer, report)
                    bar.set_postfix(new=report.new, skipped=report.unchanged, failed=len(report.failures),
                                    refresh=False)
                    bar.update(len(batch["name"]))
            report.seconds = time.perf_counter() - started
    finally:
        if started_here:
            ray.shutdown()
    return report


def _embedded_rows(store, items, redis_url, cluster, batch_size, update, thumbnails):
    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts stored images
    context.execution_options.preserve_order = True  # ids in the order of the files, as a local add
    workers, cpus = _width(cluster)
    block = batch_size * BATCHES_PER_TASK
    source = ray.data.from_items([{column: getattr(item, column) for column in _TEXT_COLUMNS} for item in items],
                                 override_num_blocks=max(1, -(-len(items) // block)))
    # Ray Data restarts an actor that dies and retries its batches (its defaults for actor pools).
    embedded = source.map_batches(
        Embedder, batch_size=block, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus, num_gpus=cluster.gpus_per_worker or None, runtime_env={"env_vars": ONE_ARENA},
        fn_constructor_kwargs={"redis_url": redis_url, "db_name": store.name, "update": update,
                               "thumbnails": thumbnails, "batch_size": batch_size})
    return embedded.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def _store_batch(store: VectorStore, batch: dict, update: bool, thumbnails: bool, writer: BackgroundWriter,
                 report: IndexReport) -> None:
    report.failures += [failure for failure in batch["failure"] if failure]
    good = [row for row, failure in enumerate(batch["failure"]) if not failure]
    if not good:
        return
    now = time.time()
    records = [ImageRecord(name=str(batch["name"][row]), label=str(batch["label"][row]),
                           project=str(batch["project"][row]), sha256=str(batch["sha256"][row]),
                           source=printable(str(batch["location"][row])), added=now) for row in good]

    def vectors(positions: list[int]) -> np.ndarray:
        rows = [good[position] for position in positions]
        if not batch["embedded"][rows].all():  # a worker judged stored what the writer would store
            raise StoreError(f"database '{store.name}' changed under its writer: run the add again")
        return batch["vector"][rows]

    write_batch(store, writer, report, records, update,
                [bytes(batch["thumbnail"][row]) for row in good] if thumbnails else None, vectors)


def _start_ray(cluster: RayCluster) -> bool:
    """Connect to the cluster, or start a local Ray; whether this process started it (and stops it)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                   configure_logging=True)
    # Starting, Ray sets a SIGTERM handler of its own (exit at once): the command's (stop after the
    # batch in flight, as a local add does) is put back.
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cluster.address:
            ray.init(address=cluster.address, **options)
        else:
            ray.init(num_cpus=os.cpu_count(), num_gpus=_local_gpus(), **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CbirError(f"cannot start Ray{' at ' + cluster.address if cluster.address else ''}: {exc}") from exc
    finally:
        if threading.current_thread() is threading.main_thread():
            for number, handler in handlers.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)
    return True


def _ray():
    """Ray, imported with its own logs left in its session folder (/tmp/ray): a user sees ours.
    (It reads these settings when imported.)"""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray
    import ray.data  # noqa: F401  (configures its logging when imported)

    return ray


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _width(cluster: RayCluster) -> tuple[int, float]:
    """(workers, CPUs per worker) for this cluster."""
    total = _ray().cluster_resources()
    cpus = cluster.cpus_per_worker or (float(total.get("CPU", 1)) if not cluster.address else 4.0)
    if cluster.workers:
        return cluster.workers, cpus
    if cluster.gpus_per_worker:
        return max(1, int(total.get("GPU", 0) // cluster.gpus_per_worker)), cpus
    return max(1, int(total.get("CPU", 1) // cpus)), cpus
