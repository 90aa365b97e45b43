"""Index benchmark: Flat (the exact baseline) vs IVF-Flat, IVF-PQ and HNSW, in one run.

For each data set of synthetic clustered unit vectors (default 1,000,000 x 128 and
100,000 x 1280) the vectors are stored in Redis through the store, then:
  * load: the time to read every vector back from Redis into a FAISS flat index;
  * per index kind, trained and tuned by ``train_index`` exactly as ``train_index.py`` does
    (target recall@10 0.95) and saved in Redis: build time, bytes per vector, the time to load
    the saved index from Redis, the memory each of the two took at its peak (as a multiple of
    the raw vector bytes), queries/s at batch 1 and batched, and recall@1/@10 of held-out
    queries against exact search.
Usage: python scripts/bench_index.py [--sets 1000000x128,100000x1280] [--kinds flat,ivf,ivfpq,hnsw]
                                     [--redis-url URL] [--queries 1000]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import empty_store, make_records  # noqa: E402

from cbir.cli.flags import COUNT  # noqa: E402
from cbir.options import INDEX_KINDS  # noqa: E402
from cbir.pipeline.ingest import BackgroundWriter  # noqa: E402
from cbir.search.index import SearchIndex  # noqa: E402
from cbir.search.persisted import _loaded, search_index, train_index  # noqa: E402
from cbir.search.tuning import recall_at
from cbir.store.redis.connect import describe, scratch  # noqa: E402

BATCH = 10_000
SINGLE_QUERIES = 300


def clustered(count: int, dim: int, seed: int, clusters: int = 1000, spread_dims: int = 12) -> np.ndarray:
    """Unit vectors around ``clusters`` fixed random centres, as embeddings of a labelled collection are.

    Each cluster varies mostly along its own ``spread_dims`` directions (image embeddings have a
    low intrinsic dimension), plus a little isotropic noise. The centres and directions depend
    only on ``dim``; ``seed`` draws the points, so another seed gives unseen points of the same
    collection.
    """
    layout = np.random.default_rng(dim)
    centres = layout.standard_normal((clusters, dim), dtype=np.float32)
    directions = layout.standard_normal((clusters, spread_dims, dim), dtype=np.float32) / np.sqrt(spread_dims)
    rng = np.random.default_rng(seed)
    members = rng.integers(0, clusters, count)
    out = 0.1 * rng.standard_normal((count, dim), dtype=np.float32)
    for cluster in range(clusters):
        rows = np.flatnonzero(members == cluster)
        out[rows] += centres[cluster] + rng.standard_normal((len(rows), spread_dims), dtype=np.float32) @ directions[cluster]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def fill(client, count: int, dim: int) -> tuple:
    store = empty_store(client, f"bench-index-{dim}")
    store.ensure_model("bench", {"description": "synthetic clustered vectors"}, dim)
    vectors = clustered(count, dim, seed=0)
    records = make_records(count)
    with store.writing():
        writer = BackgroundWriter(store)
        for first in range(0, count, BATCH):
            plan = store.prepare(records[first:first + BATCH])
            writer.submit(plan, vectors[first:first + BATCH][plan.positions])
        writer.close()
    return store, vectors


def queries_per_second(searcher: SearchIndex, queries: np.ndarray, batched: bool) -> float:
    started = time.perf_counter()
    if batched:
        searcher.search(queries, 10)
        return len(queries) / (time.perf_counter() - started)
    for row in queries[:SINGLE_QUERIES]:
        searcher.search(row[None], 10)
    return min(SINGLE_QUERIES, len(queries)) / (time.perf_counter() - started)


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The most this process's resident memory rose above its level at the start, in bytes,
    sampled every 10 ms (in the list yielded, filled on leaving)."""
    process, peak, done = psutil.Process(), [0], threading.Event()
    start = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss - start)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss - start)


