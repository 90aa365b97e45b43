"""End to end on real images and real Redis: index, retrieve, remove, re-run after a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from cbir.cli.main import main
from cbir.errors import LockWaitWarning, StoreError
from cbir.evaluation.protocols import leave_one_out
from cbir.images.sources import load_items
from cbir.pipeline.embed import decode_batches
from cbir.pipeline.ingest import index_images
from cbir.pipeline.model import extractor_for_store, register_model
from cbir.pipeline.retrieve import Neighbour, Retrieval, Retriever, majority_vote
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord
from cbir.store.redis.connect import connect

from .conftest import (
    BREASTMNIST,
    ROOT,
    TEST_INPUT_SIZE,
    _free_port,
    _start_cluster,
    _start_server,
    _stop,
    record_fault,
)
from .test_data import _png_with_split_data, _png_with_two_headers


def indexed(store, items, extractor, chunk_size=128):
    register_model(store, extractor, chunk_size=chunk_size)
    return index_images(store, items, extractor, batch_size=32, workers=1, progress=False)


def test_busi_indexes_and_every_image_retrieves_itself_first(store, busi, extractor):
    items = load_items(busi)
    report = indexed(store, items, extractor)
    assert report.new == 780 and not report.failures and store.count() == 780
    sample = items[::60]
    retrievals, failures = Retriever(store, extractor).query(sample, k=5)
    assert not failures
    for item, retrieval in zip(sample, retrievals):
        assert retrieval.neighbours[0].name == item.name
        assert retrieval.neighbours[0].score == pytest.approx(1.0, abs=1e-4)
        assert retrieval.neighbours[0].label == item.label
        assert retrieval.voters == 4, "the query's own stored copy must not vote"
    again = index_images(store, items, extractor, progress=False)
    assert again.unchanged == 780 and again.written == 0 and store.count() == 780


def test_file_names_that_are_not_utf8_or_hold_control_characters_are_indexed(store, busi, tmp_path, extractor):
    """A Latin-1 name from an old archive crashed the whole add with a UnicodeEncodeError."""
    folder = tmp_path / "cases"
    (folder / "benign").mkdir(parents=True)
    sources = sorted((busi / "benign").iterdir())
    for source, raw_name in zip(sources, [b"caf\xe9 (1).png", b"two\nlines.png", b"tab\tand\x1fsep.png"]):
        shutil.copy(source, os.path.join(os.fsencode(folder / "benign"), raw_name))
    items = load_items(folder)
    report = indexed(store, items, extractor)
    assert report.new == 3 and not report.failures
    names = sorted(record.name for _, record in store.iter_records())
    assert names == ["benign/caf\\xe9 (1).png", "benign/tab\\x09and\\x1fsep.png", "benign/two\\x0alines.png"]
    assert index_images(store, load_items(folder), extractor, progress=False).unchanged == 3
    retrievals, _ = Retriever(store, extractor).query(items[:1], k=1)
    assert retrievals[0].neighbours[0].name == "benign/caf\\xe9 (1).png"


@pytest.mark.parametrize("workers,beside_model", [(1, False), (3, False), (1, True), (2, True)])
def test_decoding_threads_and_processes_give_the_batches_of_one_thread_in_order(busi, tmp_path, extractor, workers,
                                                                                beside_model):
    folder = tmp_path / "mixed" / "benign"
    folder.mkdir(parents=True)
    for path in sorted((busi / "benign").iterdir())[:9]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"not a png")
    # 150 items: threads decode a turn of 8 batches of 16, then one of the last 2 (16 and 6
    # images); processes decode each batch of 16 in two chunks.
    items = load_items(tmp_path / "mixed") * 15
    expected = list(decode_batches(items, extractor.preprocess, batch_size=16, workers=0))
    batches = list(decode_batches(items, extractor.preprocess, batch_size=16, workers=workers,
                                  beside_model=beside_model))
    assert [b.positions for b in batches] == [b.positions for b in expected]
    assert sum(len(b.positions) for b in batches) == 135
    assert [f for b in batches for f in b.failures] == [f"{folder / 'broken.png'}: not an image file"] * 15
    for batch, reference in zip(batches, expected):
        assert batch.sha256 == reference.sha256 and torch.equal(batch.images, reference.images)


def test_npz_split_indexes_with_class_names(store, extractor):
    report = indexed(store, load_items(BREASTMNIST, split="train"), extractor)
    assert report.new == 546
    labels = {record.label for _, record in store.iter_records()}
    assert labels == {"malignant", "normal, benign"}


def test_bad_files_are_reported_and_the_rest_indexed(store, busi, extractor, tmp_path):
    good = sorted((busi / "normal").iterdir())[:5]
    folder = tmp_path / "mixed" / "normal"
    folder.mkdir(parents=True)
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("a clinician's note")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:2000])
    Image.open(good[1]).convert("RGBA").save(folder / "alpha ü.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "deep16.png")
    # Crafted PNGs: the pixel limit and the decoder read the same header (Pillow's, the last IHDR).
    (folder / "two headers, huge last.png").write_bytes(_png_with_two_headers((8, 8), (20000, 20000)))
    (folder / "two headers, huge first.png").write_bytes(_png_with_two_headers((20000, 20000), (8, 8)))  # 8 x 8
    (folder / "split image data.png").write_bytes(_png_with_split_data(16, 8, parts=5))
    report = indexed(store, load_items(tmp_path / "mixed"), extractor)
    assert report.new == 9 and store.count() == 9
    assert sorted(f.split(": ")[1].split(" (")[0] for f in report.failures) == [
        "empty file", "not an image file", "refused, too many pixels", "unreadable or truncated image"]
    assert all(str(folder) in f for f in report.failures)
    for failure in sorted(report.failures):
        name = failure.split(": ")[0].rsplit("/", 1)[1]
        record_fault(f"bad input beside 9 good images: {name}", 9, store.count(), True,
                     failure.replace(str(tmp_path), "…"))


def test_removed_images_are_never_returned(store, busi, extractor):
    items = load_items(busi)[:100]
    indexed(store, items, extractor)
    target = items[10]
    with store.writing():
        store.remove_names([target.name])
    retrievals, _ = Retriever(store, extractor).query([target], k=10)
    assert target.name not in [n.name for n in retrievals[0].neighbours]
    assert len(retrievals[0].neighbours) == 10
    with store.writing():
        store.remove_matching(labels=sorted({item.label for item in items}))
    with pytest.raises(StoreError, match=rf"^database '{store.name}' holds no images \(every one was removed\): "
                                         r"add images first$"):
        Retriever(store, extractor)  # was an IndexError inside the search


def test_query_labels_with_no_stored_image_are_named(store, busi, extractor):
    items = load_items(busi)
    first_of = {label: next(item for item in items if item.label == label) for label in ("benign", "normal")}
    indexed(store, [item for item in items if item.label != "normal"][:40], extractor)
    retriever = Retriever(store, extractor)
    retrievals, _ = retriever.query(list(first_of.values()), k=3)
    assert retriever.unstored_labels(retrievals) == ["normal"]
    no_benign_neighbour = Retrieval(query="q.png", query_label="benign", neighbours=[])
    assert retriever.unstored_labels([no_benign_neighbour]) == [], "benign is stored, if not among the neighbours"
    unlabelled, _ = retriever.query([first_of["normal"]], k=3, known_labels=False)
    assert retriever.unstored_labels(unlabelled) == []


def test_the_database_rebuilds_its_own_extractor(store, extractor):
    indexed(store, load_items(BREASTMNIST, split="val"), extractor)
    rebuilt = extractor_for_store(VectorStore(store.client, store.name), device="cpu")
    assert rebuilt.fingerprint() == extractor.fingerprint()
    assert rebuilt.spec.input_size == TEST_INPUT_SIZE


def test_majority_vote_breaks_ties_by_similarity():
    assert majority_vote(["a", "b", "b", "a"], [0.9, 0.8, 0.7, 0.9]) == ("a", 0.5)
    assert majority_vote(["a", "b", "b"], [0.99, 0.5, 0.5]) == ("b", 2 / 3)
    assert majority_vote([], []) == (None, 0.0)


def test_vote_summary_counts_the_stored_copies_of_the_query():
    """Two stored duplicates of a MedNIST query were reported as "the query's own stored copy"."""
    def summary(labels, copies):
        neighbours = [Neighbour(rank=r + 1, id=r, name=f"n{r}", label=label, project="", score=0.5)
                      for r, label in enumerate(labels)]
        vote, share = majority_vote(labels[copies:], [0.5] * (len(labels) - copies))
        return Retrieval(query="q", query_label=None, neighbours=neighbours, vote=vote, vote_share=share,
                         voters=len(labels) - copies).vote_summary()
    assert summary(["a", "a", "b"], 0) == "a (2/3 neighbours)"
    assert summary(["a", "b", "b"], 1) == "b (2/2 neighbours) (1 stored copy of the query does not vote)"
    assert summary(["a", "a", "a", "b", "b"], 2) == "b (2/3 neighbours) (2 stored copies of the query do not vote)"
    assert summary(["a", "a"], 2) == "none (every neighbour is a stored copy of the query)"


def test_leave_one_out_never_counts_the_query_itself(store):
    """Twins with different labels: each image's nearest *other* image is of the other class."""
    from cbir.store.layout import ImageRecord

    axes = np.eye(8, dtype=np.float32)[:4]
    twins = np.repeat(axes, 2, axis=0) + np.tile([[0.0], [0.01]], (4, 1)) * np.eye(8, dtype=np.float32)[4]
    twins /= np.linalg.norm(twins, axis=1, keepdims=True)
    records = [ImageRecord(name=f"img{i}", label="AB"[i % 2]) for i in range(8)]
    store.ensure_model("fp", {}, 8)
    with store.writing():
        store.add(records, twins)
    accuracy = leave_one_out(store)
    assert accuracy["queries"] == 8 and accuracy["top1"] == 0.0  # 1.0 if a query could retrieve itself
    assert accuracy["top5"] == 1.0


