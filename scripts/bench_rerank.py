"""k-reciprocal re-ranking's cost per query beside plain exact search, in one run.

Clustered unit vectors of Lite0's size (1280-d) stand in for a database: the re-ranking's work
depends on how many candidates it re-ranks, not on what the vectors show.
Usage: python scripts/bench_rerank.py [--queries 400] [--sizes 1080 3882 100000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cbir.search.index import SearchIndex
from cbir.search.rerank import KReciprocal


def clustered(count: int, dim: int, generator: np.random.Generator) -> np.ndarray:
    centres = generator.normal(size=(20, dim))
    vectors = centres[generator.integers(0, 20, count)] + generator.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1080, 3882, 100000])
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    generator = np.random.default_rng(0)
    print("database  plain ms/query  pool 50  pool 100")
    for size in args.sizes:
        vectors = clustered(size + args.queries, args.dim, generator)
        index = SearchIndex.exact(np.arange(size), vectors[:size])
        queries = vectors[size:]
        timings = []
        for searcher in (index, KReciprocal(index, index.vectors_of, pool=50), KReciprocal(index, index.vectors_of)):
            started = time.perf_counter()
            searcher.search(queries, 10)
            timings.append(1000 * (time.perf_counter() - started) / len(queries))
        print(f"{size:>8}  {timings[0]:14.2f}  {timings[1]:7.2f}  {timings[2]:8.2f}")


if __name__ == "__main__":
    main()
