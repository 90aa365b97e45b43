"""The HTTP API against real Redis (the standalone server, and the embedded one for `cbir serve`),
real images and the real model, through FastAPI's test client (httpx)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cbir import api
from cbir.service.app import create_app
from cbir.store.database import VectorStore

from .conftest import BREASTMNIST, ROOT, TEST_INPUT_SIZE, _free_port, _start_server, _stop


@pytest.fixture(scope="module")
def indexed(standalone_url):
    """BreastMNIST's 78 validation images in a database of the standalone server."""
    store = api.open_database("service-test", standalone_url)
    api.start_over(store)
    api.add(store, api.load_items(BREASTMNIST, split="val"), api.model_for_add(store, input_size=TEST_INPUT_SIZE),
            workers=0, progress=False)
    yield store
    VectorStore(store.client, store.name).drop()


@pytest.fixture(scope="module")
def service(standalone_url, indexed):
    with TestClient(create_app(standalone_url, max_upload_bytes=2 * 2**20)) as client:
        yield client


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.load(BREASTMNIST)["val_images"][index]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_indexed_image_finds_itself_first_and_its_timings(service, indexed):
    answer = service.post(f"/api/v1/databases/{indexed.name}/search", files=[("image", ("q.png", png(5)))],
                          data={"k": "3"})
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["results"][0]["name"] == "val/05" and result["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert len(result["results"]) == 3 and result["query"] == "q.png"
    assert set(answer.json()["timings_ms"]) == {"decode", "model", "search", "records", "total"}


def test_several_images_and_vectors_are_answered_in_one_request(service, indexed):
    answer = service.post(f"/api/v1/databases/{indexed.name}/search",
                          files=[("image", ("a.png", png(7))), ("image", ("b.png", png(9)))], data={"k": "1"})
    assert [r["results"][0]["name"] for r in answer.json()["results"]] == ["val/07", "val/09"]
    ids, vectors = indexed.load_vectors()
    by_vector = service.post(f"/api/v1/databases/{indexed.name}/search", json={"vectors": vectors[:2].tolist(), "k": 1})
    assert [r["results"][0]["name"] for r in by_vector.json()["results"]] == ["val/00", "val/01"]


def test_concurrent_searches_share_forward_passes(service, indexed):
    from concurrent.futures import ThreadPoolExecutor

    def ask(index: int) -> str:
        answer = service.post(f"/api/v1/databases/{indexed.name}/search",
                              files=[("image", ("q.png", png(index)))], data={"k": "1"})
        return answer.json()["results"][0]["results"][0]["name"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(16))) == [f"val/{i:02d}" for i in range(16)]
    metrics = service.get("/metrics").text
    assert "cbir_batch_images_count" in metrics and 'cbir_requests_total{route="/api/v1/databases/{db}/search"' in metrics


def test_databases_are_described(service, indexed):
    listed = service.get("/api/v1/databases").json()["databases"]
    assert {"name": indexed.name, "images": 78, "model": indexed.model_spec["description"]} in listed
    described = service.get(f"/api/v1/databases/{indexed.name}").json()
    assert described["images"] == 78 and described["classes"] == {"malignant": 21, "normal, benign": 57}
    assert described["index"] == {"kind": "exact"}
    assert service.get("/healthz").json()["status"] == "ok"
    assert service.get("/openapi.json").json()["info"]["title"] == "cbir"


@pytest.mark.parametrize("request_args,status,message", [
    (dict(url="/api/v1/databases/no-such-db/search", files=[("image", ("q.png", b"x"))]), 404, "no database 'no-such-db'"),
    (dict(files=[("image", ("notes.txt", b"a clinician's note"))]), 415, "notes.txt: not an image file"),
    (dict(files=[("image", ("cut.png", png(3)[:-40]))]), 400, "cut.png: unreadable or truncated image"),
    (dict(files=[("image", ("big.png", b"\0" * (3 * 2**20)))]), 413, "over the limit of 2 MB"),
    (dict(files=[("image", ("q.png", b"x"))], data={"k": "0"}), 400, "k: must be from 1 to 1000, got 0"),
    (dict(json={"vectors": [[1.0, 2.0]]}), 400, "vectors: expected rows of 1280 finite numbers"),
    (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "send images as multipart/form-data"),
], ids=["unknown database", "not an image", "truncated", "too large", "bad k", "wrong vectors", "wrong type"])
def test_bad_requests_get_one_json_error_with_their_status(service, indexed, request_args, status, message):
    request_args.setdefault("url", f"/api/v1/databases/{indexed.name}/search")
    answer = service.post(**request_args)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and message in answer.json()["error"]
    assert "Traceback" not in answer.text


