"""Images -> extractor -> vectors -> store: decoding, model and Redis writes in one pipeline.

Threads decode the images of a batch in parallel (Pillow, zlib and hashlib release the GIL) and
hash their bytes. On the CPU the model needs every core, so decoding and model take turns, each
at full width: decoding beside the model would only take cores from it (and forked decoding
processes would also make the model copy its memory pages again). On an accelerator, batches
are decoded ahead while the model runs. A writer thread stores batch N while the model embeds
batch N+1. Images already stored with the same content are skipped before the model sees them,
so re-running an interrupted or repeated ``add`` costs little more than reading the files.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data import ImageItem
from .errors import CbirError, ImageError, ModelError, ModelMismatchError
from .models import Extractor, ExtractorSpec, Preprocess, create_extractor
from .store import ImageRecord, VectorStore, WritePlan, WriteStream

DEFAULT_BATCH_SIZE = 32


@dataclass
class DecodedBatch:
    positions: list[int]  # index of each decoded image in the item list
    images: torch.Tensor | None  # preprocessed, (n, 3, H, W)
    sha256: list[str]
    failures: list[str]  # "file: reason", one per image that could not be decoded


def _decode(item: ImageItem, position: int, preprocess: Preprocess):
    try:
        image, sha = item.read()
        return position, preprocess(image), sha, None
    except ImageError as exc:
        return position, None, None, str(exc)
    except Exception as exc:  # a decoder bug must cost one image, not the whole run
        return position, None, None, f"{item.location}: {type(exc).__name__}: {exc}"


def _collate(samples) -> DecodedBatch:
    good = [s for s in samples if s[1] is not None]
    return DecodedBatch(positions=[s[0] for s in good],
                        images=torch.stack([s[1] for s in good]) if good else None,
                        sha256=[s[2] for s in good],
                        failures=[s[3] for s in samples if s[1] is None])


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_ahead(extractor: Extractor) -> int:
    """Batches to decode before the model asks for them: none where the model itself is on the CPU."""
    return 0 if extractor.device.type == "cpu" else 2


def decode_batches(items: Sequence[ImageItem], preprocess: Preprocess, batch_size: int = DEFAULT_BATCH_SIZE,
                   workers: int | None = None, ahead: int = 0) -> Iterator[DecodedBatch]:
    """Decoded, preprocessed batches in item order; undecodable images are reported, not raised.

    ``workers`` threads decode (0: the caller's thread). ``ahead`` batches are decoded while the
    caller works on the current one; with 0 the next batch is decoded only when asked for, so
    decoding never competes with the caller for cores.
    """
    workers = default_workers() if workers is None else workers
    batches = iter([range(first, min(first + batch_size, len(items))) for first in range(0, len(items), batch_size)])
    if workers == 0:
        for positions in batches:
            yield _collate([_decode(items[p], p, preprocess) for p in positions])
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cbir-decode")

    def submit(positions: range) -> list[Future]:
        return [pool.submit(_decode, items[p], p, preprocess) for p in positions]

    try:
        pending = deque(submit(positions) for positions in islice(batches, ahead + 1))
        while pending:
            yield _collate([future.result() for future in pending.popleft()])
            if (positions := next(batches, None)) is not None:
                pending.append(submit(positions))
    finally:
        pool.shutdown(cancel_futures=True)


@dataclass
class IndexReport:
    """What an ``add`` run did; ``failures`` lists each skipped file with its reason."""

    total: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.new + self.updated

    def count(self, plan: WritePlan) -> None:
        self.new += plan.new
        self.updated += plan.updated
        self.unchanged += plan.unchanged
        self.duplicates += plan.duplicates


class BackgroundWriter:
    """Writes plans from a thread through a :class:`WriteStream`, so Redis I/O and the encoding
    of records overlap the caller's work (decoding, the model, the next :meth:`VectorStore.prepare`)."""

    def __init__(self, store: VectorStore, depth: int = 2):
        self.error: BaseException | None = None
        self._stream = WriteStream(store, depth)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="cbir-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._stream.write(*job)
                except BaseException as exc:  # handed to the caller in submit()/close()
                    self.error = exc
        try:
            self._stream.close()
        except BaseException as exc:
            self.error = self.error or exc

    def submit(self, plan: WritePlan, vectors: np.ndarray) -> None:
        self._raise()
        self._queue.put((plan, vectors))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def register_model(store: VectorStore, extractor: Extractor, weights: str | Path | None = None,
                   chunk_size: int | None = None) -> None:
    """Create the database for this extractor, or refuse if it holds another model's vectors."""
    spec = {"description": extractor.spec.description, "spec": extractor.spec.to_json()}
    if weights is not None:
        spec["weights_path"] = str(Path(weights).resolve())
    store.ensure_model(extractor.fingerprint(), spec, extractor.spec.embedding_dim, chunk_size)


def extractor_for_store(store: VectorStore, weights: str | Path | None = None,
                        device: str | None = None) -> Extractor:
    """Rebuild the extractor that filled ``store`` (or load ``weights``) and check it is the same."""
    store.require()
    recorded = store.model_spec
    spec = ExtractorSpec.from_json(recorded["spec"])
    weights = weights or recorded.get("weights_path")
    if weights is not None and not Path(weights).exists():
        raise ModelError(f"database '{store.name}' was built with weights {weights}, which are not "
                         "on this machine; pass their new location with --weights")
    if weights is not None:
        extractor = create_extractor(spec.architecture, weights=weights, input_size=spec.input_size,
                                     device=device)
    else:
        extractor = create_extractor(spec.architecture, input_size=spec.input_size,
                                     pretrained=spec.weights == "imagenet", device=device)
    if extractor.fingerprint() != store.model:
        raise ModelMismatchError(f"the extractor rebuilt for database '{store.name}' "
                                 f"({extractor.spec.description}) does not reproduce its vectors; "
                                 "pass the original --weights")
    return extractor


def index_images(store: VectorStore, items: Sequence[ImageItem], extractor: Extractor,
                 batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                 progress: bool = True) -> IndexReport:
    """Embed and store ``items``; safe to re-run after an interruption (see VectorStore.prepare)."""
    report = IndexReport(total=len(items))
    started = time.perf_counter()
    bar = tqdm(total=len(items), unit="img", desc=f"indexing into '{store.name}'", disable=not progress)
    with store.writing():
        writer = BackgroundWriter(store)
        try:
            for batch in decode_batches(items, extractor.preprocess, batch_size, workers, decode_ahead(extractor)):
                report.failures += batch.failures
                if batch.positions:
                    now = time.time()
                    records = [ImageRecord(name=items[p].name, label=items[p].label,
                                           project=items[p].project, sha256=sha,
                                           source=items[p].location, added=now)
                               for p, sha in zip(batch.positions, batch.sha256)]
                    plan = store.prepare(records)
                    report.count(plan)
                    if plan.records:
                        writer.submit(plan, extractor.embed(batch.images[plan.positions]))
                bar.update(len(batch.positions) + len(batch.failures))
                bar.set_postfix(new=report.new, skipped=report.unchanged, failed=len(report.failures))
        finally:
            bar.close()
            writer.close()
    report.seconds = time.perf_counter() - started
    return report


def embed_items(items: Sequence[ImageItem], extractor: Extractor, batch_size: int = DEFAULT_BATCH_SIZE,
                workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, DecodedBatch]:
    """Vectors of the decodable ``items``, and one DecodedBatch (without pixels) saying which they are."""
    vectors, decoded = [], DecodedBatch(positions=[], images=None, sha256=[], failures=[])
    bar = tqdm(total=len(items), unit="img", desc="embedding", disable=not progress)
    for batch in decode_batches(items, extractor.preprocess, batch_size, workers, decode_ahead(extractor)):
        decoded.failures += batch.failures
        if batch.positions:
            vectors.append(extractor.embed(batch.images))
            decoded.positions += batch.positions
            decoded.sha256 += batch.sha256
        bar.update(len(batch.positions) + len(batch.failures))
    bar.close()
    if not vectors:
        raise CbirError("no query image could be read:\n  " + "\n  ".join(decoded.failures))
    return np.concatenate(vectors), decoded
