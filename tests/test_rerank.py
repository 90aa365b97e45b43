"""k-reciprocal re-ranking: the vectorised form against the paper's loops, and as a searcher."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cbir.search.index import SearchIndex
from cbir.search.rerank import KReciprocal, rerank_distances

from .conftest import BREASTMNIST


def paper_distances(query, candidates, k1=20, k2=6, lam=0.3):
    """Zhong et al.'s published re_ranking loops, for one probe (the query) and a gallery (the candidates)."""
    features = np.vstack([query[None, :], candidates]).astype(np.float64)
    count = len(features)
    original = np.maximum(2 - 2 * features @ features.T, 0)
    original = original / np.max(original, axis=0)
    V = np.zeros((count, count))
    initial_rank = np.argsort(original, axis=1, kind="stable")
    for i in range(count):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            c_forward = initial_rank[candidate, :int(np.around(k1 / 2)) + 1]
            c_backward = initial_rank[c_forward, :int(np.around(k1 / 2)) + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, reciprocal)) > 2 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        V = np.array([np.mean(V[initial_rank[i, :k2], :], axis=0) for i in range(count)])
    shared = np.array([np.minimum(V[0], V[j]).sum() for j in range(count)])
    jaccard = 1 - shared / (2 - shared)
    return (jaccard * (1 - lam) + original[0] * lam)[1:]


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("seed,count", [(0, 100), (1, 40), (2, 7)])
def test_the_vectorised_re_ranking_is_the_papers(seed, count):
    generator = np.random.default_rng(seed)
    centres = unit(generator.normal(size=(4, 16)))
    candidates = unit(centres[generator.integers(0, 4, count)] + 0.4 * generator.normal(size=(count, 16)))
    query = unit(centres[:1] + 0.4 * generator.normal(size=(1, 16)))[0]
    np.testing.assert_allclose(rerank_distances(query, candidates), paper_distances(query, candidates), atol=1e-9)


def test_a_re_ranking_searcher_reorders_its_pool_and_keeps_scores_as_similarities():
    generator = np.random.default_rng(3)
    vectors = unit(generator.normal(size=(300, 8))).astype(np.float32)
    index = SearchIndex.exact(np.arange(300) + 1000, vectors)
    searcher = KReciprocal(index, index.vectors_of, pool=50)
    queries = unit(generator.normal(size=(5, 8))).astype(np.float32)
    plain_scores, plain_ids = index.search(queries, 80)
    scores, ids = searcher.search(queries, 80)
    assert ids.shape == (5, 80)
    for row in range(5):
        assert set(ids[row, :50]) == set(plain_ids[row, :50])  # the pool, re-ordered
        np.testing.assert_array_equal(ids[row, 50:], plain_ids[row, 50:])  # deeper ones as they were
        expected = dict(zip(plain_ids[row], plain_scores[row]))
        np.testing.assert_allclose(scores[row], [expected[i] for i in ids[row]])
    assert (ids[:, :50] != plain_ids[:, :50]).any()
    assert searcher.kind == "flat" and searcher.size == 300


def test_evaluate_and_retrieve_rerank_on_real_images(cli_env, db_name, tmp_path):
    from cbir.cli.main import main

    assert main(["add", "--db-name", db_name, "--path", str(BREASTMNIST), "--split", "test", "--input-size", "64",
                 "--quiet"]) == 0
    results = []
    for flags in ([], ["--rerank"]):
        report = tmp_path / f"loo{len(flags)}.json"
        assert main(["evaluate", "--db-name", db_name, "--measure", "loo", "--k", "1", "--quiet", "--no-picture",
                     "--excel-path", str(tmp_path / "x.xlsx"), "--json", str(report), *flags]) == 0
        results.append(json.loads(report.read_text())["results"]["loo"])
    assert results[0]["map_at_r"] != results[1]["map_at_r"]  # the ranking changed
    assert 0.5 < results[1]["top1"] <= 1
    answer = tmp_path / "answer.json"
    assert main(["retrieve", "--db-name", db_name, "--path", str(BREASTMNIST), "--split", "val", "--rerank",
                 "--nrt-neigh", "5", "--no-picture", "--json", str(answer)]) == 0
    retrievals = json.loads(answer.read_text())
    assert retrievals and all(len(r["results"]) == 5 for r in retrievals)
