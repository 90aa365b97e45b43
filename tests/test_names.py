"""The name index: hashes of names to candidate ids, held in sorted runs."""
from __future__ import annotations

import zlib

import numpy as np

from cbir.store.names import NAME_BUCKETS, NameIndex, buckets, name_hashes, pairs


def test_hash_is_crc32_beside_adler32_and_the_bucket_follows_crc32():
    name = "dir/img (1) \u00e9.png".encode()
    (value,) = name_hashes([name]).tolist()
    assert value == (zlib.crc32(name) << 32) | zlib.adler32(name)
    assert buckets(name_hashes([name])).tolist() == [zlib.crc32(name) % NAME_BUCKETS]


def test_candidates_are_every_pair_of_a_hash_across_merged_runs():
    index = NameIndex()
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2 ** 63, 5000, dtype=np.uint64)
    for first in range(0, 5000, 700):  # batches of uneven size: runs merge as they grow
        index.add(hashes[first:first + 700], np.arange(first, min(first + 700, 5000)))
    index.add(hashes[[10, 20]], np.array([90_000, 90_001]))  # a stale pair beside the live one
    assert len(index) == 5002
    assert len(index._runs) < 8
    query = np.concatenate([hashes[[20, 10, 4999]], np.array([1], np.uint64)])
    positions, ids = index.candidates(query)
    found = sorted(zip(positions.tolist(), ids.tolist()))
    assert found == [(0, 20), (0, 90_001), (1, 10), (1, 90_000), (2, 4999)]
    index.discard(np.array([90_000, 90_001, 4999]))
    assert sorted(zip(*(a.tolist() for a in index.candidates(query)))) == [(0, 20), (1, 10)]
    assert len(index) == 4999


def test_packed_pairs_read_back_into_an_index():
    index = NameIndex()
    index.add_packed(pairs(np.array([7, 3], np.uint64), np.array([1, 2])))
    assert index.candidates(np.array([3, 5, 7], np.uint64))[1].tolist() in ([2, 1], [1, 2])
    assert NameIndex().candidates(np.array([3], np.uint64))[0].tolist() == []