def test_redis_gone_is_503(redis_server_binary, tmp_path):
    port = _free_port()
    server = _start_server(redis_server_binary, port, tmp_path)
    with TestClient(create_app(f"redis://127.0.0.1:{port}/0")) as client:
        assert client.get("/healthz").status_code == 200
        _stop([server])
        answer = client.get("/api/v1/databases")
    assert answer.status_code == 503 and answer.json()["error"].startswith("Redis failed (")


def test_a_change_made_by_the_cli_is_seen_by_the_running_service(service, indexed, standalone_url, tmp_path):
    """Another process adds an image and removes one: the service's next answers see both."""
    query = png(30)
    before = service.post(f"/api/v1/databases/{indexed.name}/search", files=[("image", ("q.png", query))],
                          data={"k": "1"}).json()["results"][0]["results"][0]
    assert before["name"] == "val/30"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CBIR_REDIS_URL=standalone_url)
    removed = subprocess.run([sys.executable, str(ROOT / "remove_images.py"), "--db-name", indexed.name, "--name",
                              "val/30"], env=env, capture_output=True, text=True, timeout=120)
    assert removed.returncode == 0, removed.stderr
    after = service.post(f"/api/v1/databases/{indexed.name}/search", files=[("image", ("q.png", query))],
                         data={"k": "1"}).json()["results"][0]["results"][0]
    assert after["name"] != "val/30"  # forgotten: never returned again
    (tmp_path / "new" / "malignant").mkdir(parents=True)
    (tmp_path / "new" / "malignant" / "again.png").write_bytes(query)
    added = subprocess.run([sys.executable, str(ROOT / "add_images.py"), "--db-name", indexed.name, "--path",
                            str(tmp_path / "new"), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stderr
    again = service.post(f"/api/v1/databases/{indexed.name}/search", files=[("image", ("q.png", query))],
                         data={"k": "1"}).json()["results"][0]["results"][0]
    assert again["name"] == "malignant/again.png"


def test_cbir_serve_answers_over_http_and_refuses_to_listen_beyond_this_machine(tmp_path, db_name):
    env = {k: v for k, v in os.environ.items() if k != "CBIR_REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), CBIR_HOME=str(tmp_path / "home"))
    refused = subprocess.run([sys.executable, "-m", "cbir", "serve", "--host", "0.0.0.0"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "listens on this machine only" in refused.stderr
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "cbir", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        assert health.json()["status"] == "ok" and "embedded Redis" in health.json()["redis"]
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/databases/{db_name}").status_code == 404
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def test_neighbours_come_with_their_ids_and_thumbnails(service, indexed):
    found = service.post(f"/api/v1/databases/{indexed.name}/search", files=[("image", ("q.png", png(12)))],
                         data={"k": "2"}).json()["results"][0]["results"]
    picture = service.get(f"/api/v1/databases/{indexed.name}/images/{found[0]['id']}/thumbnail")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    assert len(picture.content) <= 8 * 1024
    shown = Image.open(io.BytesIO(picture.content))
    assert shown.format == "JPEG" and max(shown.size) <= 128
    missing = service.get(f"/api/v1/databases/{indexed.name}/images/999999/thumbnail")
    assert missing.status_code == 404 and "no thumbnail of image 999999" in missing.json()["error"]


def test_filters_search_among_the_images_of_a_label_and_still_answer_k(service, indexed):
    """Only malignant images (about 21 of 78): k answers among them, not the k nearest filtered down."""
    search = f"/api/v1/databases/{indexed.name}/search"
    answer = service.post(search, files=[("image", ("q.png", png(5)))], data={"k": "10", "label": "malignant"})
    found = answer.json()["results"][0]["results"]
    assert len(found) == 10 and {n["label"] for n in found} == {"malignant"}
    everything = service.post(search, files=[("image", ("q.png", png(5)))], data={"k": "10"}).json()
    assert [n["label"] for n in everything["results"][0]["results"]].count("malignant") < 10
    ids, vectors = indexed.load_vectors()
    by_json = service.post(search, json={"vectors": vectors[:1].tolist(), "k": 30, "label": ["malignant"],
                                         "project": "breastmnist"}).json()["results"][0]["results"]
    stored = sum(r.label == "malignant" and r.project == "breastmnist" for _, r in indexed.iter_records())
    assert len(by_json) == stored and {n["label"] for n in by_json} == {"malignant"}  # all there are
    nothing = service.post(search, json={"vectors": vectors[:1].tolist(), "project": "elsewhere"}).json()
    assert nothing["results"][0]["results"] == []


@pytest.fixture
def guarded(standalone_url):
    """Tokens of each role on the service's Redis (once one exists, every request needs one)."""
    from cbir.service import tokens
    from cbir.store.redis.connect import connect

    client = connect(standalone_url)
    made = {role: tokens.create(client, role, f"test-{role}") for role in tokens.ROLES}
    yield made
    client.delete(tokens.TOKENS_KEY)


def test_tokens_decide_who_may_search_and_who_may_forget(service, indexed, guarded, standalone_url):
    from cbir.service import tokens
    from cbir.store.redis.connect import connect

    search, image = f"/api/v1/databases/{indexed.name}/search", f"/api/v1/databases/{indexed.name}/images/60"
    query = [("image", ("q.png", png(60)))]
    as_role = {role: {"Authorization": f"Bearer {token}"} for role, token in guarded.items()}
    nobody = service.post(search, files=query)
    assert nobody.status_code == 401 and nobody.headers["www-authenticate"] == "Bearer"
    assert service.post(search, files=query, headers={"Authorization": "Bearer cbir_guess"}).status_code == 401
    assert service.post(search, files=query, headers=as_role["reader"]).json()["results"][0]["results"][0]["id"] == 60
    refused = service.delete(image, headers=as_role["reader"])
    assert refused.status_code == 403 and refused.json() == {
        "error": "token 'test-reader' is a reader's: this needs editor rights"}
    forgotten = service.delete(image, headers=as_role["editor"])
    assert forgotten.status_code == 200 and forgotten.json()["forgotten"][0]["name"] == "val/60"
    after = service.post(search, files=query, headers=as_role["reader"]).json()["results"][0]["results"]
    assert 60 not in [n["id"] for n in after]  # never returned again
    assert service.delete(image, headers=as_role["editor"]).status_code == 404
    log = service.get(f"/api/v1/databases/{indexed.name}/audit", headers=as_role["admin"]).json()["entries"]
    assert log[0]["who"] == "test-editor" and log[0]["what"] == "forgot 1 image(s): val/60 (normal, benign)"
    assert tokens.revoke(connect(standalone_url), "test-reader")
    assert service.post(search, files=query, headers=as_role["reader"]).status_code == 401  # revoked: at once
    stored = connect(standalone_url).hgetall(tokens.TOKENS_KEY)
    assert not any(token.encode() in key + value for token in guarded.values() for key, value in stored.items())


def test_a_service_reachable_from_other_machines_is_never_open(standalone_url, indexed):
    """Bound beyond loopback (`cbir serve --host` another address), it requires a token even once
    every token has been revoked, where a local service would fall back to being open."""
    with TestClient(create_app(standalone_url, require_tokens=True)) as client:
        answer = client.get(f"/api/v1/databases/{indexed.name}")
    assert answer.status_code == 401 and "needs a token" in answer.json()["error"]


def test_the_token_command_makes_lists_and_revokes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CBIR_REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), CBIR_HOME=str(tmp_path / "home"))
    made = subprocess.run([sys.executable, "-m", "cbir", "token", "create", "--role", "editor", "--name", "ward 3"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and made.stdout.splitlines()[0].startswith("cbir_")
    listed = subprocess.run([sys.executable, "-m", "cbir", "token", "list"], env=env, capture_output=True, text=True)
    assert listed.stdout.split() == ["ward", "3", "editor"]
    gone = subprocess.run([sys.executable, "-m", "cbir", "token", "revoke", "--name", "ward 3"], env=env,
                          capture_output=True, text=True)
    assert gone.returncode == 0 and "revoked" in gone.stdout
    again = subprocess.run([sys.executable, "-m", "cbir", "token", "revoke", "--name", "ward 3"], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip() == "error: no token named 'ward 3' (cbir token list names them)"


def test_an_editor_adds_uploaded_images_and_a_reader_may_not(service, indexed, guarded):
    images = f"/api/v1/databases/{indexed.name}/images"
    as_role = {role: {"Authorization": f"Bearer {token}"} for role, token in guarded.items()}
    upload = [("image", ("case 901.png", png(70))), ("image", ("notes.txt", b"a clinician's note"))]
    assert service.post(images, files=upload, data={"label": "malignant"}, headers=as_role["reader"]).status_code == 403
    unlabelled = service.post(images, files=upload, headers=as_role["editor"])
    assert unlabelled.status_code == 400 and unlabelled.json()["error"] == (
        "case 901.png: no label (send the form field 'label', or a zip of class folders)")
    added = service.post(images, files=upload, data={"label": "malignant", "project": "ward 3"},
                         headers=as_role["editor"])
    assert added.status_code == 200, added.text
    assert added.json()["new"] == 1 and added.json()["failures"] == [
        "notes.txt (uploaded by test-editor): not an image file"]
    found = service.post(f"/api/v1/databases/{indexed.name}/search", files=[("image", ("q.png", png(70)))],
                         data={"k": "2", "project": "ward 3"}, headers=as_role["reader"]).json()["results"][0]
    assert [(n["name"], n["label"]) for n in found["results"]] == [("case 901.png", "malignant")]
    log = service.get(f"/api/v1/databases/{indexed.name}/audit", headers=as_role["editor"]).json()["entries"]
    assert log[0]["who"] == "test-editor" and log[0]["what"] == "added 1 of 2 upload(s) labelled malignant: case 901.png, notes.txt"
    other = service.post(images, files=[("image", ("case 901.png", png(71)))], data={"label": "malignant"},
                         headers=as_role["editor"]).json()
    assert other["new"] == 0 and other["conflicts"][0].startswith("case 901.png: stored from case 901.png (uploaded")


@pytest.fixture
def small(standalone_url):
    """A database of 12 BreastMNIST validation images, for tests that add and forget."""
    store = api.open_database("service-manage", standalone_url)
    api.start_over(store)
    items = api.load_items(BREASTMNIST, split="val")[:12]
    api.add(store, items, api.model_for_add(store, input_size=TEST_INPUT_SIZE), workers=0, progress=False)
    yield store
    VectorStore(store.client, store.name).drop()


def zipped(files: dict[str, bytes]) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_of_class_folders_is_added_with_its_folders_as_labels(service, small):
    images = f"/api/v1/databases/{small.name}/images"
    upload = zipped({"cases/malignant/a.png": png(40), "cases/benign/b.png": png(41), "cases/.DS_Store": b"junk",
                     "__MACOSX/cases/malignant/._a.png": b"fork", "cases/benign/": b""})
    added = service.post(images, files=[("image", ("cases.bin", upload))]).json()
    assert added["new"] == 2 and added["failures"] == []
    found = service.post(f"/api/v1/databases/{small.name}/search", files=[("image", ("q.png", png(40)))],
                         data={"k": "1"}).json()["results"][0]["results"][0]
    assert (found["name"], found["label"]) == ("cases/malignant/a.png", "malignant")
    labelled = service.post(images, files=[("image", ("more.zip", zipped({"c.png": png(42)})))],
                            data={"label": "benign"}).json()
    assert labelled["new"] == 1
    loose = service.post(images, files=[("image", ("more.zip", zipped({"d.png": png(43)})))])
    assert loose.status_code == 400 and loose.json()["error"] == (
        "d.png: no label (send the form field 'label', or a zip of class folders)")


@pytest.mark.parametrize("upload,status,message", [
    (b"PK\x03\x04 not really a zip", 400, "broken.zip: not a readable zip ("),
    (zipped({"x/zeros.png": b"\0" * (9 * 2**20)}), 413, "broken.zip: unpacks to 9.0 MB, over the limit of 8 MB"),
], ids=["corrupt", "bomb"])
def test_a_bad_zip_is_refused_whole_with_its_reason(service, small, upload, status, message):
    before = small.count()
    answer = service.post(f"/api/v1/databases/{small.name}/images", files=[("image", ("broken.zip", upload))])
    assert answer.status_code == status and answer.json()["error"].startswith(message)
    assert small.count() == before


def test_images_are_forgotten_by_name_by_label_and_by_content(service, small):
    import hashlib

    images = f"/api/v1/databases/{small.name}/images"
    service.post(images, files=[("image", ("x.png", png(50))), ("image", ("y.png", png(51)))], data={"label": "doubt"})
    by_name = service.delete(images, params={"name": ["val/00", "no-such-image"]}).json()
    assert [n["name"] for n in by_name["forgotten"]] == ["val/00"] and by_name["missing"]["names"] == ["no-such-image"]
    by_content = service.delete(images, params={"sha256": hashlib.sha256(png(51)).hexdigest()}).json()
    assert [n["name"] for n in by_content["forgotten"]] == ["y.png"]
    by_label = service.delete(images, params={"label": "doubt"}).json()
    assert [n["name"] for n in by_label["forgotten"]] == ["x.png"]
    names = {record.name for _, record in small.iter_records()}
    assert names.isdisjoint({"val/00", "x.png", "y.png"}) and len(names) == 11
    assert service.delete(images).status_code == 400
    assert "is not 64 hexadecimal digits" in service.delete(images, params={"sha256": "abc"}).json()["error"]
    log = service.get(f"/api/v1/databases/{small.name}/audit").json()["entries"]
    assert [entry["what"] for entry in log[:3]] == ["forgot 1 image(s): x.png (doubt)", "forgot 1 image(s): y.png (doubt)",
                                                    "forgot 1 image(s): val/00 (malignant)"]


def test_the_page_its_token_holder_the_query_preview_and_the_tsne_picture(service, small, tmp_path):
    page = service.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "<script src=\"/static/app.js\"" in page.text and "http" not in page.text.replace("http-equiv", "")
    assert service.get("/static/app.js").status_code == 200
    assert service.get("/api/v1/whoami").json() == {"name": "local", "role": "admin"}
    answer = service.post(f"/api/v1/databases/{small.name}/search", files=[("image", ("q.png", png(3)))],
                          data={"k": "1", "preview": "true"}).json()["results"][0]
    assert answer["query_thumbnail"].startswith("data:image/jpeg;base64,")
    plain, reranked = (service.post(f"/api/v1/databases/{small.name}/search", files=[("image", ("q.png", png(3)))],
                                    data={"k": "50", **flags}).json()["results"][0]["results"]
                       for flags in ({}, {"rerank": "true"}))
    # Every stored image, each with its cosine similarity, in the re-ranked order.
    assert len(reranked) == len(plain) > 5
    assert service.post(f"/api/v1/databases/{small.name}/search", files=[("image", ("q.png", png(3)))],
                        data={"rerank": "true"}).json()["reranked"] is True
    assert {n["id"]: n["score"] for n in reranked} == {n["id"]: n["score"] for n in plain}
    assert service.get(f"/api/v1/databases/{small.name}").json()["tsne"] is False
    assert service.get(f"/api/v1/databases/{small.name}/tsne").status_code == 404
    api.tsne(small, tmp_path / "map.png", perplexity=3)
    picture = service.get(f"/api/v1/databases/{small.name}/tsne")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content == (tmp_path / "map.png").read_bytes()
    assert service.get(f"/api/v1/databases/{small.name}").json()["tsne"] is True


def test_one_malloc_arena_is_set_for_the_process_and_those_it_starts():
    code = ("from cbir.models.threads import use_one_arena; use_one_arena(); import os, subprocess, sys; "
            "print(os.environ['MALLOC_ARENA_MAX'], subprocess.run([sys.executable, '-c', "
            "'import os; print(os.environ[\"MALLOC_ARENA_MAX\"])'], capture_output=True, text=True).stdout.strip())")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["1", "1"], done.stderr
