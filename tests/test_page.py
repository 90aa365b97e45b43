"""The web page in a real headless Chromium (Debian's, driven by Playwright), served by the real
app over real Redis, with BUSI images indexed by the real model. Screenshots of each view are
saved in $CBIR_SCREENSHOTS (default results/screenshots; `make screenshots` writes docs/screenshots)."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from cbir import api
from cbir.service import tokens
from cbir.service.app import create_app
from cbir.store.database import VectorStore
from cbir.store.redis.connect import connect

from .conftest import ROOT, TEST_INPUT_SIZE, _free_port

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect
SCREENSHOTS = Path(os.environ.get("CBIR_SCREENSHOTS", ROOT / "results" / "screenshots"))
LABELS = {"benign", "malignant", "normal"}


@pytest.fixture(scope="module")
def busi_database(standalone_url, busi):
    """Every fourth BUSI image (195, all three classes) in a database of the standalone server."""
    store = api.open_database("page-busi", standalone_url)
    api.start_over(store)
    items = api.load_items(busi)[::4]
    api.add(store, items, api.model_for_add(store, input_size=TEST_INPUT_SIZE), progress=False)
    yield store
    VectorStore(store.client, store.name).drop()


@pytest.fixture(scope="module")
def indexed_images(busi_database, busi) -> dict[str, list[Path]]:
    """The files of the indexed images, by label; and of those left out ("new/<label>")."""
    stored = {record.name for _, record in busi_database.iter_records()}
    found: dict[str, list[Path]] = {}
    for path in sorted(busi.glob("*/*.png")):
        name = f"{path.parent.name}/{path.name}"
        found.setdefault(path.parent.name if name in stored else f"new/{path.parent.name}", []).append(path)
    return found


@pytest.fixture(scope="module")
def site(standalone_url, busi_database):
    """The service on a free loopback port, in a thread of this process."""
    server = uvicorn.Server(uvicorn.Config(create_app(standalone_url), host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: `make setup` installs it (apt-get install chromium)")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    problems = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    opened.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    yield opened
    context.close()
    # No script errors (an API error's status, logged by the browser as a failed load, is expected).
    assert not [p for p in problems if not p.startswith("Failed to load resource")], problems


@pytest.fixture
def signed(standalone_url):
    """Tokens of an editor and a reader (once a token exists, the page needs one)."""
    client = connect(standalone_url)
    made = {role: tokens.create(client, role, f"page-{role}") for role in ("reader", "editor")}
    yield made
    client.delete(tokens.TOKENS_KEY)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def search(page, image: Path, k: int = 5) -> None:
    page.set_input_files("#query", str(image))
    page.fill("#k", str(k))
    page.click("#search-form button[type=submit]")


def open_page(page, address: str) -> None:
    """The page at ``address``, showing the test's database (other tests' databases share the Redis)."""
    page.goto(address)
    page.wait_for_selector("#database option[value=page-busi]", state="attached")
    page.select_option("#database", "page-busi")
    page.wait_for_selector("#database-summary:has-text('images')")


def sign_in(page, site: str, token: str) -> None:
    page.goto(site)
    page.fill("#token", token)
    page.click("#token-form button")
    page.wait_for_selector("#who:has-text('(')")
    open_page(page, site)


def test_an_uploaded_busi_image_shows_its_neighbours_labels_and_vote(page, site, indexed_images):
    query = indexed_images["malignant"][0]
    open_page(page, site)
    search(page, query, k=5)
    page.wait_for_selector(".neighbour >> nth=4")
    cards = page.locator(".neighbour")
    assert cards.count() == 5
    assert set(page.locator(".neighbour dd.label").all_inner_texts()) <= LABELS
    assert page.locator(".neighbour dd.name").first.inner_text() == f"malignant/{query.name}"
    vote = page.locator(".vote h3").inner_text()  # the query's own stored copy is shown, but does not vote
    assert vote.startswith("Vote: ") and vote.endswith("/4 neighbours) (1 stored copy of the query does not vote)")
    shares = [int(share.rsplit(" ", 1)[1].rstrip("%")) for share in page.locator(".shares li").all_inner_texts()]
    assert 99 <= sum(shares) <= 101
    assert "total" in page.locator(".timings").inner_text()
    expect(page.locator(".neighbour img[src^='blob:']")).to_have_count(5)
    assert all(width > 0 for width in page.locator(".neighbour img").evaluate_all(
        "images => Promise.all(images.map(i => i.decode().then(() => i.naturalWidth)))"))
    assert page.locator(".query img").get_attribute("src").startswith("data:image/jpeg")
    assert page.locator("#tab-manage").is_visible()  # no tokens: this machine's user is an admin
    screenshot(page, "search")


def test_the_rerank_box_asks_for_a_re_ranked_search(page, site, indexed_images):
    open_page(page, site)
    page.check("#rerank")
    search(page, indexed_images["benign"][0], k=5)
    expect(page.locator(".neighbour")).to_have_count(5)
    expect(page.locator("#search-status")).to_have_text("Re-ranked by k-reciprocal neighbours.")


def test_an_unreadable_file_shows_a_clear_message(page, site, tmp_path):
    notes = tmp_path / "scan.png"
    notes.write_text("a clinician's note, not an image")
    open_page(page, site)
    search(page, notes)
    alert = page.locator("#error[role=alert]")
    alert.wait_for(state="visible")
    assert alert.inner_text() == "scan.png: not an image file"
    assert page.locator(".neighbour").count() == 0


def test_the_database_view_shows_classes_model_index_and_tsne(page, site, busi_database, tmp_path):
    api.tsne(busi_database, tmp_path / "tsne.png")
    open_page(page, f"{site}/#database")
    page.wait_for_selector("#class-chart tbody tr >> nth=2")
    rows = page.locator("#class-chart tbody th").all_inner_texts()
    assert rows == sorted(LABELS)
    facts = page.locator("#database-facts").inner_text()
    assert "195" in facts and "exact search" in facts and busi_database.model_spec["description"] in facts
    assert page.locator("#view-search").is_hidden()
    expect(page.locator("#tsne")).to_be_visible()
    assert page.locator("#tsne").evaluate("image => image.decode().then(() => image.naturalWidth)") > 0
    assert page.locator("#tsne-none").is_hidden()
    screenshot(page, "database")


def test_an_editor_forgets_an_image_and_no_search_shows_it_again(page, site, indexed_images, signed):
    query = indexed_images["benign"][4]
    sign_in(page, site, signed["editor"])
    search(page, query, k=3)
    page.wait_for_selector(".neighbour >> nth=2")
    first = page.locator(".neighbour").first
    name = first.locator("dd.name").inner_text()
    assert name == f"benign/{query.name}"
    first.locator("button.forget").click()
    dialog = page.locator("dialog#confirm")
    assert name in dialog.inner_text()
    dialog.locator("button[value=yes]").click()
    page.wait_for_selector(f".gone:has-text('Forgot {name}.')")
    search(page, query, k=3)
    page.wait_for_selector(".neighbour >> nth=2")
    assert name not in page.locator(".neighbour dd.name").all_inner_texts()
    page.click("#tab-manage")
    page.wait_for_selector("#audit tbody tr")
    assert f"forgot 1 image(s): {name} (benign)" in page.locator("#audit tbody tr").first.inner_text()
    assert "page-editor (editor)" in page.locator("#audit tbody tr").first.inner_text()


def test_an_editor_adds_images_with_a_label(page, site, indexed_images, signed, busi_database):
    before = busi_database.count()
    added = indexed_images["new/normal"][:2]
    sign_in(page, site, signed["editor"])
    page.click("#tab-manage")
    page.set_input_files("#add-files", [str(path) for path in added])
    page.fill("#add-label", "normal")
    page.fill("#add-project", "ward 3")
    page.click("#add-form button")
    page.wait_for_selector("#add-status:has-text('Added 2')")
    assert busi_database.count() == before + 2
    page.wait_for_selector("#audit tbody tr:has-text('added 2 of 2 upload(s) labelled normal')")
    screenshot(page, "manage")


def test_a_reader_sees_no_manage_controls(page, site, indexed_images, signed):
    sign_in(page, site, signed["reader"])
    assert page.locator("#who").inner_text() == "page-reader (reader)"
    assert page.locator("#tab-manage").is_hidden()
    search(page, indexed_images["normal"][0], k=2)
    page.wait_for_selector(".neighbour >> nth=1")
    assert page.locator("button.forget").count() == 0
    page.goto(f"{site}/#manage")  # typed by hand: still no manage view
    page.wait_for_selector("#who:has-text('reader')")
    assert page.locator("#view-manage").is_hidden() and page.locator("#view-search").is_visible()


def test_without_a_token_a_guarded_service_says_what_it_needs(page, site, signed):
    page.goto(site)
    alert = page.locator("#error[role=alert]")
    alert.wait_for(state="visible")
    assert "this service needs a token" in alert.inner_text()