# ------------------------------------------------------------------ the CLI
def cli(*args) -> int:
    return main([str(a) for a in args])


def test_merging_two_exports_that_share_a_file_name_replaces_nothing_silently(cli_env, db_name, tmp_path, capsys):
    """Two hospitals' exports both hold benign/a.png, different images: the second add used to
    report "1 updated" and the first hospital's image was gone."""
    images = np.load(BREASTMNIST)["val_images"]
    for hospital, index in (("n1", 3), ("n2", 4)):
        (tmp_path / hospital / "benign").mkdir(parents=True)
        Image.fromarray(images[index]).save(tmp_path / hospital / "benign" / "a.png")
        Image.fromarray(images[index + 10]).save(tmp_path / hospital / "benign" / f"only {hospital}.png")
    add = ("add", "--db-name", db_name, "--input-size", TEST_INPUT_SIZE, "--quiet", "--workers", 0)
    try:
        assert cli(*add, "--path", tmp_path / "n1") == 0
        capsys.readouterr()
        assert cli(*add, "--path", tmp_path / "n2") == 1  # done, but not everything was stored: a script can tell
        said = capsys.readouterr()
        conflict = f"benign/a.png: stored from {tmp_path / 'n1' / 'benign' / 'a.png'}, not replaced by " \
                   f"{tmp_path / 'n2' / 'benign' / 'a.png'}"
        assert "1 new, 0 updated, 0 unchanged, 1 conflicting" in said.out and f"  {conflict}" in said.err
        store = VectorStore(connect(cli_env), db_name)
        stored = {record.name: record.source for _, record in store.iter_records()}
        assert stored["benign/a.png"] == str(tmp_path / "n1" / "benign" / "a.png")  # the first hospital's, kept
        record_fault("bad input: a second source with another image under a stored name (`benign/a.png`)", 1, 1,
                     True, said.err.splitlines()[-1].strip().replace(str(tmp_path), "…"))
        # Both kept, named by project; or the new content replacing the old, when asked for.
        assert cli(*add, "--path", tmp_path / "n1", "--names-by-project") == 0
        assert cli(*add, "--path", tmp_path / "n2", "--names-by-project") == 0
        names = {record.name for _, record in store.iter_records()}
        assert {"n1/benign/a.png", "n2/benign/a.png"} <= names
        capsys.readouterr()
        assert cli(*add, "--path", tmp_path / "n2", "--update") == 0
        assert "0 new, 1 updated, 1 unchanged" in capsys.readouterr().out
    finally:
        VectorStore(connect(cli_env), db_name).drop()