def run_set(client, count: int, dim: int, kinds: list[str], num_queries: int) -> None:
    print(f"\n== {count:,} x {dim} clustered unit vectors ==")
    started = time.perf_counter()
    store, _ = fill(client, count, dim)
    print(f"stored in Redis in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    ids, vectors = store.load_vectors()
    loaded = time.perf_counter() - started
    exact = SearchIndex.exact(ids, vectors)
    into_faiss = time.perf_counter() - started
    print(f"load all vectors from Redis: {loaded:.2f} s; into a FAISS flat index: {into_faiss:.2f} s")
    del vectors
    queries = clustered(num_queries, dim, seed=1)
    truth = exact.search(queries, 10)[1]
    header = (f"{'index':<7} {'params':<40} {'build s':>8} {'bytes/vec':>10} {'load s':>7} {'train mem':>9} "
              f"{'load mem':>9} {'q/s b=1':>9} {'q/s batch':>10} {'speed-up':>9} {'R@1':>6} {'R@10':>6}")
    print(header)
    raw = count * dim * 4
    baseline = None
    for kind in kinds:
        if kind == "flat":
            searcher, build, size, load = exact, into_faiss, dim * 4 + 8, loaded
            params, memory = "exact", f"{'-':>9} {'-':>9}"
        else:
            with peak_memory() as training:
                report = train_index(store, kind)
            _loaded.clear()
            started = time.perf_counter()
            with peak_memory() as loading:
                searcher = search_index(store)
            load = time.perf_counter() - started
            build, size = report.build_seconds, report.bytes_per_vector
            params = ", ".join(f"{k}={v}" for k, v in report.params.items())
            memory = f"{training[0] / raw:>8.2f}x {loading[0] / raw:>8.2f}x"
        single = queries_per_second(searcher, queries, batched=False)
        batched = queries_per_second(searcher, queries, batched=True)
        found = searcher.search(queries, 10)[1]
        baseline = baseline or single
        print(f"{kind:<7} {params:<40} {build:>8.1f} {size:>10.1f} {load:>7.2f} {memory} {single:>9.0f} {batched:>10.0f} "
              f"{single / baseline:>8.1f}x {recall_at(found, truth, 1):>6.3f} {recall_at(found, truth, 10):>6.3f}",
              flush=True)
    store.drop()
    _loaded.clear()


def _data_sets(text: str) -> list[tuple[int, int]]:
    """argparse type: comma-separated COUNTxDIM, as (count, dim) pairs."""
    sets = []
    for spec in text.split(","):
        count, _, dim = spec.strip().lower().partition("x")
        if not (count.isdigit() and dim.isdigit() and int(count) > 0 and int(dim) > 0):
            raise argparse.ArgumentTypeError(f"{spec!r} is not COUNTxDIM with whole numbers above 0 (e.g. 100000x128)")
        sets.append((int(count), int(dim)))
    return sets


def _index_kinds(text: str) -> list[str]:
    """argparse type: comma-separated index kinds, the exact baseline first whether named or not."""
    kinds = [kind.strip().lower() for kind in text.split(",")]
    unknown = [kind for kind in kinds if kind not in INDEX_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown index kind {unknown[0]!r}; choose from {', '.join(INDEX_KINDS)}")
    return ["flat"] + [kind for kind in dict.fromkeys(kinds) if kind != "flat"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=_data_sets, default="1000000x128,100000x1280",
                        help="data sets, comma-separated COUNTxDIM (default: 1000000x128,100000x1280)")
    parser.add_argument("--kinds", type=_index_kinds, default="flat,ivf,ivfpq,hnsw",
                        help=f"index kinds, comma-separated, from {', '.join(INDEX_KINDS)}; flat, the exact "
                             "baseline every speed-up and recall is measured against, always runs first "
                             "(default: all)")
    parser.add_argument("--queries", type=COUNT, default=1000, help="held-out queries (default: 1000)")
    parser.add_argument("--redis-url", default=None, help="default: a fresh embedded Redis")
    args = parser.parse_args()
    with scratch(args.redis_url) as client:
        print(f"Redis: {describe(client)}")
        for count, dim in args.sets:
            run_set(client, count, dim, args.kinds, args.queries)


if __name__ == "__main__":
    main()
