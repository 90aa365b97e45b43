"""The service's Prometheus metrics: requests, their latency, batch sizes, errors."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """One registry per service (several apps in one process, as in the tests, do not collide)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, batch_sizes: Callable[[], list[int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("cbir_requests", "HTTP requests answered", ["route", "status"], registry=self.registry)
        self.errors = Counter("cbir_errors", "HTTP requests answered with an error (4xx, 5xx)", ["route", "status"],
                              registry=self.registry)
        self.latency = Histogram("cbir_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batches = Histogram("cbir_batch_images", "Images per model forward (dynamic batching)",
                                 buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self._batch_sizes = batch_sizes

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> bytes:
        for size in self._batch_sizes():
            self.batches.observe(size)
        return generate_latest(self.registry)
