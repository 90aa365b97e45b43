"""cbir.api, the library's face, used as a notebook or a service would: real Redis, real images."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cbir import api
from cbir.errors import CbirError, ModelMismatchError
from cbir.store.database import VectorStore

from .conftest import BREASTMNIST, TEST_INPUT_SIZE


@pytest.fixture
def database(cli_env, db_name):
    store = api.open_database(db_name)  # the URL comes from $CBIR_REDIS_URL, as for the commands
    yield store
    VectorStore(store.client, db_name).drop()


def test_add_search_remove_through_the_api(database, tmp_path):
    items = api.load_items(BREASTMNIST, split="val")
    extractor = api.model_for_add(database, input_size=TEST_INPUT_SIZE)
    report = api.add(database, items, extractor, workers=0, progress=False)
    assert (report.new, report.failures) == (len(items), [])
    again = api.add(database, items, api.model_for_add(database), workers=0, progress=False)
    assert (again.new, again.unchanged) == (0, len(items))  # re-running stores nothing twice

    query = tmp_path / "query.png"
    Image.fromarray(np.load(BREASTMNIST)["val_images"][5]).save(query)
    retrievals, failures = api.search(database, api.load_items(query), k=3)
    assert failures == [] and retrievals[0].neighbours[0].name == "val/05"
    assert len(retrievals[0].neighbours) == 3

    removal = api.remove(database, names=["val/05", "val/999"])
    assert [record.name for record in removal.removed] == ["val/05"] and removal.missing_names == ["val/999"]
    retrievals, _ = api.search(database, api.load_items(query), k=3)
    assert "val/05" not in [n.name for n in retrievals[0].neighbours]  # never returned again


def test_a_model_that_contradicts_the_database_is_refused(database):
    items = api.load_items(BREASTMNIST, split="val")[:4]
    api.add(database, items, api.model_for_add(database, input_size=TEST_INPUT_SIZE), workers=0, progress=False)
    with pytest.raises(ModelMismatchError):
        api.add(database, items, api.model_for_add(database, input_size=TEST_INPUT_SIZE + 32), progress=False)
    with pytest.raises(CbirError, match="nothing to remove"):
        api.remove(database)


def test_importing_the_api_imports_neither_torch_nor_faiss():
    check = "import sys; from cbir import api; sys.exit(10 if {'torch', 'faiss', 'timm'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0


def test_thumbnails_are_stored_with_images_removed_with_them_and_backfilled(database, tmp_path):
    import io
    import shutil

    source = tmp_path / "cases"
    (source / "malignant").mkdir(parents=True)
    images = np.load(BREASTMNIST)["val_images"]
    for index in range(4):
        Image.fromarray(images[index]).save(source / "malignant" / f"{index}.png")
    extractor = api.model_for_add(database, input_size=TEST_INPUT_SIZE)
    api.add(database, api.load_items(source), extractor, workers=0, progress=False, thumbnails=False)
    assert database.thumbnail_ids() == set()  # built without them, as databases before them were
    shutil.move(source / "malignant" / "3.png", tmp_path / "moved.png")
    backfill = api.backfill_thumbnails(database, progress=False)
    assert backfill.made == 3 and backfill.failures == [f"{source / 'malignant' / '3.png'}: cannot read "
                                                       "(No such file or directory)"]
    assert 0 < backfill.bytes / backfill.made <= 8 * 1024
    picture = Image.open(io.BytesIO(database.thumbnail(0)))
    assert picture.format == "JPEG" and picture.size == (28, 28)  # small images stay their size
    api.remove(database, names=["malignant/0.png"])
    assert database.thumbnail(0) is None and 0 not in database.thumbnail_ids()  # removed with the image
    api.add(database, api.load_items(tmp_path / "moved.png", label="malignant"), extractor, workers=0, progress=False)
    assert len(database.thumbnail_ids()) == 3  # made at add time, by default
