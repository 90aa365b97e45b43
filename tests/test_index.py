"""FAISS indices: recall against exact search, persistence in Redis, changes after training."""
from __future__ import annotations

import json
import re
import threading
import warnings
from collections import Counter

import numpy as np
import pytest

from cbir.cli.main import main
from cbir.errors import CbirError
from cbir.images.sources import load_items
from cbir.pipeline.embed import embed_items
from cbir.pipeline.model import register_model
from cbir.search.index import SearchIndex, default_nlist, default_pq_m
from cbir.search.persisted import StaleIndexWarning, _loaded, index_info, search_index, train_index
from cbir.search.tuning import recall_at
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord
from cbir.store.redis.connect import connect

from .conftest import SHARED_DATA


def clustered(count: int, dim: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def mednist_embeddings(extractor):
    """Real embeddings: the 2,400 MedNIST test images through the pretrained Lite0."""
    items = load_items(SHARED_DATA / "mednist_12k.npz", split="test")
    vectors, decoded = embed_items(items, extractor, workers=0)
    assert not decoded.failures
    return [items[p] for p in decoded.positions], decoded.sha256, vectors


@pytest.fixture
def mednist_store(store, mednist_embeddings, extractor):
    items, shas, vectors = mednist_embeddings
    register_model(store, extractor)
    records = [ImageRecord(name=i.name, label=i.label, project=i.project, sha256=s) for i, s in zip(items, shas)]
    with store.writing():
        store.add(records, vectors)
    yield store
    _loaded.clear()


def exact_truth(store, queries, k=10):
    return SearchIndex.from_store(store).search(queries, k)[1]


# ------------------------------------------------------------------ units
def test_parameters_follow_the_data_size():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(2400) == 61  # bounded by 39 training points per list
    assert default_pq_m(128) == 16 and default_pq_m(1280) == 32 and default_pq_m(100) == 10


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_tuned_index_reaches_the_recall_target(kind):
    from cbir.search.tuning import tune

    vectors = clustered(20_000, 32)
    ids = np.arange(20_000) * 3  # store ids with gaps
    searcher = SearchIndex.build(kind, ids, vectors)
    exact = SearchIndex.exact(ids, vectors)
    tuning = tune(searcher, exact, ids[:300], vectors[:300], target_recall=0.95)
    assert tuning.reached and tuning.chosen.recall10 >= 0.95
    refine = tuning.chosen.refine
    assert tuning.chosen.breadth == min(p.breadth for p in tuning.tried if p.recall10 >= 0.95 and p.refine == refine)
    if kind == "ivfpq":  # 4 code bytes per vector cannot rank alone: the smallest factor that reaches it
        assert refine > 1 and searcher.params["refine"] == refine
        assert max(p.recall10 for p in tuning.tried if p.refine < refine) < 0.95
    else:
        assert refine == 1 and "refine" not in searcher.params


def test_an_ivfpq_search_re_ranks_its_candidates_by_their_exact_vectors():
    vectors = clustered(5000, 32)
    ids = np.arange(5000) * 2
    exact = SearchIndex.exact(ids, vectors)
    searcher = SearchIndex.build("ivfpq", ids, vectors, nlist=20, m=4)
    searcher.params.update(nprobe=20, refine=8)
    queries = vectors[:200] + 0.05
    coded_scores, coded = searcher.search(queries, 10)  # no exact vectors given: the codes rank
    searcher.refine_vectors = exact.vectors_of
    scores, found = searcher.search(queries, 10)
    assert np.allclose(scores, exact.similarities(queries, found), atol=1e-5)  # exact scores, not estimates
    assert (np.diff(scores, axis=1) <= 0).all()
    truth = exact.search(queries, 10)[1]
    assert recall_at(found, truth, 10) > recall_at(coded, truth, 10) + 0.2
    assert not np.allclose(coded_scores, exact.similarities(queries, coded), atol=1e-3)


def test_no_neighbours_is_an_error_not_one_neighbour():
    vectors = clustered(100, 8)
    searcher = SearchIndex.exact(np.arange(100), vectors)
    assert searcher.search(vectors[:2], 1000)[1].shape == (2, 100)  # k beyond the index: all it holds
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        searcher.search(vectors[:2], 0)
    empty = SearchIndex.exact(np.empty(0, np.int64), np.empty((0, 8), np.float32))
    assert (empty.search(vectors[:2], 5)[1] == -1).all()  # the ids of nothing, not an IndexError


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_an_inverted_file_returns_every_neighbour_asked_for(kind):
    vectors = clustered(4000, 16)
    searcher = SearchIndex.build(kind, np.arange(4000), vectors, nlist=40, m=4 if kind == "ivfpq" else None)
    searcher.set_breadth(1)  # one list of about 100 vectors
    searcher.remove(np.arange(0, 4000, 2))
    _, found = searcher.search(vectors[:20], 500)
    assert (found >= 0).all() and not np.isin(found, np.arange(0, 4000, 2)).any()
    assert all(len(set(row)) == 500 for row in found.tolist())
    assert searcher.breadth == 1, "a wider search for one call must not change the tuned breadth"
    assert (searcher.search(vectors[:3], 5000)[1] >= 0).sum(axis=1).tolist() == [2000] * 3  # all that is left


def test_a_graph_with_most_entries_removed_still_returns_every_neighbour_asked_for():
    vectors, ids = clustered(5000, 16), np.arange(5000)
    searcher = SearchIndex.build("hnsw", ids, vectors, m=8)
    searcher.set_breadth(16)
    kept = ids[::50]  # the walk spends its breadth on removed entries: it found 1-8 of 50 here
    searcher.remove(np.setdiff1d(ids, kept))
    scores, found = searcher.search(vectors[:20], 50)
    exact = SearchIndex.exact(kept, vectors[kept]).search(vectors[:20], 50)
    assert (found >= 0).all() and np.isin(found, kept).all()
    np.testing.assert_allclose(scores, exact[0], rtol=1e-5)  # the short rows are searched exactly
    assert searcher.breadth == 16

def test_too_few_vectors_for_an_inverted_file_name_the_way_out():
    with pytest.raises(CbirError, match=r"^4 vectors cannot train 1 inverted list\(s\) \(that needs 9 or more\); "
                                        r"use the flat index$"):  # not "a smaller --nlist": 1 is the least
        SearchIndex.build("ivf", np.arange(4), clustered(4, 8))
    with pytest.raises(CbirError, match=r"^100 vectors cannot train 50 inverted list\(s\) \(that needs 487 or "
                                        r"more\); use a smaller --nlist or the flat index$"):
        SearchIndex.build("ivfpq", np.arange(100), clustered(100, 8), nlist=50)


def test_too_few_vectors_for_pq_codes_is_an_error_not_a_faiss_traceback():
    with pytest.raises(CbirError, match=r"^255 vectors cannot train the 8-bit codes of an ivfpq index \(that needs "
                                        r"256 or more\); use the ivf or flat index$"):
        SearchIndex.build("ivfpq", np.arange(255), clustered(255, 8), nlist=1)
    assert SearchIndex.build("ivfpq", np.arange(256), clustered(256, 8), nlist=1).size == 256


@pytest.mark.parametrize("kind,options,message", [
    ("hnsw", {"m": 1}, "--m 1: an hnsw index needs at least 2 links per node"),  # FAISS segfaults on M=1
    ("hnsw", {"m": 100_000}, r"--m 100000: an hnsw index takes at most 256 links per node \(16-64 is usual; "
                             r"memory grows with them\)"),
    ("hnsw", {"nlist": 4}, "--nlist applies to the ivf and ivfpq indexes, not hnsw"),
    ("flat", {"nlist": 4}, "--nlist applies to the ivf and ivfpq indexes, not flat"),
    ("ivf", {"m": 4}, "--m applies to the ivfpq and hnsw indexes, not ivf"),
])
def test_parameters_of_another_kind_are_refused(kind, options, message):
    with pytest.raises(CbirError, match=f"^{message}$"):
        SearchIndex.build(kind, np.arange(500), clustered(500, 8), **options)


def test_removed_entries_are_skipped_inside_the_search():
    vectors = clustered(5000, 16)
    ids = np.arange(5000)
    for kind in ("flat", "ivf", "ivfpq", "hnsw"):
        searcher = SearchIndex.build(kind, ids, vectors, m=4 if kind in ("ivfpq", "hnsw") else None)
        searcher.set_breadth(10_000)
        gone = ids[:2500]
        searcher.remove(gone)
        _, found = searcher.search(vectors[:50], 10)
        assert not np.isin(found, gone).any(), kind
        assert (found >= 0).all(), f"{kind}: removal must not leave holes in the results"
        searcher.add(ids[:1], -vectors[1:2])  # an update: same id, new vector
        _, found = searcher.search(-vectors[1:2], 1)
        assert found[0, 0] == 0, kind
        if kind in ("flat", "hnsw"):  # they keep their vectors: the updated one is measured, a removed one is not held
            similarity = searcher.similarities(-vectors[1:2], np.array([[0, 1]]))
            np.testing.assert_allclose(similarity[0, 0], vectors[1] @ vectors[1], rtol=1e-5)
            assert similarity[0, 1] == -np.inf, kind


def test_serialised_index_answers_the_same():
    vectors = clustered(4000, 24)
    ids = np.arange(0, 8000, 2)
    searcher = SearchIndex.build("ivf", ids, vectors)
    again = SearchIndex.from_bytes(searcher.to_bytes(), "ivf", searcher.params)
    np.testing.assert_array_equal(again.ids, ids)
    np.testing.assert_array_equal(again.search(vectors[:20], 5)[1], searcher.search(vectors[:20], 5)[1])


def test_recall_counts_shared_neighbours():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at(np.array([[3, 2, 9], [7, 8, 9]]), truth, 3) == pytest.approx(1 / 3)
    assert recall_at(np.array([[1, 0, 0], [4, 0, 0]]), truth, 1) == 1.0


def test_recall_counts_a_tied_duplicate_as_found():
    """Exact search lists one of two identical images; the index may return the other."""
    vectors = clustered(200, 8)
    vectors = np.concatenate([vectors, vectors[:50]])  # 50 images stored twice under other ids
    ids = np.arange(250) * 2
    exact = SearchIndex.exact(ids, vectors)
    queries = vectors[:50] + 0.01
    truth_scores, truth = exact.search(queries, 1)
    twins = np.where(truth == ids[:50, None], ids[200:250, None], ids[:50, None])  # the other copy of each
    assert recall_at(twins, truth, 1) == 0.0  # by id: every answer a miss
    found_scores = exact.similarities(queries, twins)
    np.testing.assert_allclose(found_scores, truth_scores, atol=1e-6)
    assert recall_at(twins, truth, 1, found_scores, truth_scores) == 1.0
    assert exact.similarities(queries[:1], np.array([[-1]]))[0, 0] == -np.inf


# ------------------------------------------------- real embeddings, real Redis
@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_trained_index_on_real_embeddings(mednist_store, mednist_embeddings, kind):
    """IVF-PQ's codes alone ranked these at recall@10 0.4-0.6; its candidates are re-ranked by
    their vectors, read from Redis."""
    _, _, vectors = mednist_embeddings
    report = train_index(mednist_store, kind)
    assert report.count == 2400 and report.tuning.chosen.recall10 >= 0.95
    _loaded.clear()  # as a fresh process: load from Redis
    searcher = search_index(mednist_store)
    assert searcher.kind == kind and searcher.size == 2400
    assert (searcher.refine_vectors is not None) == (kind == "ivfpq")
    queries = vectors[::40] + 0.01  # near, not equal to, stored images
    found = searcher.search(queries, 10)[1]
    assert recall_at(found, exact_truth(mednist_store, queries), 10) >= 0.85


def test_index_follows_additions_and_removals(mednist_store, mednist_embeddings):
    items, _, vectors = mednist_embeddings
    train_index(mednist_store, "ivf")
    ids, _ = mednist_store.load_vectors()
    with mednist_store.writing():
        mednist_store.remove(ids[:300])
        new = mednist_store.add([ImageRecord(name=f"new/{i}", label="new") for i in range(5)], -vectors[:5])
    searcher = search_index(mednist_store)
    assert searcher.size == 2400 - 300 + 5
    found = searcher.search(vectors[:300], 10)[1]
    assert not np.isin(found, ids[:300]).any()
    assert searcher.search(-vectors[:5], 1)[1][:, 0].tolist() == new.ids.tolist()
    _loaded.clear()  # another process replays the same journal
    assert search_index(mednist_store).size == 2400 - 300 + 5


def test_a_journal_entry_a_moment_behind_its_version_bump_is_waited_for(mednist_store):
    """Under Cluster a commit's version bump and journal entry land on two nodes at once: a search
    between the two fell back to exact search with a warning, and reloaded the index next time."""
    train_index(mednist_store, "ivf")
    ids, _ = mednist_store.load_vectors()
    assert search_index(mednist_store).size == 2400
    mednist_store.client.hincrby(mednist_store.info_key, "version", 1)
    late = threading.Timer(0.05, mednist_store.client.rpush,
                           (mednist_store.journal_key, b"-" + ids[:1].astype("<i8").tobytes()))
    late.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", StaleIndexWarning)
            searcher = search_index(mednist_store)
    finally:
        late.join()
    assert searcher.kind == "ivf" and searcher.size == 2399


def test_an_index_that_cannot_catch_up_falls_back_to_exact(mednist_store, mednist_embeddings):
    _, _, vectors = mednist_embeddings
    train_index(mednist_store, "hnsw")
    with mednist_store.writing():
        mednist_store.remove(mednist_store.load_vectors()[0][:10])
    mednist_store.client.delete(mednist_store.journal_key)  # a lost journal
    _loaded.clear()
    with pytest.warns(StaleIndexWarning, match="searching exactly"):
        searcher = search_index(mednist_store)
    assert searcher.kind == "flat" and searcher.size == 2390


@pytest.mark.parametrize("kind,breadth,saved", [("ivf", 3, 3), ("ivf", 500, 61), ("hnsw", 20, 20)])
def test_a_chosen_breadth_is_measured_and_kept(mednist_store, kind, breadth, saved):
    report = train_index(mednist_store, kind, breadth=breadth)
    assert [p.breadth for p in report.tuning.tried] == [saved]  # beyond nlist: every list, no more
    assert report.tuning.chosen.breadth == saved
    _loaded.clear()
    assert search_index(mednist_store).breadth == saved
    with pytest.raises(CbirError, match="^--nprobe applies to the ivf, ivfpq and hnsw indexes, not flat$"):
        train_index(mednist_store, "flat", breadth=breadth)


def test_retraining_replaces_the_old_index_and_drop_removes_it(mednist_store):
    first = train_index(mednist_store, "ivf")
    first_build = index_info(mednist_store)["build"]
    train_index(mednist_store, "ivfpq")
    info = index_info(mednist_store)
    assert info["kind"] == "ivfpq" and info["build"] != first_build
    assert not mednist_store.client.exists(mednist_store.key(f"index:{first_build}:0"))
    assert first.bytes > int(info["bytes"])  # PQ codes are smaller than flat vectors
    mednist_store.drop()
    assert not mednist_store.client.exists(mednist_store.key(f"index:{info['build']}:0"))
    assert not mednist_store.client.exists(mednist_store.key("index"))


def test_cli_trains_and_reports(cli_env, db_name, mednist_embeddings, extractor, capsys, tmp_path):
    store = VectorStore(connect(cli_env), db_name)
    items, shas, vectors = mednist_embeddings
    register_model(store, extractor)
    with store.writing():
        store.add([ImageRecord(name=i.name, label=i.label, sha256=s) for i, s in zip(items, shas)], vectors)
    try:
        report_path = tmp_path / "not" / "yet" / "r.json"  # folders on the way are made
        assert main(["train-index", "--db-name", db_name, "--index", "ivf", "--json", str(report_path)]) == 0
        printed = capsys.readouterr().out
        assert "nlist=61" in printed and "<- chosen" in printed and "bytes/vector" in printed
        assert json.loads(report_path.read_text())["params"]["nlist"] == 61
        assert main(["train-index", "--db-name", db_name, "--index", "ivf", "--nprobe", "1"]) == 0
        assert "try a larger --nprobe than 1, or leave it out to have it tuned" in capsys.readouterr().out
        assert main(["info", "--db-name", db_name]) == 0
        described = capsys.readouterr().out
        assert "index: ivf" in described
        for label, count in Counter(item.label for item in items).items():
            assert re.search(rf"^  {re.escape(label)} +{count}$", described, re.M), label
        old = VectorStore(store.client, db_name + "-old")
        old.ensure_model("fp", {}, 4)
        store.client.hset(old.info_key, "schema", "1")
        assert main(["info"]) == 0  # every database on the server, an unreadable one named with the reason
        listed = capsys.readouterr().out
        assert re.search(rf"^  {db_name} +{len(items)} images   efficientnet_lite0", listed, re.M)
        assert re.search(rf"^  {db_name}-old +\? +database '{db_name}-old' was written by an older cbir", listed, re.M)
        assert main(["train-index", "--db-name", db_name, "--delete"]) == 0
        assert not index_info(store)
    finally:
        store.drop()
        VectorStore(store.client, db_name + "-old").drop()
        _loaded.clear()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_search_among_some_ids_answers_k_of_them(kind):
    """A filter inside FAISS's search: k neighbours from the allowed ids, wherever k are held,
    even where the unfiltered k nearest hold none of them."""
    from cbir.search.index import SearchIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    ids = np.arange(2000) * 3
    index = SearchIndex.exact(ids, vectors) if kind == "flat" else SearchIndex.build(kind, ids, vectors)
    among = ids[1500:1540]  # 40 ids, far from most queries' nearest
    index.remove(among[:5])  # and a removed one is never returned, filter or not
    scores, found = index.search(vectors[:3], 20, among=among)
    assert (found >= 0).all() and np.isin(found, among[5:]).all()
    exact = SearchIndex.exact(among[5:], vectors[1505:1540]).search(vectors[:3], 20)[1]
    recall = np.mean([len(set(row) & set(truth)) / 20 for row, truth in zip(found, exact)])
    assert recall >= (1.0 if kind == "flat" else 0.75), recall
