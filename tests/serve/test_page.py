"""End to end: the search page in headless Chromium (Selenium) against the real app under uvicorn.

Skips, saying why, when Chromium or chromedriver is not installed (CI installs them: .ci/run).
``ITEM_EMBED_SCREENSHOT=1`` writes the screenshot to docs/search-page.png (the README's);
otherwise it goes to the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory, live_server):
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
    with live_server(app) as (host, port):
        yield f"http://{host}:{port}", catalog, frame


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
    _open(browser, url + "/")  # start() restores the URL's state when done: act after it
    assert "products" in browser.find_element(By.ID, "health").text
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
    assert "photo only" in browser.find_element(By.ID, "summary").text
    assert "Matched by shape only" in browser.find_element(By.CSS_SELECTOR, "#summary .mode-note").text
    assert not browser.find_element(By.ID, "error").is_displayed()

    shot = SCREENSHOT if os.environ.get("ITEM_EMBED_SCREENSHOT") == "1" else tmp_path / "search-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    # The whole page: grow the window to the document's height.
    inner, page = browser.execute_script("return [window.innerHeight, document.documentElement.scrollHeight]")
    browser.set_window_size(1280, browser.get_window_size()["height"] - inner + page)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # The relevance bar, not the raw cosine, fills the card: the top hit is near full.
    assert 0.9 < expected["hits"][0]["relevance"] <= 1
    assert float(cards[0].find_element(By.CSS_SELECTOR, ".relevance-text").get_attribute("data-value")) == \
        expected["hits"][0]["relevance"]

    first = _card_ids(browser)
    clicked = first[1]
    cards[1].click()
    # A click is "more like this": the old query photo leaves the drop box.
    _wait(browser, lambda d: not d.find_element(By.ID, "preview").is_displayed(), "the query photo to be cleared")
    assert browser.find_element(By.ID, "image-input").get_attribute("value") == ""
    assert "has-image" not in browser.find_element(By.ID, "drop").get_attribute("class")
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
    _open(browser, url + "/")
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


# ------------------------------------------------------------------ metadata, filters, paging, URL state


def _done(driver) -> bool:
    return driver.find_element(By.ID, "results").get_attribute("data-state") == "done"


def _wait_for_ids(driver, ids: list[str], what: str) -> None:
    _wait(driver, lambda d: _done(d) and _card_ids(d) == ids, what)


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the page")
    driver.get_log("browser")  # start each check with an empty console (earlier tests provoke errors)


def _title_search(driver, title: str, k: int = 10) -> None:
    Select(driver.find_element(By.ID, "k-select")).select_by_value(str(k))
    box = driver.find_element(By.ID, "title-input")
    box.clear()
    box.send_keys(title)
    driver.find_element(By.ID, "search-button").click()


def _attr(card, column: str) -> str:
    return card.find_element(By.CSS_SELECTOR, f'.attr[data-column="{column}"]').get_attribute("data-value")


def _facet(url: str, column: str) -> dict:
    return next(c for c in _api(url, "/facets")["columns"] if c["name"] == column)


def test_cards_show_metadata_and_a_filter_narrows_them(site, browser):
    url, _, frame = site
    title = str(frame.iloc[2]["title"])
    _open(browser, url + "/")
    _title_search(browser, title)
    expected = _api(url, "/search", data={"title": title, "k": "10"})
    _wait_for_ids(browser, [h["id"] for h in expected["hits"]], "title results")
    for card, hit in zip(_cards(browser), expected["hits"]):
        for column in ("category", "colour", "group"):
            assert _attr(card, column) == str(hit["metadata"][column])

    # The filter menus come from /facets; choosing one re-runs the query with it, server side.
    category = _facet(url, "category")["values"][-1]["value"]  # the rarest: the filter must bite
    menu = Select(browser.find_element(By.CSS_SELECTOR, '#filters select[data-column="category"]'))
    menu.select_by_value(category)
    text = f'category == "{category}"'
    filtered = _api(url, "/search", data={"title": title, "k": "10", "filter": text})
    assert filtered["hits"] and filtered["hits"] != expected["hits"]
    _wait_for_ids(browser, [h["id"] for h in filtered["hits"]], "the filtered results")
    assert browser.find_element(By.ID, "summary").get_attribute("data-filter") == text
    assert all(_attr(c, "category") == category for c in _cards(browser))
    assert f"f.category={category}" in browser.current_url
    assert _severe_console_errors(browser) == []


def test_load_more_appends_the_next_page(site, browser):
    url, _, frame = site
    title = str(frame.iloc[9]["title"])
    _open(browser, url + "/")
    _title_search(browser, title, k=5)
    body = _api(url, "/search", data={"title": title, "k": "15"})
    whole = [h["id"] for h in body["hits"]]
    _wait_for_ids(browser, whole[:5], "the first page")
    more = browser.find_element(By.ID, "more-button")
    for shown in (10, 15):
        more.click()
        _wait_for_ids(browser, whole[:shown], f"{shown} results")
    ids = _card_ids(browser)
    assert len(ids) == len(set(ids)) == 15
    assert [c.get_attribute("data-rank") for c in _cards(browser)] == [str(i) for i in range(1, 16)]
    assert "shown=15" in browser.current_url
    assert f"15 of {body['total']} results" in browser.find_element(By.ID, "summary").text

    # The link restores all three pages.
    _open(browser, browser.current_url)
    _wait_for_ids(browser, whole, "the restored pages")


def test_the_url_holds_the_query_reload_and_back_restore_it(site, browser):
    url, _, frame = site
    title = str(frame.iloc[4]["title"])
    colour = _facet(url, "colour")["values"][0]["value"]
    _open(browser, url + "/")
    Select(browser.find_element(By.CSS_SELECTOR, '#filters select[data-column="colour"]')).select_by_value(colour)
    _title_search(browser, title)
    first = [h["id"] for h in _api(url, "/search", data={"title": title, "k": "10",
                                                           "filter": f'colour == "{colour}"'})["hits"]]
    _wait_for_ids(browser, first, "the filtered title results")
    link = browser.current_url
    assert "title=" in link and f"f.colour={colour}" in link

    # A fresh load of the link: title, filter and results come back.
    _open(browser, url + "/")
    assert _cards(browser) == []
    _open(browser, link)
    _wait_for_ids(browser, first, "the results restored from the link")
    assert browser.find_element(By.ID, "title-input").get_attribute("value") == title
    assert Select(browser.find_element(By.CSS_SELECTOR, '#filters select[data-column="colour"]')
                  ).first_selected_option.get_attribute("value") == colour

    # A card click is a new history entry; back returns to the title query, forward to the click.
    clicked = first[0]
    _cards(browser)[0].click()
    similar = [h["id"] for h in _api(url, f"/similar/{clicked}?k=10&filter=colour%20%3D%3D%20%22{colour}%22")["hits"]]
    _wait_for_ids(browser, similar, "the similar products")
    assert f"similar={clicked}" in browser.current_url
    browser.back()
    _wait_for_ids(browser, first, "the previous query after back")
    assert browser.current_url == link
    assert browser.find_element(By.ID, "title-input").get_attribute("value") == title
    browser.forward()
    _wait_for_ids(browser, similar, "the similar products after forward")
    assert _severe_console_errors(browser) == []


def test_a_photo_only_query_is_explained_and_not_kept_in_links(site, browser):
    url, catalog, frame = site
    image = catalog.parent / _catalog_image(catalog, frame.iloc[11]["id"])
    _open(browser, url + "/")
    browser.find_element(By.ID, "image-input").send_keys(str(image))
    browser.find_element(By.ID, "search-button").click()
    expected = _api(url, "/search", files={"image": (image.name, image.read_bytes())}, data={"k": "10"})
    assert expected["mode"] == "photo"
    _wait_for_ids(browser, [h["id"] for h in expected["hits"]], "the photo results")
    note = browser.find_element(By.CSS_SELECTOR, "#summary .mode-note")
    assert note.is_displayed() and "shape" in note.text and "relative" in note.text
    top = _cards(browser)[0]
    fill = top.find_element(By.CSS_SELECTOR, ".score-bar span")
    bar = top.find_element(By.CSS_SELECTOR, ".score-bar")
    assert fill.size["width"] > 0.8 * bar.size["width"]  # not a near-empty bar, whatever the raw cosine
    assert "photo=1" in browser.current_url

    # Reloading the link cannot bring the photo back: the page says so instead of showing nothing.
    _open(browser, browser.current_url)
    note = browser.find_element(By.ID, "link-note")
    assert note.is_displayed() and "not kept in links" in note.text
    assert _cards(browser) == [] and not browser.find_element(By.ID, "error").is_displayed()


# ------------------------------------------------------------------ a server that needs an API key

PAGE_KEY = "page-key-" + "Qw3Er5Ty7Ui9Op1As"


@pytest.fixture(scope="module")
def keyed_site(site, tiny_run, live_server):
    """The same index served by an app that needs ``PAGE_KEY`` (a second uvicorn, another origin)."""
    from item_embed.serve.app import load_service

    _, catalog, frame = site
    index_dir = next(p for p in catalog.parents if (p / "index").is_dir()) / "index"
    app = load_service(tiny_run, index_dir, api_keys=[PAGE_KEY])
    with live_server(app) as (host, port):
        yield f"http://{host}:{port}", frame


def test_a_keyed_server_asks_for_the_key_and_the_tab_remembers_it(keyed_site, browser):
    import httpx

    url, frame = keyed_site
    title = str(frame.iloc[6]["title"])
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        assert c.post("/search", data={"title": title, "k": "10"}).status_code == 401
        r = c.post("/search", data={"title": title, "k": "10"}, headers={"X-API-Key": PAGE_KEY})
    assert r.status_code == 200, r.text
    expected = [h["id"] for h in r.json()["hits"]]
    assert len(expected) == 10

    auth = lambda d: d.find_element(By.ID, "auth")  # noqa: E731
    error = lambda d: d.find_element(By.ID, "error")  # noqa: E731
    browser.get(url + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "health").text != "connecting…", "the page to start")
    _title_search(browser, title)
    _wait(browser, lambda d: auth(d).is_displayed() and error(d).is_displayed()
          and d.find_element(By.ID, "results").get_attribute("data-state") == "error", "the key field")
    assert "API key" in error(browser).text and _cards(browser) == []
    assert PAGE_KEY not in browser.current_url

    # A wrong key: refused, said so, the field stays.
    box = browser.find_element(By.ID, "api-key-input")
    box.send_keys("wrong-key-" + "0123456789abcdef")
    browser.find_element(By.ID, "api-key-button").click()
    _wait(browser, lambda d: error(d).is_displayed() and "refused" in error(d).text and auth(d).is_displayed(),
          "the refusal of a wrong key")
    assert _cards(browser) == []

    # The right key: the query runs again by itself; thumbnails come as blobs fetched with the key.
    box.send_keys(PAGE_KEY)
    browser.find_element(By.ID, "api-key-button").click()
    _wait_for_ids(browser, expected, "the results once the key is given")
    _wait(browser, _images_loaded, "the thumbnails, fetched with the key")
    srcs = browser.execute_script("return [...document.querySelectorAll('#results img')].map(i => i.src)")
    assert srcs and all(s.startswith("blob:") for s in srcs)
    assert not auth(browser).is_displayed() and not error(browser).is_displayed()
    assert box.get_attribute("value") == ""
    # The start the 401 interrupted is finished too: the health line, the filter menus.
    _wait(browser, lambda d: "products" in d.find_element(By.ID, "health").text
          and d.find_elements(By.CSS_SELECTOR, "#filters select"), "the health line and the filters")
    assert "title=" in browser.current_url and PAGE_KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('item-embed-api-key')") == PAGE_KEY

    # A reload: the tab still has the key; the results come back without asking.
    browser.refresh()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the page")
    _wait_for_ids(browser, expected, "the results after a reload")
    _wait(browser, _images_loaded, "the thumbnails after a reload")
    assert not auth(browser).is_displayed() and not error(browser).is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#filters select")
    assert PAGE_KEY not in browser.current_url
