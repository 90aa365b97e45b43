"""Accuracy metrics and protocols on hand-made cases with known answers, reports, and the CLI."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
from openpyxl import load_workbook

from cbir.cli.main import main
from cbir.errors import CbirError, DataSourceWarning
from cbir.evaluation import ranking as evaluation
from cbir.evaluation.metrics import (
    EvaluationSettings,
    average_precision_at_r,
    confusion,
    hit_rates,
    knn_predict,
    metrics,
)
from cbir.evaluation.protocols import ProtocolOptions, ProtocolResult, leave_one_out, rank_all, run_protocols
from cbir.evaluation.ranking import Queries, Support, rank, relevant_counts
from cbir.evaluation.report import format_table, write_json, write_workbook
from cbir.search.index import SearchIndex
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord
from cbir.store.redis.connect import connect

from .conftest import BREASTMNIST, TEST_INPUT_SIZE

O = lambda values: np.array(values, dtype=object)  # noqa: E731


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_support(vectors, labels, projects=None, groups=None) -> Support:
    n = len(labels)
    return Support(ids=np.arange(n, dtype=np.int64) * 2, labels=O(labels), projects=O(projects or ["p"] * n),
                   sha256=O([f"s{i}" for i in range(n)]), names=O([f"img{i}" for i in range(n)]),
                   groups=None if groups is None else O(groups), vectors=unit(vectors))


def make_queries(vectors, labels, projects=None) -> Queries:
    n = len(labels)
    return Queries(names=O([f"q{i}" for i in range(n)]), labels=O(labels), projects=O(projects or ["p"] * n),
                   sha256=O([f"q{i}" for i in range(n)]), vectors=unit(vectors), ids=np.full(n, -1, np.int64))


def ranked(support, queries, settings=EvaluationSettings()):
    return rank_all(SearchIndex.exact(support.ids, support.vectors), support, queries, settings)


# --------------------------------------------------------------- metrics
def test_hit_rates_on_hand_made_neighbours():
    queries = O(["a", "a", "b", "b"])
    neighbours = O([["a", "b", "b", "b", "b"],   # top-1 hit, majority miss
                    ["b", "a", "a", "a", "b"],   # top-1 miss, top-5 hit, majority hit
                    ["a", "a", "a", "a", "a"],   # all miss
                    ["b", "b", "b", "a", "a"]])  # all hit
    assert hit_rates(queries, neighbours) == {"top1": 0.5, "top5": 0.75, "majority5": 0.5}


def test_average_precision_at_r_by_hand():
    # R=2: a hit at rank 1 only (rank 3 is beyond R) -> (1/1)/2; R=3, hits at ranks 2, 3 -> (1/2 + 2/3)/3;
    # R=0: nothing relevant is stored -> undefined; R=5 cut to the ranking's depth 3 -> (1 + 1 + 1)/3
    hits = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 1, 1]], bool)
    precisions = average_precision_at_r(hits, np.array([2, 3, 0, 5]))
    np.testing.assert_allclose(precisions, [0.5, (0.5 + 2 / 3) / 3, np.nan, 1.0])


def test_map_at_r_agrees_with_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 16))
    labels = rng.integers(0, 4, 200)
    vectors = unit(centres[labels] + 1.2 * rng.standard_normal((200, 16)))
    support = make_support(vectors[:150], [str(v) for v in labels[:150]])
    queries = make_queries(vectors[150:], [str(v) for v in labels[150:]])
    ours = metrics(ranked(support, queries), EvaluationSettings())
    theirs = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count",
                                device=__import__("torch").device("cpu")).get_accuracy(
        vectors[150:], labels[150:], vectors[:150], labels[:150], ref_includes_query=False)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-4)
    assert ours["top1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)


def test_map_at_r_is_exact_where_the_index_is_approximate():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((3, 32))
    labels = np.repeat(np.arange(3), 400)
    support = make_support(centres[labels] + 1.5 * rng.standard_normal((1200, 32)), [str(v) for v in labels])
    queries = make_queries(centres[labels[::40]] + 1.5 * rng.standard_normal((30, 32)), [str(v) for v in labels[::40]])
    ivf = SearchIndex.build("ivf", support.ids, support.vectors, nlist=30)
    ivf.set_breadth(2)
    settings = EvaluationSettings()
    approximate, exact = metrics(rank_all(ivf, support, queries, settings), settings), \
        metrics(ranked(support, queries), settings)
    assert approximate["map_at_r"] == exact["map_at_r"] > 0.3
    deep = metrics(rank(ivf, support, queries, 10, relevant=relevant_counts(support, queries)), settings)  # R from probed lists
    assert deep["map_at_r"] != pytest.approx(exact["map_at_r"], abs=1e-3)
    assert approximate["top1"] > 0.5  # the neighbours themselves still come from the index


def test_knn_votes_count_k_neighbours_beyond_the_largest_class():
    # Neighbours by angle alternate a, b ... then b, b: 11 of them vote a (6:5), all 13 vote b (6:7).
    angles = 0.1 * np.arange(13)
    support = make_support(np.stack([np.cos(angles), np.sin(angles)], axis=1), list("abababababab") + ["b"])
    queries = make_queries([[1, -0.01]], ["b"])
    settings = EvaluationSettings(ks=(11, 13))
    row = metrics(ranked(support, queries, settings), settings)
    assert (row["knn11_accuracy"], row["knn13_accuracy"]) == (0.0, 1.0)


def test_precision_and_project_levels_by_hand():
    # Two queries; support along one axis each, labels/projects chosen so every level differs.
    support = make_support([[1, 0.0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [0.2, 1]],
                           ["a", "b", "a", "b", "b", "a"], projects=["p1", "p2", "p2", "p3", "p3", "p1"])
    queries = make_queries([[1, 0.01], [0.01, 1]], ["a", "b"], projects=["p2", "p3"])
    ranking = ranked(support, queries)
    row = metrics(ranking, EvaluationSettings(ks=(1,), project_groups={"p1": "g", "p2": "g", "p3": "h"}))
    # query 0 ranks a/p1, b/p2, a/p2, ...; query 1 ranks b/p3, b/p3, a/p1, ...
    assert row["top1"] == 1.0 and row["precision5"] == pytest.approx((3 / 5 + 3 / 5) / 2)
    assert row["project_top1"] == 0.5 and row["project_top5"] == 1.0
    assert row["similar_top1"] == 1.0  # p1 and p2 are one group
    assert row["map_at_r"] == pytest.approx(((1 + 2 / 3) / 3 + (1 + 1) / 3) / 2)


def test_votes_differ_as_designed():
    labels = O([["a", "b", "b"]])
    scores = np.array([[0.95, 0.5, 0.4]])
    assert knn_predict(labels, scores, 3, "majority")[0] == "b"
    assert knn_predict(labels, scores, 3, "distance")[0] == "a"  # 0.95 > 0.5 + 0.4
    assert knn_predict(labels, scores, 3, "softmax", temperature=0.07)[0] == "a"
    assert knn_predict(labels, scores, 1)[0] == "a"
    tie = knn_predict(O([["a", "b"]]), np.array([[0.7, 0.8]]), 2, "majority")
    assert tie[0] == "b", "a majority tie goes to the larger similarity"


def test_weighted_counts_each_class_equally():
    # Class a: 3 queries, each next to an "a"; class b: 1 query next to an "a" only.
    support = make_support([[1, 0], [1, 0.1], [0, 1]], ["a", "a", "b"])
    queries = make_queries([[1, 0.01], [1, 0.02], [1, 0.03], [1, 0.05]], ["a", "a", "a", "b"])
    results = run_protocols(["all", "weighted", "separated"], support, queries,
                            SearchIndex.exact(support.ids, support.vectors), EvaluationSettings(ks=(1,)),
                            ProtocolOptions())
    assert results[0].rows[0]["top1"] == 0.75
    assert results[1].rows[0]["top1"] == 0.5
    assert [(r["class"], r["top1"], r["queries"]) for r in results[2].rows] == [
        ("a", 1.0, 3), ("b", 0.0, 1), ("mean of classes", 0.5, 4)]
    assert results[0].rows[0]["knn1_balanced_accuracy"] == 0.5
    assert results[1].rows[0]["knn1_balanced_accuracy"] == results[1].rows[0]["knn1_accuracy"] == 0.5
    assert "knn1_macro_f1" not in results[2].rows[0], "macro F1 of one class alone means nothing"


def test_queries_never_count_themselves_their_copy_or_their_group():
    vectors = [[1, 0, 0], [1, 0.05, 0], [0, 1, 0], [0, 1, 0.05], [0, 0, 1], [0.05, 0, 1]]
    support = make_support(vectors, ["a", "b", "a", "b", "a", "b"], groups=["g1", "g1", "g2", "g2", "g3", "g3"])
    own = Queries.of_support(support)
    without_groups = ranked(make_support(vectors, ["a", "b", "a", "b", "a", "b"]), own)
    assert not (without_groups.positions[:, 0] == np.arange(6)).any(), "a query retrieved itself"
    assert metrics(without_groups, EvaluationSettings(ks=(1,)))["top1"] == 0.0  # its twin is the other class
    with_groups = ranked(support, own)
    first = support.groups[with_groups.positions[:, 0]]
    assert (first != support.groups).all(), "a neighbour came from the query's own group"


def test_map_at_r_counts_only_the_images_a_query_may_retrieve():
    # Patients of two images each, one class per patient; classes far apart, so a perfect ranking.
    rng = np.random.default_rng(1)
    labels = np.repeat(["a", "b"], 12)
    vectors = np.where(labels[:, None] == "a", [1.0, 0.0], [0.0, 1.0]) + 0.01 * rng.standard_normal((24, 2))
    support = make_support(vectors, list(labels), groups=[f"patient{i // 2}" for i in range(24)])
    own = Queries.of_support(support)
    assert relevant_counts(support, own).tolist() == [10] * 24  # 12 of its class, less itself and its twin
    assert metrics(ranked(support, own), EvaluationSettings())["map_at_r"] == 1.0  # R 11 read 10/11 before
    copies = replace(make_queries(vectors[:2], ["a", "a"]), sha256=O(["s0", ""]))  # the first is stored as s0
    assert relevant_counts(make_support(vectors, list(labels)), copies).tolist() == [11, 12]
    hashless = replace(make_support(vectors, list(labels)), sha256=O([""] * 24))
    assert relevant_counts(hashless, Queries.of_support(hashless)).tolist() == [11] * 24  # itself, by id


def test_ranking_in_steps_gives_the_same_numbers(monkeypatch):
    support, queries = clustered_case()
    untimed = lambda row: {k: v for k, v in row.items() if not k.endswith("_ms")}  # noqa: E731
    loo = Queries.of_support(support)
    whole = [untimed(metrics(ranked(support, asked), EvaluationSettings())) for asked in (queries, loo)]
    monkeypatch.setattr(evaluation, "RANKING_CELLS", 100)  # steps of 2 queries at a depth of 35
    assert [untimed(metrics(ranked(support, asked), EvaluationSettings())) for asked in (queries, loo)] == whole


def test_random_queries_take_classes_in_turn():
    from cbir.images.sources import per_class_in_turn

    labels = O(["a"] * 5 + ["b"] * 2 + ["c"] * 3)
    rows = per_class_in_turn(labels, 8, seed=0)
    assert list(labels[rows]) == ["a", "b", "c", "a", "b", "c", "a", "c"]
    assert len(set(rows.tolist())) == 8
    assert rows.tolist() == per_class_in_turn(labels, 8, seed=0).tolist()


def clustered_case(seed=0, per_class=30):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 8))
    labels = np.repeat(["a", "b", "c"], per_class)
    vectors = centres[np.repeat(np.arange(3), per_class)] + 0.8 * rng.standard_normal((3 * per_class, 8))
    return make_support(vectors, list(labels)), make_queries(vectors[::3] + 0.05, list(labels[::3]))


def test_stat_repeats_and_is_reproducible():
    support, queries = clustered_case()
    run = lambda: run_protocols(["stat"], support, queries, SearchIndex.exact(support.ids, support.vectors),  # noqa: E731
                                EvaluationSettings(ks=(1,)), ProtocolOptions(n_queries=9, repeats=4, seed=5))[0]
    rows = run().rows
    assert [r["statistic"] for r in rows] == ["repeat 1", "repeat 2", "repeat 3", "repeat 4", "mean", "std"]
    assert rows[4]["top1"] == pytest.approx(np.mean([r["top1"] for r in rows[:4]]))
    assert rows[5]["top1"] == pytest.approx(np.std([r["top1"] for r in rows[:4]]))
    untimed = lambda rows: [{k: v for k, v in row.items() if not k.endswith("_ms")} for row in rows]  # noqa: E731
    assert untimed(run().rows) == untimed(rows)


def test_stat_asks_every_query_when_fewer_than_n_queries():
    support, queries = clustered_case()  # 30 queries
    with pytest.warns(DataSourceWarning, match="every stat repeat asks all of them"):
        rows = run_protocols(["stat"], support, queries, SearchIndex.exact(support.ids, support.vectors),
                             EvaluationSettings(ks=(1,)), ProtocolOptions(n_queries=100, repeats=2, seed=0))[0].rows
    assert [r["queries"] for r in rows[:3]] == [30, 30, 30]  # the repeats and their mean
    assert "queries" not in rows[3]  # a count has no spread


def test_terminal_table_columns_stay_aligned_under_long_class_names():
    numbers = {"queries": 400, "top1": 1.0, "top5": 1.0, "majority5": 1.0, "precision5": 0.999, "map_at_r": 0.687,
               "knn1_accuracy": 1.0}
    result = ProtocolResult("separated", [{"class": "AbdomenCT", **numbers}, {"class": "x" * 60, **numbers},
                                          {"class": "mean of classes", **numbers}], ["class"])
    lines = format_table(result).splitlines()
    assert len({len(line) for line in lines}) == 1  # every column right-aligned under its header
    assert lines[0].split()[0] == "class" and "x" * 40 in lines[2] and "x" * 41 not in lines[2]


def test_removal_and_incremental_curves():
    support, queries = clustered_case()
    results = run_protocols(["removal", "incremental", "all"], support, queries,
                            SearchIndex.exact(support.ids, support.vectors), EvaluationSettings(ks=(1,)),
                            ProtocolOptions(seed=1))
    removal, by_class, by_sample, everything = results
    assert [r["removed_fraction"] for r in removal.rows] == pytest.approx([i / 10 for i in range(10)])
    assert [r["support"] for r in removal.rows] == [90 - round(9 * i) for i in range(10)]
    assert removal.rows[0]["top1"] == everything.rows[0]["top1"]
    assert [r["classes"] for r in by_class.rows] == [1, 2, 3]
    assert by_class.rows[0]["top1"] == 1.0  # one class in the database: every answer is right
    assert by_class.rows[-1]["top1"] == everything.rows[0]["top1"]
    assert by_sample.rows[-1]["support"] == 90 and by_sample.rows[0]["support"] == 9
    assert by_sample.rows[-1]["top1"] == everything.rows[0]["top1"]


def test_steps_that_leave_no_support_are_left_out():
    """Classes of 2 images bring none in the first 4 of 10 sample-incremental steps, and removing 90 % of
    4 images removes all: those steps crashed (the max of nothing)."""
    vectors = unit(np.eye(4, 8) + 0.01)
    support = make_support(vectors, ["a", "a", "b", "b"])
    queries = make_queries(vectors[[0, 2]], ["a", "b"])
    _, by_sample = run_protocols(["incremental"], support, queries, SearchIndex.exact(support.ids, support.vectors),
                                 EvaluationSettings(ks=(1,)), ProtocolOptions(seed=0))
    assert [r["step"] for r in by_sample.rows] == [5, 6, 7, 8, 9, 10]
    assert [r["support"] for r in by_sample.rows] == [2, 2, 2, 2, 2, 4]
    removal, = run_protocols(["removal"], support, queries, SearchIndex.exact(support.ids, support.vectors),
                             EvaluationSettings(ks=(1,)), ProtocolOptions(seed=0))
    assert [r["support"] for r in removal.rows][-3:] == [2, 1, 1]  # 90 % of 4 rounds to 4: no row for it


def test_interpolation_spans_knn_to_head_and_picks_lambda_on_validation():
    from cbir.evaluation.protocols import linear_probe, protocol_interpolate

    support, queries = clustered_case(seed=2)
    result = protocol_interpolate(support, queries, EvaluationSettings(ks=(5,)), seed=0)
    lambdas = [row["lambda"] for row in result.rows]
    assert lambdas == pytest.approx([i / 10 for i in range(11)])
    assert result.rows[0]["method"] == "kNN" and result.rows[-1]["method"] == "head"
    best = max(row["validation_accuracy"] for row in result.rows)
    assert result.summary["chosen"] and result.summary["validation_accuracy"] == best
    assert sum(row["chosen"] for row in result.rows) == 1
    probe = linear_probe(support.vectors, support.labels, ["a", "b", "c"])
    head_only = (np.array(["a", "b", "c"])[probe(queries.vectors).argmax(axis=1)] == queries.labels).mean()
    assert result.rows[-1]["accuracy"] == pytest.approx(head_only)


def test_unknown_excluded_class_is_a_clear_error():
    support, queries = clustered_case()
    with pytest.raises(Exception, match="no query has class zebra"):
        run_protocols(["remove"], support, queries, SearchIndex.exact(support.ids, support.vectors),
                      EvaluationSettings(), ProtocolOptions(exclude_classes=["zebra"]))


@pytest.mark.parametrize("measures,excluded,message", [
    (["remove"], [], "--measure remove needs --exclude-classes"),  # was: every query, called 'remove'
    (["all"], ["a"], "--exclude-classes applies to --measure remove only"),  # was: silently ignored
    (["remove"], ["a", "b", "c"], "--exclude-classes a, b, c leaves out every query"),
])
def test_remove_and_its_classes_go_together(measures, excluded, message):
    support, queries = clustered_case()
    with pytest.raises(CbirError, match=f"^{message}"):
        run_protocols(measures, support, queries, SearchIndex.exact(support.ids, support.vectors),
                      EvaluationSettings(), ProtocolOptions(exclude_classes=excluded))


def test_hit_rates_that_say_nothing_are_pointed_out():
    support, queries = clustered_case()
    strangers = replace(queries, labels=np.array(["grade 0", "grade 1"] * (len(queries) // 2), dtype=object))
    with pytest.warns(DataSourceWarning, match=r"^no query label \('grade 0', 'grade 1'\) is among the stored "
                                               r"labels \('a', 'b', 'c'\): every hit rate is 0"):
        result = run_protocols(["all"], support, strangers, SearchIndex.exact(support.ids, support.vectors),
                               EvaluationSettings(), ProtocolOptions())
    assert result[0].rows[0]["top1"] == 0.0
    with pytest.warns(DataSourceWarning, match=r"^--project-groups names no stored project \(stored: 'p'\)"):
        run_protocols(["all"], support, queries, SearchIndex.exact(support.ids, support.vectors),
                      EvaluationSettings(project_groups={"other": "g"}), ProtocolOptions())
    one_class = replace(support, labels=np.full(len(support), "a", dtype=object))
    with pytest.warns(DataSourceWarning, match=r"^the database holds one class \('a'\): every neighbour has it"):
        run_protocols(["loo"], one_class, None, SearchIndex.exact(support.ids, support.vectors),
                      EvaluationSettings(), ProtocolOptions())
    with pytest.warns(DataSourceWarning, match=rf"^--k 100 500: more than the {len(support)} stored images"):
        run_protocols(["loo"], support, None, SearchIndex.exact(support.ids, support.vectors),
                      EvaluationSettings(ks=(1, 100, 500)), ProtocolOptions())
    some_unstored = replace(queries, labels=np.where(queries.labels == "c", "d", queries.labels))
    with pytest.warns(DataSourceWarning, match=rf"^10 of the {len(queries)} queries are of a class with no stored "
                                               r"image \('d'\): they count as misses, and mAP@R leaves them out"):
        separated = run_protocols(["separated"], support, some_unstored, SearchIndex.exact(support.ids, support.vectors),
                                  EvaluationSettings(), ProtocolOptions())[0].rows
    assert np.isnan(separated[2]["map_at_r"]) and separated[2]["top1"] == 0.0  # class d
    assert separated[3]["map_at_r"] == pytest.approx((separated[0]["map_at_r"] + separated[1]["map_at_r"]) / 2)
    with warnings.catch_warnings():  # warned once above; scikit-learn's own warning is not repeated
        warnings.simplefilter("error")
        classes, matrix = confusion(ranked(one_class, replace(queries, labels=np.full(len(queries), "a", object))))
    assert classes == ["a"] and matrix.tolist() == [[len(queries)]]


# ---------------------------------------------------------------- reports
def test_workbook_appends_runs_and_json_is_valid(tmp_path):
    support, queries = clustered_case()
    index = SearchIndex.exact(support.ids, support.vectors)
    results = run_protocols(["all", "separated"], support, queries, index, EvaluationSettings(ks=(1, 5)),
                            ProtocolOptions())
    path = tmp_path / "results" / "acc.xlsx"
    config = {"date": "2026-11-22", "database": "db", "seed": 0}
    assert write_workbook(path, results, config, name="frozen") == ["frozen_all", "frozen_separated"]
    assert write_workbook(path, results[:1], config, name="frozen_all") == ["frozen_all_2"]
    book = load_workbook(path)
    assert book.sheetnames == ["summary", "frozen_all", "frozen_separated", "config", "frozen_all_2"]
    summary = list(book["summary"].values)
    assert len(summary) == 4 and summary[1][1] == "frozen_all"
    header = summary[0]
    assert summary[1][header.index("top1")] == pytest.approx(results[0].rows[0]["top1"], abs=1e-6)
    assert len(list(book["config"].values)) == 3
    assert [row[0] for row in list(book["frozen_separated"].values)[1:]] == ["a", "b", "c", "mean of classes"]
    write_json(tmp_path / "acc.json", results, config)
    payload = json.loads((tmp_path / "acc.json").read_text())
    results[1].rows[0]["class"] = '=HYPERLINK("http://x","a")'  # a label or path that looks like a formula
    write_workbook(path, results[1:], {**config, "path": "=cmd|' /C calc'!A0"}, name="injected")
    book = load_workbook(path)
    assert book["injected"]["A2"].value == '=HYPERLINK("http://x","a")' and book["injected"]["A2"].data_type == "s"
    assert all(cell.data_type != "f" for sheet in book for row in sheet.iter_rows() for cell in row)
    assert payload["results"]["all"]["queries"] == 30 and len(payload["results"]["separated"]) == 4


# ------------------------------------------------- real data, real Redis, CLI
def test_loo_on_the_store_excludes_groups(store):
    vectors = unit([[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01], [0, 0, 1], [0.01, 0, 1]])
    store.ensure_model("fp", {}, 3)
    with store.writing():
        store.add([ImageRecord(name=f"img{i}", label="ab"[i % 2]) for i in range(6)], vectors)
    assert leave_one_out(store)["top1"] == 0.0  # each twin is the other class
    groups = {f"img{i}": f"patient{i // 2}" for i in range(6)}
    assert leave_one_out(store, groups=groups)["queries"] == 6
    with pytest.warns(DataSourceWarning, match=r"^--groups names no stored image \(its first name is 'scan0.png'; "
                                               r"stored names look like 'img0'\)"):
        assert leave_one_out(store, groups={"scan0.png": "patient0"})["top1"] == 0.0  # nothing skipped


def test_cli_protocols_into_excel_on_real_images(cli_env, db_name, tmp_path, capsys):
    try:
        assert main(["add", "--db-name", db_name, "--path", str(BREASTMNIST), "--split", "train",
                     "--input-size", str(TEST_INPUT_SIZE), "--quiet"]) == 0
        groups = tmp_path / "groups.csv"
        groups.write_text("name,group\n" + "".join(f"train/{i:03d},{i // 4}\n" for i in range(546)))
        excel = tmp_path / "out" / "accuracy.xlsx"
        common = ["evaluate", "--db-name", db_name, "--path", str(BREASTMNIST), "--split", "test", "--quiet",
                  "--excel-path", str(excel), "--json", str(tmp_path / "acc.json"), "--k", "1", "11"]
        assert main(common + ["--measure", "all", "weighted", "random", "stat", "separated", "remove", "loo",
                              "incremental", "removal", "--exclude-classes", "malignant", "--repeats", "3",
                              "--n-queries", "20", "--groups", str(groups)]) == 0
        printed = capsys.readouterr().out
        assert "removed_fraction" in printed and "knn11_accuracy" in printed
        payload = json.loads((tmp_path / "acc.json").read_text())["results"]
        assert payload["all"]["queries"] == 156 and payload["loo"]["queries"] == 546
        assert payload["remove"]["queries"] == 114
        assert len(payload["removal"]) == 10 and len(payload["incremental_class"]) == 2
        assert 0.6 < payload["all"]["knn1_accuracy"] <= 1
        book = load_workbook(excel)
        assert {"summary", "config", "all", "loo", "removal", "incremental_sample"} <= set(book.sheetnames)
        pictures = sorted(p.name for p in excel.parent.glob("*.png"))
        assert "accuracy_all_confusion.png" in pictures and "accuracy_removal_curve.png" in pictures
        assert main(common + ["--measure", "all", "--name", "again"]) == 0
        assert "again" in load_workbook(excel).sheetnames
        again = json.loads((tmp_path / "acc.json").read_text())["results"]["all"]
        untimed = lambda row: {k: v for k, v in row.items() if not k.endswith("_ms")}  # noqa: E731
        assert untimed(again) == untimed(payload["all"]), "the same run must give the same numbers"
    finally:
        VectorStore(connect(cli_env), db_name).drop()


def test_evaluate_needs_queries_for_query_protocols(cli_env, db_name, capsys):
    store = VectorStore(connect(cli_env), db_name)
    store.ensure_model("fp", {}, 2)
    with store.writing():
        store.add([ImageRecord(name=f"i{i}", label="ab"[i % 2]) for i in range(4)], unit([[1, i] for i in range(4)]))
    try:
        assert main(["evaluate", "--db-name", db_name, "--measure", "all"]) == 2
        assert "needs --path" in capsys.readouterr().err
    finally:
        store.drop()


def test_evaluate_refuses_a_too_small_database_before_embedding_queries(cli_env, db_name, capsys):
    store = VectorStore(connect(cli_env), db_name)
    store.ensure_model("fp", {}, 2)  # no extractor could be rebuilt from it: embedding would fail otherwise
    with store.writing():
        store.add([ImageRecord(name="only", label="a")], unit([[1, 0]]))
    try:
        assert main(["evaluate", "--db-name", db_name, "--path", str(BREASTMNIST), "--quiet"]) == 2
        assert capsys.readouterr().err == f"error: database '{db_name}' holds 1 image(s); protocols need at least 2\n"
    finally:
        store.drop()


def test_a_workbook_to_extend_that_is_no_workbook_is_refused_before_the_protocols_run(cli_env, db_name, tmp_path,
                                                                                      capsys):
    damaged = tmp_path / "accuracy.xlsx"
    damaged.write_text("not a workbook")
    store = VectorStore(connect(cli_env), db_name)
    store.ensure_model("fp", {}, 2)  # no extractor could be rebuilt from it: embedding the queries would fail
    with store.writing():
        store.add([ImageRecord(name=name, label=name) for name in "ab"], unit([[1, 0], [0, 1]]))
    try:
        assert main(["evaluate", "--db-name", db_name, "--path", str(BREASTMNIST), "--excel-path", str(damaged),
                     "--quiet"]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {damaged}: not an Excel workbook that can be extended "
                                                   "(BadZipFile: File is not a zip file); give another --excel-path "
                                                   "or move the file away")
        assert damaged.read_text() == "not a workbook"
    finally:
        store.drop()
