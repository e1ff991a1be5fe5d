"""End to end: the search page in headless Chromium (Selenium) against the real app under uvicorn.

Skips, saying why, when Chromium or chromedriver is not installed (CI installs them: .ci/run).
``ITEM_EMBED_SCREENSHOT=1`` writes the screenshot to docs/search-page.png (the README's);
otherwise it goes to the test's tmp folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).is_file()),
                    None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
)
selenium = pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[test]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

K = 10
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "search-page.png"


@contextlib.contextmanager
def live_server(app):
    """The app under a real uvicorn on 127.0.0.1 and a free port, in a background thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory):
    """A 128-px catalog embedded by the tiny model, indexed, with a category classifier, served.

    ``ITEM_EMBED_SCREENSHOT_MODEL=RUN_DIR`` serves another trained model instead (e.g. the
    ``make demo`` run, for a README screenshot with meaningful neighbours).
    """
    from item_embed.classify import fit_linear
    from item_embed.cli import main
    from item_embed.data.synthetic import write_catalog
    from item_embed.embeddings import read_embeddings
    from item_embed.index.product_index import ProductIndex
    from item_embed.serve.app import load_service

    run = Path(os.environ.get("ITEM_EMBED_SCREENSHOT_MODEL") or tiny_run)
    root = tmp_path_factory.mktemp("site")
    catalog = write_catalog(root / "catalog", n_products=24, seed=3, image_size=128)
    emb = root / "emb.parquet"
    assert main(["embed", str(catalog), "--model", str(run), "--out", str(emb), "--no-progress"]) == 0
    ProductIndex.from_embedding_file(emb).save(root / "index")
    frame, vectors = read_embeddings(emb)
    fit_linear(vectors, frame["category"], frame["group"], model_id=ProductIndex.load(root / "index").model_id,
               label_column="category", log=lambda m: None).save(root / "clf")
    app = load_service(run, root / "index", classifier_dir=root / "clf")
    with live_server(app) as url:
        yield url, catalog, frame


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="item-embed-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-proxy-server", "--window-size=1280,1160", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _api(url: str, path: str, **kw) -> dict:
    import httpx

    with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        r = c.post(path, **kw) if "files" in kw or "data" in kw else c.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def _cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def _card_ids(driver) -> list[str]:
    return [c.get_attribute("data-id") for c in _cards(driver)]


def _wait(driver, condition, what: str, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message=f"timed out waiting for {what}")


def _images_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def _severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_search_by_uploaded_image_then_click_a_result(site, browser, tmp_path):
    url, catalog, frame = site
    query_row = frame.iloc[5]
    image = catalog.parent / _catalog_image(catalog, query_row["id"])
    browser.get(url + "/")
    _wait(browser, lambda d: "products" in d.find_element(By.ID, "health").text, "the health line")
    Select(browser.find_element(By.ID, "k-select")).select_by_visible_text(str(K))
    browser.find_element(By.ID, "image-input").send_keys(str(image))
    _wait(browser, lambda d: d.find_element(By.ID, "preview").is_displayed(), "the image preview")
    browser.find_element(By.ID, "search-button").click()

    _wait(browser, lambda d: d.find_element(By.ID, "results").get_attribute("data-state") == "done", "results")
    cards = _cards(browser)
    assert len(cards) == K
    expected = _api(url, "/search", files={"image": (image.name, image.read_bytes())}, data={"k": str(K)})
    assert _card_ids(browser) == [h["id"] for h in expected["hits"]]
    titles = [c.find_element(By.CSS_SELECTOR, ".card-title").text for c in cards]
    assert titles == [h["title"] for h in expected["hits"]] and all(titles)
    for card, hit in zip(cards, expected["hits"]):
        assert card.find_element(By.CSS_SELECTOR, ".score").text == f"{hit['score']:.3f}"
        assert card.find_element(By.CSS_SELECTOR, ".chip").text.startswith(hit["predicted_category"]["label"])
    _wait(browser, _images_loaded, "the result images to load")
    assert "image" in browser.find_element(By.ID, "summary").text
    assert not browser.find_element(By.ID, "error").is_displayed()

    shot = SCREENSHOT if os.environ.get("ITEM_EMBED_SCREENSHOT") == "1" else tmp_path / "search-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    # The whole page: grow the window to the document's height.
    inner, page = browser.execute_script("return [window.innerHeight, document.documentElement.scrollHeight]")
    browser.set_window_size(1280, browser.get_window_size()["height"] - inner + page)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    first = _card_ids(browser)
    clicked = first[1]
    cards[1].click()
    _wait(browser, lambda d: d.find_element(By.ID, "summary").get_attribute("data-query") == f"product:{clicked}",
          "the similar-products results")
    _wait(browser, lambda d: d.find_element(By.ID, "results").get_attribute("data-state") == "done", "results")
    similar = _api(url, f"/similar/{clicked}?k={K}")
    assert _card_ids(browser) == [h["id"] for h in similar["hits"]] != first
    assert clicked not in _card_ids(browser)
    assert "Similar to" in browser.find_element(By.ID, "summary").text
    _wait(browser, _images_loaded, "the similar-product images to load")
    assert _severe_console_errors(browser) == []


def test_errors_from_the_page_and_the_api_are_shown(site, browser, tmp_path):
    url, _, frame = site
    browser.get(url + "/")
    error = browser.find_element(By.ID, "error")
    browser.find_element(By.ID, "search-button").click()
    _wait(browser, lambda d: error.is_displayed(), "the missing-query message")
    assert "image or type a title" in error.text

    fake = tmp_path / "not-really.png"
    fake.write_bytes(b"this is text, not a PNG")
    browser.find_element(By.ID, "image-input").send_keys(str(fake))
    browser.find_element(By.ID, "title-input").send_keys(str(frame.iloc[0]["title"]))
    browser.find_element(By.ID, "search-button").click()
    _wait(browser, lambda d: error.is_displayed() and "422" in error.text, "the API's error message")
    assert "image" in error.text and _cards(browser) == []

    browser.find_element(By.ID, "clear-button").click()
    browser.find_element(By.ID, "title-input").send_keys(str(frame.iloc[0]["title"]))
    browser.find_element(By.ID, "search-button").click()
    _wait(browser, lambda d: len(_cards(d)) == 10, "title-only results")  # the page's default k
    assert not error.is_displayed()
    expected = _api(url, "/search", data={"title": str(frame.iloc[0]["title"]), "k": "10"})
    assert _card_ids(browser) == [h["id"] for h in expected["hits"]]


def _catalog_image(catalog: Path, product_id: str) -> str:
    import pandas as pd

    table = pd.read_csv(catalog, dtype=str)
    return table.loc[table["id"] == product_id, "image"].iloc[0]