def test_the_exit_status_tells_a_script_that_files_were_skipped(cli_env, db_name, tmp_path, capsys):
    """0 all done, 1 done with files skipped (listed last on stderr), 2 an error."""
    folder = tmp_path / "cases" / "normal"
    folder.mkdir(parents=True)
    Image.fromarray(np.load(BREASTMNIST)["val_images"][3]).save(folder / "good.png")
    (folder / "notes.txt").write_text("a clinician's note")
    skipped = f"1 file skipped:\n  {folder / 'notes.txt'}: not an image file\n"
    add = ["add", "--db-name", db_name, "--path", tmp_path / "cases", "--input-size", TEST_INPUT_SIZE, "--quiet",
           "--workers", 0]
    try:
        assert cli(*add) == 1 and capsys.readouterr().err.endswith(skipped)
        assert cli("retrieve", "--db-name", db_name, "--path", folder, "--no-picture") == 1
        answered = capsys.readouterr()
        assert "good.png" in answered.out and answered.err.endswith(skipped)
        assert cli("dataset", "--path", tmp_path / "cases", "--out-dir", tmp_path / "charts", "--quiet") == 1
        assert capsys.readouterr().err.endswith(skipped)
        (folder / "notes.txt").unlink()
        assert cli(*add) == 0 and "1 unchanged" in capsys.readouterr().out
        assert cli("retrieve", "--db-name", db_name, "--path", folder / "notes.txt") == 2
    finally:
        VectorStore(connect(cli_env), db_name).drop()


