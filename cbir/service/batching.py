"""Dynamic batching: concurrent searches share the model's forward passes.

Each request announces itself when it starts decoding, then hands its preprocessed images to the
:class:`Batcher` of its database's extractor; one thread takes what is waiting and, while other
announced requests are still decoding, waits at most ``max_wait`` for them (as Triton's dynamic
batcher and Ray Serve's ``@serve.batch`` do), runs one forward over all of it and answers each
request with its rows. A request alone never waits; many requests at once fill batches.

Every torch computation of a service runs on one thread (:mod:`cbir.models.threads` says why).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

MAX_BATCH = 32  # images per forward
MAX_WAIT_SECONDS = 0.010  # how long a batch waits, at most, for announced requests to join it


class Batcher:
    """Embeds uint8 images (each 3 x S x S) with ``extractor`` on ``torch``'s thread, joining
    concurrent requests."""

    def __init__(self, extractor, torch: ThreadPoolExecutor, max_batch: int = MAX_BATCH,
                 max_wait: float = MAX_WAIT_SECONDS):
        self.extractor, self.torch = extractor, torch
        self.max_batch, self.max_wait = max_batch, max_wait
        self.sizes: list[int] = []  # images per forward so far (the metrics read and clear it)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._announced = 0  # requests decoding, whose images will come
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cbir-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def announced(self) -> Iterator[None]:
        """Around a request's decoding and its :meth:`submit` (not the wait for its vectors): a batch
        waits for it while it decodes."""
        with self._count_lock:
            self._announced += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._announced -= 1

    def submit(self, images: list[torch.Tensor]) -> Future:
        """A future of the vectors of ``images`` (float32, one row each)."""
        future: Future = Future()
        self._queue.put((images, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs, count = [job], len(job[0])
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch and (left := deadline - time.monotonic()) > 0:
                if self._queue.empty() and not self._announced:
                    break  # nothing else is on its way
                try:
                    job = self._queue.get(timeout=min(left, 0.0005))
                except queue.Empty:
                    continue
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
                count += len(job[0])
            self._embed(jobs, count)

    def _embed(self, jobs: list, count: int) -> None:
        try:
            vectors = self.torch.submit(self._forward, [image for images, _ in jobs for image in images]).result()
        except BaseException as exc:  # each request gets the error, the thread goes on
            for _, future in jobs:
                future.set_exception(exc)
            return
        self.sizes.append(count)
        start = 0
        for images, future in jobs:
            future.set_result(np.ascontiguousarray(vectors[start:start + len(images)]))
            start += len(images)

    def _forward(self, images: list[torch.Tensor]) -> np.ndarray:
        return self.extractor.embed(torch.stack(images))
