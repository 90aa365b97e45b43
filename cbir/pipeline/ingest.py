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

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from cbir import interrupts
from cbir.images.sources import ImageItem, printable
from cbir.models.extractor import Extractor
from cbir.pipeline.embed import DEFAULT_BATCH_SIZE, decode_batches, decodes_beside
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord
from cbir.store.redis.failures import stopped_answering
from cbir.store.writer import WritePlan, WriteStream


@dataclass
class IndexReport:
    """What an ``add`` run did; ``failures`` lists each skipped file with its reason."""

    total: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)
    # Names stored with other content, not replaced: "name: stored from A, not replaced by B"
    conflicts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.new + self.updated

    def count(self, plan: WritePlan) -> None:
        self.new += plan.new
        self.updated += plan.updated
        self.unchanged += plan.unchanged
        self.duplicates += plan.duplicates
        self.conflicts += [f"{name}: stored from {stored}, not replaced by {new}"
                           for name, stored, new in plan.conflicts]


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


def write_batch(store: VectorStore, writer: BackgroundWriter, report: IndexReport, records: Sequence[ImageRecord],
                update: bool, thumbnails: Sequence[bytes] | None, vectors: Callable[[list[int]], np.ndarray]) -> None:
    """Plan ``records`` (:meth:`VectorStore.prepare`), count the plan into ``report`` and hand its
    writes to ``writer``. ``thumbnails``: one per record, or None; ``vectors(positions)``: the
    vectors of the records at those positions, asked for only those the plan stores."""
    plan = store.prepare(records, update)
    if thumbnails is not None:
        plan.thumbnails = [thumbnails[p] for p in plan.positions]
    report.count(plan)
    if plan.records:
        writer.submit(plan, vectors(plan.positions))


def index_images(store: VectorStore, items: Sequence[ImageItem], extractor: Extractor,
                 batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                 progress: bool = True, update: bool = False, thumbnails: bool = True) -> IndexReport:
    """Embed and store ``items``; safe to re-run after an interruption (see VectorStore.prepare).
    A stored name whose content differs is a conflict, listed and skipped, unless ``update``.
    ``thumbnails``: store a small picture of each image with it (see cbir.images.thumbnails)."""
    report = IndexReport(total=len(items))
    with store.writing(), interrupts.held():
        started = time.perf_counter()  # after any wait for another writer: the rate is this run's
        with tqdm(total=len(items), unit="img", desc=f"indexing into '{store.name}'", disable=not progress) as bar, \
                BackgroundWriter(store) as writer:
            for batch in decode_batches(items, extractor.preprocess, batch_size, workers, decodes_beside(extractor),
                                        thumbnails):
                interrupts.check()  # between batches: no hand-over to the decoding or writer threads under way
                report.failures += batch.failures
                if batch.positions:
                    now = time.time()
                    records = [ImageRecord(name=items[p].name, label=items[p].label,
                                           project=items[p].project, sha256=sha,
                                           source=printable(items[p].location), added=now)
                               for p, sha in zip(batch.positions, batch.sha256)]
                    write_batch(store, writer, report, records, update, batch.thumbnails,
                                lambda positions: extractor.embed(batch.images[positions]))
                # One refresh, by update, so the count and the tallies beside it agree.
                bar.set_postfix(new=report.new, skipped=report.unchanged, failed=len(report.failures), refresh=False)
                bar.update(len(batch.positions) + len(batch.failures))
    report.seconds = time.perf_counter() - started
    return report