def test_remove_by_content_whatever_the_name(cli_env, db_name, tmp_path, capsys):
    """A patient's files, exported again under other names, find and remove their stored copies."""
    images = np.load(BREASTMNIST)["val_images"]
    for index, label in [(0, "benign"), (1, "benign"), (2, "malignant")]:
        (tmp_path / "cases" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(tmp_path / "cases" / label / f"case {index}.png")
    withdrawn = tmp_path / "withdrawn"
    withdrawn.mkdir()
    shutil.copy(tmp_path / "cases" / "benign" / "case 1.png", withdrawn / "patient 7.png")
    Image.fromarray(images[3]).save(withdrawn / "never stored.png")
    remove = ["remove", "--db-name", db_name, "--path", withdrawn]
    try:
        assert cli("add", "--db-name", db_name, "--path", tmp_path / "cases", "--input-size", TEST_INPUT_SIZE,
                   "--quiet", "--workers", 0) == 0
        assert cli("add", "--db-name", db_name, "--path", BREASTMNIST, "--split", "val", "--input-size",
                   TEST_INPUT_SIZE, "--quiet", "--workers", 0) == 0
        capsys.readouterr()
        assert cli(*remove) == 0
        said = capsys.readouterr()
        assert f"removed 1 image from '{db_name}'; 80 remain" in said.out
        assert said.err == f"no stored image has the content of 1 of the 2 files of {withdrawn}: 'never stored.png'\n"
        store = VectorStore(connect(cli_env), db_name)
        assert "benign/case 1.png" not in {record.name for _, record in store.iter_records()}
        assert cli(*remove) == 0 and "removed 0 images" in capsys.readouterr().out  # again: nothing, no error
        assert cli("remove", "--db-name", db_name, "--path", BREASTMNIST, "--split", "val") == 0
        assert f"removed 78 images from '{db_name}'; 2 remain" in capsys.readouterr().out
        assert cli("remove", "--db-name", db_name) == 2
        assert "give --name, --label and/or --path" in capsys.readouterr().err
    finally:
        VectorStore(connect(cli_env), db_name).drop()


@pytest.mark.parametrize("cli_env", ["standalone", "tls"], indirect=True)
def test_cli_add_retrieve_json_remove_evaluate(cli_env, db_name, tmp_path, capsys):
    try:
        assert cli("add", "--db-name", db_name, "--path", BREASTMNIST, "--split", "val",
                   "--input-size", TEST_INPUT_SIZE, "--quiet", "--workers", 0) == 0
        assert "78 new" in capsys.readouterr().out
        query = tmp_path / "query.png"
        Image.fromarray(np.load(BREASTMNIST)["val_images"][5]).save(query)
        out_json = tmp_path / "out" / "result.json"
        assert cli("retrieve", "--db-name", db_name, "--path", query, "--nrt-neigh", 3,
                   "--results-dir", tmp_path / "pictures", "--json", out_json) == 0
        printed = capsys.readouterr().out
        assert "val/05" in printed and "vote:" in printed
        result = json.loads(out_json.read_text())
        assert set(result) >= {"query", "results", "vote"}
        assert result["results"][0] == {"rank": 1, "id": 5, "name": "val/05", "label": result["results"][0]["label"],
                                        "project": "breastmnist", "score": pytest.approx(1.0, abs=1e-4)}
        pictures = list((tmp_path / "pictures").glob("retrieval_*.png"))
        assert len(pictures) == 1 and Image.open(pictures[0]).size[0] > 400
        # --verbose: where the time went, on stderr; the thesis's flag spellings work as well.
        assert cli("retrieve", "--db_name", db_name, "--path", query, "--nrt_neigh", 3, "--no_picture", "--verbose") == 0
        timings = capsys.readouterr().err.splitlines()[-1]
        assert all(f" {step} " in timings for step in ("cli", "redis", "imports", "model", "index", "embed",
                                                          "search", "records"))
        with pytest.warns(UserWarning, match=f"--nrt-neigh 100 is more than the 78 images of '{db_name}'"):
            assert cli("retrieve", "--db-name", db_name, "--path", query, "--nrt-neigh", 100,
                       "--results-dir", tmp_path / "pictures") == 0
        assert "(the first 20 of 78 neighbours; --html and --json take them all)" in capsys.readouterr().out
        new_cases = tmp_path / "new cases"  # a folder of unlabelled images: each one is a query
        new_cases.mkdir()
        for index in (7, 9):
            Image.fromarray(np.load(BREASTMNIST)["val_images"][index]).save(new_cases / f"case {index}.png")
        assert cli("retrieve", "--db-name", db_name, "--path", new_cases, "--nrt-neigh", 2, "--no-picture",
                   "--json", out_json) == 0
        cases = json.loads(out_json.read_text())
        assert [(c["query"], c["query_label"], c["results"][0]["name"]) for c in cases] == [
            ("case 7.png", None, "val/07"), ("case 9.png", None, "val/09")]
        assert cli("retrieve", "--db-name", db_name, "--path", BREASTMNIST, "--split", "test",
                   "--nrt-neigh", 5, "--no-picture", "--json", out_json) == 0
        per_class = json.loads(out_json.read_text())
        assert [r["query_label"] for r in per_class] == ["malignant", "normal, benign"]
        assert cli("remove", "--db-name", db_name, "--name", "val/05") == 0
        capsys.readouterr()
        assert cli("remove", "--db-name", db_name, "--name", "val/05", "--label", "zebra") == 0  # again: nothing
        removal = capsys.readouterr()
        assert "removed 0 images" in removal.out
        assert removal.err.splitlines() == [
            f"not stored in '{db_name}' (names as stored, e.g. as retrieve prints them): val/05",
            f"no image labelled zebra in '{db_name}'"]
        assert cli("evaluate", "--db-name", db_name, "--measure", "loo", "--results-dir", tmp_path,
                   "--json", tmp_path / "acc.json") == 0
        assert json.loads((tmp_path / "acc.json").read_text())["results"]["loo"]["queries"] == 77
    finally:
        VectorStore(connect(cli_env), db_name).drop()


def test_cli_errors_are_one_line(cli_env, db_name, capsys):
    assert cli("add", "--db-name", db_name, "--path", "/no/such/folder") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: /no/such/folder: no such file") and error.count("\n") == 1
    assert cli("retrieve", "--db-name", db_name, "--path", BREASTMNIST) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli("add", "--db-name", "bad name", "--path", BREASTMNIST) == 2


def test_cli_runs_outside_the_main_thread_and_gives_the_signal_handlers_back(cli_env, db_name, capsys):
    """Only the main thread may set signal handlers: elsewhere the CLI leaves Ctrl-C and SIGTERM alone."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(cli("add", "--db-name", db_name, "--path", "/no/such")))
    worker.start()
    worker.join()
    assert codes == [2] and "no such file" in capsys.readouterr().err
    assert cli("add", "--db-name", db_name, "--path", "/no/such") == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_cli_refuses_to_mix_models(cli_env, db_name, capsys):
    try:
        assert cli("add", "--db-name", db_name, "--path", BREASTMNIST, "--split", "val",
                   "--input-size", TEST_INPUT_SIZE, "--quiet") == 0
        assert cli("add", "--db-name", db_name, "--path", BREASTMNIST, "--split", "test",
                   "--input-size", 32, "--quiet") == 2
        assert "was built with efficientnet_lite0" in capsys.readouterr().err
        assert VectorStore(connect(cli_env), db_name).count() == 78
    finally:
        VectorStore(connect(cli_env), db_name).drop()


@pytest.mark.parametrize("mistake,message", [(("--weights", "no_such.pth"), "no_such.pth: no such weights file"),
                                              (("--num-features", 7), "--num-features 7, but efficientnet_lite0")])
def test_a_rewrite_with_a_mistaken_model_flag_keeps_the_database(cli_env, db_name, mistake, message, capsys):
    """--rewrite deleted the database and then the model flag was refused: a typo cost every image."""
    store = VectorStore(connect(cli_env), db_name)
    store.ensure_model("fp", {}, 2)
    with store.writing():
        store.add([ImageRecord(name=name, label=name) for name in "ab"], np.eye(2, dtype=np.float32))
    try:
        assert cli("add", "--db-name", db_name, "--path", BREASTMNIST, "--split", "val", "--input-size",
                   TEST_INPUT_SIZE, "--rewrite", *mistake, "--quiet") == 2
        err = capsys.readouterr().err
        assert message in err and "deleted" not in err
        assert store.count() == 2 and store.model == "fp"
    finally:
        store.drop()


def test_cli_writers_leave_a_database_being_written_alone(cli_env, db_name, capsys):
    store = VectorStore(connect(cli_env), db_name)
    add = ("add", "--db-name", db_name, "--path", BREASTMNIST, "--split", "val", "--input-size", TEST_INPUT_SIZE,
           "--quiet")
    try:
        assert cli(*add) == 0
        capsys.readouterr()
        with store.writing():
            assert cli(*add, "--rewrite") == 2
            assert "being written by another process" in capsys.readouterr().err
            with pytest.warns(LockWaitWarning, match="waiting up to 0.2 s"):
                assert cli("remove", "--db-name", db_name, "--label", "malignant", "--wait", "0.2") == 2
            assert "waited 0.2 s" in capsys.readouterr().err
            assert cli("train-index", "--db-name", db_name, "--delete") == 2
            assert store.count() == 78 and store.client.get(store.key("lock")) is not None
        assert cli(*add, "--rewrite") == 0
        assert "--rewrite: deleted database" in capsys.readouterr().out and store.count() == 78
    finally:
        store.drop()


def _add_busi_command(db_name: str, busi) -> list[str]:
    """`add` of BUSI in small batches and chunks, so that a kill lands between many writes."""
    return [sys.executable, str(ROOT / "add_images.py"), "--db-name", db_name, "--path", str(busi),
            "--input-size", str(TEST_INPUT_SIZE), "--batch-size", "8", "--chunk-size", "64", "--quiet"]


def _once_stored(store: VectorStore, process: subprocess.Popen, count: int) -> None:
    """Returns once the running ``process`` has stored ``count`` images."""
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        store.refresh()
        if store.exists and store.count() >= count:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()


def _every_busi_image_once(store: VectorStore) -> int:
    """How many images are stored, once it is checked that they are BUSI's 780, each once, each whole."""
    ids, vectors = store.load_vectors()
    names = [record.name for _, record in store.iter_records()]
    assert len(ids) == 780 and len(names) == 780 and len(set(names)) == 780
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3), "a stored image without its vector"
    return len(names)


