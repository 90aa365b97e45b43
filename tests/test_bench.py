"""The benchmarks: the ingest bench's Redis part on a small scale against a real embedded Redis, and their flags."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from cbir.store.redis.connect import scratch

from .conftest import ROOT


def _bench(name: str = "bench_ingest"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repeated_ingests_each_start_after_an_aof_rewrite_and_store_every_vector():
    bench = _bench()
    vectors = np.random.default_rng(0).standard_normal((3_000, bench.DIM), dtype=np.float32)
    records = bench.make_records(len(vectors))
    with scratch() as client:
        forks = client.info("stats")["total_forks"]
        runs = bench.ingests_and_baselines(client, vectors, records, baseline_vectors=500, repeats=2, compact=True)
        # One rewrite before each ingest, each finished before the ingest began.
        assert client.info("stats")["total_forks"] - forks == 2
        assert not any(ingest["forked"] for ingest, _ in runs)
        # store_ingest reads every vector back and compares; nothing of the bench is left behind.
        assert [ingest["write"] > 0 and baseline > 0 for ingest, baseline in runs] == [True, True]
        # Memory per image holds the vector and its record: not the server's write buffers (up to
        # 0.38 x the raw vector bytes when the append-only file lagged), and not less than the
        # vectors when the previous run's keys were still being freed in the background.
        raw = bench.DIM * 4
        for ingest, _ in runs:
            assert raw <= ingest["vector_bytes_per_image"] < ingest["bytes_per_image"] < 1.6 * raw
        assert client.dbsize() == 0


def test_the_backbone_flag_takes_registered_names_and_aliases_and_lists_the_choices_otherwise():
    bench = _bench()
    assert bench._backbone_name("DenseNet") == "densenet121"
    assert bench._backbone_name("efficientnet_lite0") == "efficientnet_lite0"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown extractor 'foo'; choose one of: .*densenet121"):
        bench._backbone_name("foo")


def test_the_index_bench_flags_parse_data_sets_and_kinds_and_name_what_is_wrong():
    bench = _bench("bench_index")
    assert bench._data_sets("1000000x128, 100X1280") == [(1_000_000, 128), (100, 1280)]
    for wrong in ("3000x", "x128", "0x128", "3000x-1", "3000*128"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"'{wrong}' is not COUNTxDIM")):
            bench._data_sets(wrong)
    assert bench._index_kinds("ivf,HNSW,flat,ivf") == ["flat", "ivf", "hnsw"]  # the exact baseline first, once
    with pytest.raises(argparse.ArgumentTypeError, match="unknown index kind 'pq'; choose from flat, ivf, ivfpq, hnsw"):
        bench._index_kinds("ivf,pq")


def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


@pytest.mark.parametrize("started_by", [None, _block_sigterm], ids=["plain", "parent-blocking-sigterm"])
def test_a_benchmark_killed_by_sigterm_stops_and_deletes_its_scratch_redis(started_by):
    """Also when started with SIGTERM blocked (a mask is inherited): in the full suite the test
    runner's main thread had it blocked, and the benchmark ran to its end and exited 0."""
    bench = subprocess.Popen([sys.executable, "-u", str(ROOT / "scripts" / "bench_ingest.py"), "--skip-model",
                              "--vectors", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=started_by)
    home = None
    try:
        first = bench.stdout.readline()  # printed once its server runs, with SIGTERM handled
        home = Path(re.search(r"data in (\S+)\)", first).group(1))
        assert home.is_dir()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) != 0
        assert not home.exists(), "the scratch server's folder outlived the benchmark"
    finally:
        bench.kill()
        for orphan in psutil.process_iter() if home else ():  # a failed run must not leave its server behind
            with contextlib.suppress(psutil.Error):
                if orphan.cwd() == str(home):
                    orphan.kill()
        if home:
            shutil.rmtree(home, ignore_errors=True)


def test_the_rerank_bench_prints_plain_and_re_ranked_costs_per_database_size():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_rerank.py"), "--queries", "20", "--sizes", "300",
                          "1000", "--dim", "64"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["300", "1000"]
    assert all(float(value) > 0 for row in rows for value in row[1:])


def test_the_frozen_options_measure_counts_no_copy_of_a_query():
    """A stored copy of a query ranked first is no hit, no relevant image and no voter
    (docs/QUALITY.md's rule): counted, it would make each number 1."""
    options = _bench("frozen_options")
    labels = np.array(["a", "b", "a"], dtype=object)
    copies = np.array([[True, False, False]])
    scores = np.array([[1.0, 0.5, 0.4]])
    top1, knn, map_at_r = options.measured(np.array([[0, 1, 2]]), scores, np.array(["a"], dtype=object), labels, copies)
    # R = 1 (the other "a", third); the vote is "b" against "a", one each, "b" the more similar.
    assert (top1, knn, map_at_r) == (0.0, 0.0, 0.0)
