"""Images -> extractor -> vectors -> store: decoding, model and Redis writes in one pipeline.

Where the model runs on the CPU it needs every core, so decoding and model take turns, each at full
width: threads decode the images of a few batches in parallel (Pillow's decoders and resize and
hashlib release the GIL) and hash their bytes, then the model has the cores for those batches. Decoding beside such a model would only
take cores from it, and forked decoding processes would make the model copy its memory pages
again. Where the model runs on an accelerator, the cores are free for
decoding: DataLoader processes decode batches ahead while the model runs (threads hold the GIL for
the Python parts of Pillow's decoding: on 16 cores they decoded at a third of the processes' rate).
A writer thread stores batch N while the model embeds batch N+1. Images already stored with the
same content are skipped before the model sees them, so re-running an interrupted or repeated
``add`` costs little more than reading the files.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import interrupts
from .data import ImageItem, printable
from .errors import CbirError, ImageError, ModelError, ModelMismatchError
from .models import Extractor, ExtractorSpec, Preprocess, create_extractor
from .store import ImageRecord, VectorStore, WritePlan, WriteStream, stopped_answering

DEFAULT_BATCH_SIZE = 32
# Decoding threads taking turns with the model decode this many images a turn (whole batches, at
# least one): in alternating adds of BUSI on 2 cores, turns of 32 images ran at 0.78 x the pure
# forward rate (median of 5), turns of 64 to 256 images at 0.82-0.85.
DECODE_TURN_IMAGES = 128


@dataclass
class DecodedBatch:
    positions: list[int]  # index of each decoded image in the item list
    images: torch.Tensor | None  # preprocessed uint8, (n, 3, H, W); a numpy array on its way between processes
    sha256: list[str]
    failures: list[str]  # "file: reason", one per image that could not be decoded


def _decode(item: ImageItem, position: int, preprocess: Preprocess):
    try:
        image, sha = item.read(keep_grey=True)
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


class _Decoding(Dataset):
    """The items, decoded on demand: what DataLoader processes decode."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        return _decode(self.items[position], position, self.preprocess)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decodes_beside(extractor: Extractor) -> bool:
    """Whether decoding may run while the model does: not where the model needs the CPU's cores."""
    return extractor.device.type != "cpu"


