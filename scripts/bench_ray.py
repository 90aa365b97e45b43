"""Distributed ingest benchmark: `add --engine ray` against the single-process `add`, in one run.

On the same images, into a scratch embedded Redis (or --redis-url), alternating (this machine's
speed drifts within minutes), each add into an empty database:
  1. the single-process `add` (decoding threads and the model taking turns, a writer thread);
  2. `add --engine ray` on a local Ray started for the run (Ray Data actors decode and embed, this
     process writes), the whole run (Ray's start and each worker's model build included), and an
     add of one batch: Ray's fixed cost;
  3. the single writer alone: prepare and write of images already embedded (1280-d vectors,
     records and 4 KB thumbnails), the rate at which one writer would cap any number of workers.
Usage: python scripts/bench_ray.py [--images NPZ|DIR] [--count 3000] [--repeats 2] [--workers N]
       [--cpus-per-worker C] [--ray-address ADDRESS --redis-url URL]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbir import api  # noqa: E402
from cbir.pipeline.distributed import RayCluster  # noqa: E402
from cbir.pipeline.ingest import BackgroundWriter  # noqa: E402
from cbir.store.database import VectorStore  # noqa: E402
from cbir.store.layout import ImageRecord  # noqa: E402
from cbir.store.redis.connect import describe, scratch  # noqa: E402

THUMBNAIL = bytes(4096)  # the size of a BUSI thumbnail: 3.8 KB on average


def one_add(client, items, ray: RayCluster | None, redis_url: str | None) -> float:
    """Seconds of an add of ``items`` into an empty database, from the call to the last write."""
    store = VectorStore(client, "bench-ray")
    store.drop()
    extractor = api.model_for_add(store)
    started = time.perf_counter()
    report = api.add(store, items, extractor, progress=False, ray=ray, redis_url=redis_url)
    seconds = time.perf_counter() - started
    assert report.new == len(items) and not report.failures, report
    store.drop()
    return seconds


def writer_rate(client, count: int, dim: int = 1280) -> float:
    """Images/s that one writer stores, with nothing to embed (vectors, records, thumbnails)."""
    store = VectorStore(client, "bench-writer")
    store.drop()
    store.ensure_model("bench", {"description": "random vectors"}, dim)
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    records = [ImageRecord(name=f"class{i % 10}/image_{i:07d}.png", label=f"class{i % 10}", project="bench",
                           sha256=hashlib.sha256(i.to_bytes(8, "little")).hexdigest(),
                           source=f"/data/bench/class{i % 10}/image_{i:07d}.png", added=1.7e9) for i in range(count)]
    started = time.perf_counter()
    with store.writing(), BackgroundWriter(store) as writer:
        for first in range(0, count, 32):  # the batches of an add
            plan = store.prepare(records[first:first + 32])
            plan.thumbnails = [THUMBNAIL] * len(plan.positions)
            writer.submit(plan, vectors[first:first + 32][plan.positions])
    rate = count / (time.perf_counter() - started)
    store.drop()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "mednist_12k.npz"))
    parser.add_argument("--count", type=int, default=3000, help="images of each add (default: 3000)")
    parser.add_argument("--repeats", type=int, default=2, help="adds of each engine, alternating (default: 2)")
    parser.add_argument("--workers", type=int, default=None, help="Ray workers (default: as the cluster allows)")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--ray-address", default=None, help="default: a local Ray started for each run")
    parser.add_argument("--redis-url", default=None, help="default: a fresh embedded Redis")
    parser.add_argument("--writer-images", type=int, default=20_000)
    args = parser.parse_args()
    ray = RayCluster(address=args.ray_address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                     gpus_per_worker=args.gpus_per_worker)
    items = api.load_items(args.images)[:args.count]
    with scratch(args.redis_url) as client:
        print(f"{len(items)} images of {args.images}, default model at 224 px, into {describe(client)}")
        runs: dict[str, list[float]] = {"single process": [], "Ray": []}
        for _ in range(args.repeats):
            runs["single process"].append(len(items) / one_add(client, items, None, args.redis_url))
            runs["Ray"].append(len(items) / one_add(client, items, ray, args.redis_url))
        for engine, rates in runs.items():
            runs_listed = ", ".join(f"{rate:.1f}" for rate in rates)
            print(f"  {engine:<15} {statistics.median(rates):7.1f} images/s (runs: {runs_listed})")
        startup = one_add(client, items[:32], ray, args.redis_url)
        print(f"  Ray's fixed cost: {startup:.1f} s for an add of one batch (Ray's start, each worker's model)")
        ratio = statistics.median(runs["Ray"]) / statistics.median(runs["single process"])
        print(f"  Ray / single process: {ratio:.2f} x   (target on 2 cores: >= 0.8)")
        print(f"  the single writer alone: {writer_rate(client, args.writer_images):,.0f} images/s "
              f"(1280-d vectors, records and 4 KB thumbnails, batches of 32)")


if __name__ == "__main__":
    main()