def _rerun_completes(store: VectorStore, command: list[str], env: dict, partial: int) -> str:
    """A re-run of ``command`` stores the missing images: every BUSI image once, each with its vector.
    Returns how many the first run had stored and what the re-run said, for the fault table."""
    assert 100 <= partial < 780
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    stored = _every_busi_image_once(store)
    assert f"{780 - partial} new" in rerun.stdout, rerun.stdout
    return f"{partial}, then {stored}"


@pytest.mark.parametrize("where,kill", [("embedded", signal.SIGKILL), ("standalone", signal.SIGKILL),
                                        ("embedded", signal.SIGTERM)])
def test_killed_indexing_rerun_stores_every_image_exactly_once(where, kill, request, db_name, busi):
    """Kill an `add` mid-run, run it again: every image once, none lost, none doubled."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if where == "embedded":
        home = request.getfixturevalue("embedded_home")
        client = request.getfixturevalue("embedded_client")
        env["CBIR_HOME"] = str(home)
        env.pop("CBIR_REDIS_URL", None)
    else:
        url = request.getfixturevalue("standalone_url")
        client = connect(url)
        env["CBIR_REDIS_URL"] = url
    command = _add_busi_command(db_name, busi)
    store = VectorStore(client, db_name)
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _once_stored(store, process, 100)
        process.send_signal(kill)
        process.wait(timeout=60)
        told = ""
        if kill == signal.SIGTERM:  # ended like Ctrl-C: the batch in flight stored, exit handlers run
            assert process.returncode == 128 + signal.SIGTERM
            told = process.stderr.read().decode().splitlines()[-1]
            assert told.startswith("terminated: what was stored is kept")
        stored = _rerun_completes(store, command, env, store.count())
        record_fault(f"`add` sent {kill.name} mid-run ({where} Redis), then run again", 780, stored, True, told)
    finally:
        store.drop()


def test_indexing_rides_out_a_redis_restart(redis_server_binary, tmp_path, db_name, busi):
    """The server restarts mid-`add` (down for about a second): the run goes on, sends its writes
    in flight again, stores every image once and says that it reconnected."""
    port = _free_port()
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    servers = [_start_server(redis_server_binary, port, tmp_path, *durable)]
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=url)
    try:
        process = subprocess.Popen(_add_busi_command(db_name, busi), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        store = VectorStore(connect(url), db_name)
        _once_stored(store, process, 100)
        _stop(servers)
        time.sleep(1.0)
        servers = [_start_server(redis_server_binary, port, tmp_path, *durable)]
        out, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors
        assert "the connection to Redis was lost and made again 1 time(s)" in errors
        assert "780 new" in out
        record_fault("Redis restarted mid-`add` (down about 1 s)", 780, _every_busi_image_once(store), True,
                     errors.strip().splitlines()[-1][:160] + " ...")
    finally:
        _stop(servers)


def test_a_redis_crash_mid_indexing_is_one_error_and_a_rerun_completes(redis_server_binary, tmp_path, db_name,
                                                                      busi):
    """The server dies (SIGKILL) mid-`add` and stays down past the client's retries; it comes back from
    its append-only file, which holds every acknowledged write in order: whatever prefix of a write
    survived, the re-run stores every image once, each one whole."""
    port = _free_port()
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    server = _start_server(redis_server_binary, port, tmp_path, *durable)
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=url)
    command = _add_busi_command(db_name, busi)
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _once_stored(VectorStore(connect(url), db_name), process, 100)
        server.kill()
        server.wait()
        process.wait(timeout=120)
        errors = process.stderr.read().decode().splitlines()
        assert process.returncode == 2, errors
        assert errors[-1].startswith("error: Redis failed while ") and f" database '{db_name}': " in errors[-1]
        assert errors[-1].endswith(". Stored images are kept; re-run to continue.") and ".." not in errors[-1]
        server = _start_server(redis_server_binary, port, tmp_path, *durable)
        store = VectorStore(connect(url), db_name)
        stored = _rerun_completes(store, command, env, store.count())
        record_fault("Redis server killed (SIGKILL) mid-`add`, restarted from its append-only file, `add` run again",
                     780, stored, True, errors[-1])
    finally:
        _stop([server])


def test_a_stalled_redis_mid_indexing_is_one_error_after_one_socket_timeout(redis_server_binary, tmp_path, db_name,
                                                                           busi):
    """Redis stops answering mid-`add` (SIGSTOP: a hung server, or a network that drops packets): one
    error after one socket timeout. The run used to wait out the same silence twice, the second time
    to read the replies of the writes in flight. Once the server answers again, a re-run completes."""
    timeout = 3.0
    port = _free_port()
    server = _start_server(redis_server_binary, port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=f"{url}?socket_timeout={timeout:g}")
    command = _add_busi_command(db_name, busi)
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _once_stored(VectorStore(connect(url), db_name), process, 100)
        server.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            errors = process.communicate(timeout=120)[1].decode().splitlines()
            waited = time.monotonic() - stopped
        finally:
            server.send_signal(signal.SIGCONT)
        assert process.returncode == 2, errors
        assert errors[-1].startswith("error: Redis stopped answering (Timeout reading from socket) while "), errors
        assert waited < 2 * timeout, f"{waited:.1f} s: the {timeout:g} s socket timeout was waited out twice"
        store = VectorStore(connect(url), db_name)
        stored = _rerun_completes(store, command, env, store.count())
        record_fault("Redis stalled (SIGSTOP) mid-`add`, resumed, `add` run again", 780, stored, True, errors[-1])
    finally:
        _stop([server])


def _busi_add_on_a_cluster(binary, root, processes, db_name, busi, replicas, lose, timeout=2.0,
                           node_timeout_ms=1000):
    """`add` BUSI on a cluster started for it and, once 100 images are stored, send ``lose`` to a
    primary other than the one in the URL. The finished process, its output and error lines, the
    seconds from the loss to its end, the store and the command's environment."""
    ports = _start_cluster(binary, root, processes, replicas=replicas, node_timeout_ms=node_timeout_ms)
    url = f"redis://127.0.0.1:{ports[0]}/0"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=f"{url}?socket_timeout={timeout:g}")
    store = VectorStore(connect(url), db_name)
    process = subprocess.Popen(_add_busi_command(db_name, busi), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _once_stored(store, process, 100)
    lost = next(node for node in store.client.get_primaries() if node.port != ports[0])
    server = processes[ports.index(lost.port)]
    server.send_signal(lose)
    started = time.monotonic()
    try:
        out, errors = process.communicate(timeout=300)
    finally:
        if lose == signal.SIGSTOP:
            server.send_signal(signal.SIGCONT)
    waited = time.monotonic() - started
    if lose == signal.SIGSTOP and replicas:
        # Woken, the old primary serves its stale data until it learns that its replica replaced it.
        _wait_until_replica(redis.Redis(port=lost.port))
    return process, out, errors.splitlines(), waited, store, env


def _wait_until_replica(node: redis.Redis, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (info := node.info("replication"))["role"] != "slave" or info.get("master_link_status") != "up":
        assert time.monotonic() < deadline, f"the node did not become a replica in sync: {info}"
        time.sleep(0.1)


@pytest.mark.parametrize("lose, timeout, node_timeout_ms", [
    (signal.SIGKILL, 2.0, 1000),
    (signal.SIGSTOP, 2.0, 4000),  # the socket timeout ends first, then the run waits for the failover
    (signal.SIGSTOP, 6.0, 1000),  # the cluster fails the node over while the socket timeout runs
], ids=["crashed", "stalled, timed out first", "stalled, failed over first"])
def test_indexing_rides_out_a_cluster_failing_a_lost_primary_over(redis_server_binary, tmp_path, db_name, busi,
                                                                   lose, timeout, node_timeout_ms):
    """A primary crashes or stops answering mid-`add` on a Cluster with replicas: the run waits
    for the cluster to promote the replica and goes on. It used to give up 1.6 s after a crash
    (redis-py retried at once, 8 times, long before the failover) and stored every image once; a
    failover finished before the socket timeout did was taken for a primary without a replica."""
    processes: list[subprocess.Popen] = []
    try:
        process, out, errors, _, store, _ = _busi_add_on_a_cluster(
            redis_server_binary, tmp_path, processes, db_name, busi, replicas=1, lose=lose, timeout=timeout,
            node_timeout_ms=node_timeout_ms)
        assert process.returncode == 0, errors
        assert "780 new" in out
        if lose == signal.SIGKILL:
            fault = "killed"
        else:
            fault = "stalled" + (" past its failover" if timeout * 1000 > node_timeout_ms else "")
        record_fault(f"Cluster primary {fault} mid-`add`, with a replica", 780, _every_busi_image_once(store),
                     True, out.strip().splitlines()[-1])
    finally:
        _stop(processes)


def test_a_stalled_cluster_primary_without_replica_is_one_error_soon(redis_server_binary, tmp_path, db_name, busi):
    """Nothing can replace a stalled primary without a replica: one error after about one socket
    timeout (redis-py's cluster pipeline sent each command of the node again, each retried 8 times:
    268 s at a 3 s timeout, 45 min at the default 30 s). Once it answers again, a re-run completes."""
    processes: list[subprocess.Popen] = []
    timeout = 2.0
    try:
        process, _, errors, waited, store, env = _busi_add_on_a_cluster(
            redis_server_binary, tmp_path, processes, db_name, busi, replicas=0, lose=signal.SIGSTOP, timeout=timeout)
        assert process.returncode == 2, errors
        assert errors[-1].startswith("error: Redis stopped answering (Timeout reading from socket) while "), errors
        assert waited < 3 * timeout, f"{waited:.1f} s after the node stalled, at a {timeout:g} s socket timeout"
        stored = _rerun_completes(store, _add_busi_command(db_name, busi), env, store.count())
        record_fault("Cluster primary without a replica stalled mid-`add`, resumed, `add` run again", 780, stored,
                     True, errors[-1])
    finally:
        _stop(processes)


def test_a_reader_that_leaves_early_ends_the_command_quietly(standalone_url, db_name):
    """`cbir info | head -1`: no 'Broken pipe' error line, the shell's status for it, the store untouched."""
    store = VectorStore(connect(standalone_url), db_name)
    store.ensure_model("fp", {}, 2)
    with store.writing():
        store.add([ImageRecord(name=f"i{i}", label=f"class {i}") for i in range(3)], np.eye(3, 2, dtype=np.float32))
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=standalone_url)
        reader = subprocess.Popen([sys.executable, "-m", "cbir", "info", "--db-name", db_name], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader.stdout.close()  # before the command has started printing: its first line finds no reader
        _, errors = reader.communicate(timeout=120)
        assert reader.returncode == 128 + signal.SIGPIPE and errors == b""
        assert store.count() == 3
    finally:
        store.drop()