def decode_batches(items: Sequence[ImageItem], preprocess: Preprocess, batch_size: int = DEFAULT_BATCH_SIZE,
                   workers: int | None = None, beside_model: bool = False) -> Iterator[DecodedBatch]:
    """Decoded, preprocessed batches in item order; undecodable images are reported, not raised.

    By default ``workers`` threads decode a turn of batches (DECODE_TURN_IMAGES images) when the
    first of them is asked for and leave the cores to the caller until the turn's batches are
    taken. ``beside_model``: ``workers`` processes decode the next batches while the caller works
    (for a model on an accelerator). ``workers=0``: the caller's thread decodes.
    """
    workers = default_workers() if workers is None else workers
    batches = [range(first, min(first + batch_size, len(items))) for first in range(0, len(items), batch_size)]
    if workers == 0:
        for positions in batches:
            yield _collate([_decode(items[p], p, preprocess) for p in positions])
    elif beside_model and len(batches) > 1:  # for one batch, starting processes costs more than it saves
        yield from _decode_in_processes(items, preprocess, batches, workers)
    else:
        turn = max(1, DECODE_TURN_IMAGES // batch_size) * batch_size
        with ThreadPoolExecutor(workers, thread_name_prefix="cbir-decode") as pool:
            for start in range(0, len(items), turn):
                positions = range(start, min(start + turn, len(items)))
                samples = list(pool.map(_decode, (items[p] for p in positions), positions, repeat(preprocess)))
                for first in range(0, len(samples), batch_size):
                    yield _collate(samples[first:first + batch_size])


def _collate_to_send(samples) -> DecodedBatch:
    """_collate with the pixels as a numpy array, which is pickled through the worker's pipe.

    A tensor would be handed over in fresh shared-memory pages, and the caller's first touch of
    each page faults: joining such chunks ran at 1,158 images/s on 16 cores, arrays at 1,789-1,858.
    """
    batch = _collate(samples)
    batch.images = None if batch.images is None else batch.images.numpy()
    return batch


def _decode_in_processes(items: Sequence[ImageItem], preprocess: Preprocess, batches: list[range],
                         workers: int) -> Iterator[DecodedBatch]:
    """DataLoader processes decode each batch in chunks, one or more per worker, joined again here.

    A DataLoader worker decodes a whole batch of its own, so batches of 256 kept 4 of 16 workers
    busy on 780 images; chunks of 8 or more images keep them all busy. Processes rather than
    threads: threads hold the GIL for the Python parts of Pillow's decoding, and on 16 cores 16 of
    them decoded BUSI at 1,079 images/s at best where 16 processes reached 3,278.
    """
    chunks = [np.array_split(positions, max(1, min(workers, len(positions) // 8))) for positions in batches]
    sampler = [chunk.tolist() for parts in chunks for chunk in parts]
    loader = iter(DataLoader(_Decoding(items, preprocess), num_workers=min(workers, len(sampler)),
                             collate_fn=_collate_to_send, batch_sampler=sampler))
    for parts in chunks:
        decoded = [next(loader) for _ in parts]
        images = [part.images for part in decoded if part.images is not None]
        yield DecodedBatch(positions=[p for part in decoded for p in part.positions],
                           images=torch.from_numpy(np.concatenate(images)) if images else None,
                           sha256=[sha for part in decoded for sha in part.sha256],
                           failures=[failure for part in decoded for failure in part.failures])


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
    of records overlap the caller's work (decoding, the model, the next :meth:`VectorStore.prepare`).

    As a context manager it closes on leaving; leaving on an error that says the server stopped
    answering, it abandons the writes in flight rather than wait out the same silence again."""

    def __init__(self, store: VectorStore, depth: int = 2):
        self.error: BaseException | None = None
        self._abandoning = False
        self._stream = WriteStream(store, depth)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="cbir-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(abandon=exc is not None and stopped_answering(exc))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self.error is None and not self._abandoning:
                try:
                    self._stream.write(*job)
                except BaseException as exc:  # handed to the caller in submit()/close()
                    self.error = exc
        try:
            self._stream.abandon() if self._abandoning else self._stream.close()
        except BaseException as exc:
            self.error = self.error or exc

    def submit(self, plan: WritePlan, vectors: np.ndarray) -> None:
        self._raise()
        self._queue.put((plan, vectors))

    def close(self, abandon: bool = False) -> None:
        """Wait for the writes queued and in flight, or with ``abandon`` skip those queued and leave
        those in flight unanswered (see :meth:`CommandStream.abandon`); raises the first write error."""
        self._abandoning = abandon
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
    with store.writing(), interrupts.held():
        started = time.perf_counter()  # after any wait for another writer: the rate is this run's
        with tqdm(total=len(items), unit="img", desc=f"indexing into '{store.name}'", disable=not progress) as bar, \
                BackgroundWriter(store) as writer:
            for batch in decode_batches(items, extractor.preprocess, batch_size, workers, decodes_beside(extractor)):
                interrupts.check()  # between batches: no hand-over to the decoding or writer threads under way
                report.failures += batch.failures
                if batch.positions:
                    now = time.time()
                    records = [ImageRecord(name=items[p].name, label=items[p].label,
                                           project=items[p].project, sha256=sha,
                                           source=printable(items[p].location), added=now)
                               for p, sha in zip(batch.positions, batch.sha256)]
                    plan = store.prepare(records)
                    report.count(plan)
                    if plan.records:
                        writer.submit(plan, extractor.embed(batch.images[plan.positions]))
                # One refresh, by update, so the count and the tallies beside it agree.
                bar.set_postfix(new=report.new, skipped=report.unchanged, failed=len(report.failures), refresh=False)
                bar.update(len(batch.positions) + len(batch.failures))
    report.seconds = time.perf_counter() - started
    return report


def embed_items(items: Sequence[ImageItem], extractor: Extractor, batch_size: int = DEFAULT_BATCH_SIZE,
                workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, DecodedBatch]:
    """Vectors of the decodable ``items``, and one DecodedBatch (without pixels) saying which they are."""
    vectors, decoded = [], DecodedBatch(positions=[], images=None, sha256=[], failures=[])
    bar = tqdm(total=len(items), unit="img", desc="embedding", disable=not progress)
    with interrupts.held():
        for batch in decode_batches(items, extractor.preprocess, batch_size, workers, decodes_beside(extractor)):
            interrupts.check()
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
