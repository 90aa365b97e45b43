"""Pictures: files are produced, with the expected sizes and numbers of panels."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from cbir.cli.main import main
from cbir.images.sources import load_items
from cbir.pipeline.retrieve import Neighbour, Retrieval
from cbir.store.layout import ImageRecord
from cbir.viz.overview import dataset_stats, save_dataset_charts, save_tsne, stratified_sample
from cbir.viz.pictures import save_class_samples, save_retrieval_grid, save_retrieval_html
from cbir.viz.plots import DPI, training_curves

from .conftest import BREASTMNIST


def tiny_database(store, per_class=20):
    rng = np.random.default_rng(0)
    vectors = np.repeat(np.eye(4, 16, dtype=np.float32) * 3, per_class, axis=0)
    vectors += 0.3 * rng.standard_normal(vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.repeat(["a", "b", "c", "d"], per_class)
    store.ensure_model("fp", {}, 16)
    with store.writing():
        store.add([ImageRecord(name=f"img{i}", label=labels[i], project=f"p{i % 2}") for i in range(len(labels))],
                  vectors)


def test_stratified_sample_keeps_every_class():
    labels = np.array(["big"] * 950 + ["small"] * 45 + ["rare"] * 5, dtype=object)
    rows = stratified_sample(labels, 100, seed=0)
    kept = dict(zip(*np.unique(labels[rows], return_counts=True)))
    assert kept == {"big": 95, "small": 4, "rare": 1}
    assert rows.tolist() == stratified_sample(labels, 100, seed=0).tolist()
    assert len(stratified_sample(labels, 5000, seed=0)) == 1000
    # Rounding each class down (1.3 and 3.7 rows) must not leave the sample short of its size.
    two = np.array(["malignant"] * 21 + ["benign"] * 57, dtype=object)
    kept = dict(zip(*np.unique(two[stratified_sample(two, 5, seed=0)], return_counts=True)))
    assert kept == {"malignant": 1, "benign": 4}


@pytest.mark.parametrize("deployment", ["embedded"], indirect=True)
def test_tsne_of_a_tiny_database(store, tmp_path):
    tiny_database(store)
    one = save_tsne(store, tmp_path / "tsne.png", perplexity=10)
    assert one.panels == 1 and one.points == 80
    two = save_tsne(store, tmp_path / "tsne2.png", perplexity=10, by_project=True, max_points=40)
    assert two.panels == 2 and two.points == 40
    assert Image.open(two.path).size == (round(2 * 6.0 * DPI), round(5.2 * DPI))
    assert Image.open(one.path).size == (round(6.0 * DPI), round(5.2 * DPI))


def test_dataset_overview_pictures(tmp_path):
    items = load_items(BREASTMNIST, split="val")
    stats = dataset_stats(items, progress=False)
    assert len(stats.labels) == 78 and set(stats.widths) == {28}
    pictures = save_dataset_charts(stats, tmp_path, "breast")
    assert [p.panels for p in pictures] == [1, 2]
    assert all(p.path.stat().st_size > 10_000 for p in pictures)
    grid = save_class_samples(items, tmp_path / "samples.png", per_class=5)
    assert Image.open(grid).size == (round(1.6 * 5 * 110), round(1.8 * 2 * 110))  # 2 classes, 5 columns
    few = save_class_samples([i for i in items if i.label == items[0].label][:3], tmp_path / "few.png", per_class=30)
    assert Image.open(few).size[0] == round(1.6 * 3 * 110)  # no empty columns beyond the largest class


def make_retrievals(location: str) -> list[Retrieval]:
    rows = []
    for query, label in (("q1", "a"), ("q2", "b")):
        neighbours = [Neighbour(rank=r, id=r, name=f"n{r}", label="ab"[r % 2], project="p", score=1 - r / 10,
                                source=location) for r in range(1, 4)]
        rows.append(Retrieval(query=query, query_label=label, neighbours=neighbours, vote="a", vote_share=2 / 3,
                              voters=3, location=location))
    return rows


def test_retrieval_gallery_png_and_html(tmp_path):
    location = load_items(BREASTMNIST, split="val")[0].location
    retrievals = make_retrievals(location)
    grid = save_retrieval_grid(retrievals, tmp_path / "grid.png")
    assert Image.open(grid).size == (round(1.7 * 4 * 110), round(2.0 * 2 * 110))  # 2 rows of query + 3
    first = save_retrieval_grid(retrievals, tmp_path / "first.png", max_rows=1)
    assert Image.open(first).size == (round(1.7 * 4 * 110), round(2.0 * 1 * 110))
    narrow = save_retrieval_grid(retrievals, tmp_path / "narrow.png", max_neighbours=2)
    assert Image.open(narrow).size == (round(1.7 * 3 * 110), round(2.0 * 2 * 110))  # query + 2 of 3 neighbours
    page = save_retrieval_html(retrievals, tmp_path / "gallery.html").read_text()
    assert page.count("<section>") == 2 and page.count("<figure") == 8
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 8
    assert page.count("#c62828") == 3 and page.count("#2e7d32") == 3  # frames: label mismatch / match
    assert page.count("<p>vote: a (2/3 neighbours)</p>") == 2


def test_training_curves_from_a_log(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,precision_at_1,map_at_r,lr,seconds\n1,0.9,0.6,0.3,0.001,12\n2,0.7,0.7,0.4,0.001,11\n")
    picture = training_curves(log, tmp_path / "curves.png")
    assert Image.open(picture).size == (round(2 * 4.8 * DPI), round(4.0 * DPI))
    (tmp_path / "bad.csv").write_text("step,loss\n")
    with pytest.raises(ValueError, match="epoch"):
        training_curves(tmp_path / "bad.csv", tmp_path / "x.png")


def test_cli_pictures(cli_env, db_name, tmp_path):
    from cbir.store.database import VectorStore
    from cbir.store.redis.connect import connect

    store = VectorStore(connect(cli_env), db_name)
    tiny_database(store)
    try:
        assert main(["tsne", "--db-name", db_name, "--perplexity", "5", "--out-dir", str(tmp_path)]) == 0
        assert (tmp_path / f"tsne_{db_name}.png").exists()
    finally:
        store.drop()
    assert main(["dataset", "--path", str(BREASTMNIST), "--split", "test", "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.glob("breastmnist_test_*.png")) == [
        "breastmnist_test_classes.png", "breastmnist_test_samples.png", "breastmnist_test_sizes_intensity.png"]
