"""/search and /similar: metadata filters, paging (offset), relevance and mode; /facets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from item_embed.cli import main  # noqa: E402
from item_embed.index.filters import parse_filter  # noqa: E402
from item_embed.index.product_index import ProductIndex  # noqa: E402
from item_embed.serve.app import load_service  # noqa: E402
from item_embed.serve.service import MAX_FACET_VALUES, PHOTO_ONLY_NOTE  # noqa: E402


@pytest.fixture(scope="module")
def world(tiny_catalog, tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("search-api")
    emb = root / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(emb), "--no-progress",
                 "--precision", "fp32"]) == 0
    ProductIndex.from_embedding_file(emb).save(root / "index")
    app = load_service(tiny_run, root / "index", precision="fp32")
    table = pd.read_csv(tiny_catalog, dtype=str)
    with TestClient(app) as client:
        yield app.state.service, client, table, tiny_catalog


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _ids(body: dict) -> list[str]:
    return [h["id"] for h in body["hits"]]


def _image(catalog: Path, table: pd.DataFrame, i: int) -> bytes:
    return (catalog.parent / table.iloc[i]["image"]).read_bytes()


def test_filter_is_exact_and_matches_the_index(world):
    svc, client, table, _ = world
    meta = svc.index.metadata
    category = meta["category"].value_counts().index[0]
    text = f'category == "{category}"'
    body = _ok(client.post("/search", data={"title": str(table.iloc[3]["title"]), "k": "100", "filter": text}))
    assert body["filter"] == text and body["hits"]
    assert all(h["metadata"]["category"] == category for h in body["hits"])
    # Every matching product comes back (k is over the count), as the index itself ranks them.
    assert body["total"] == int((meta["category"] == category).sum()) == len(body["hits"])
    vector = svc.embed(type("Q", (), {"image": None, "title": " ".join(str(table.iloc[3]["title"]).split()),
                                      "modalities": ["title"]})())
    expected = svc.index.search(vector[None, :], 100, filter=text)[0]
    assert _ids(body) == [h.id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)

    # Two columns at once, and /similar with the same filter (the product itself never returned).
    colour = meta.loc[meta["category"] == category, "colour"].iloc[0]
    both = f'category == "{category}" and colour in ["{colour}", "no-such-colour"]'
    pid = svc.index.ids[int(np.flatnonzero(meta["category"] == category)[0])]
    sim = _ok(client.get("/similar/" + pid, params={"k": 100, "filter": both}))
    mask = parse_filter(both, meta).mask(meta)
    assert sorted(_ids(sim)) == sorted(set(np.asarray(svc.index.ids)[mask]) - {pid})
    assert sim["total"] == len(sim["hits"]) and not sim["has_more"]
    assert all(h["metadata"]["category"] == category and h["metadata"]["colour"] == colour for h in sim["hits"])
    assert _ids(sim) == [h.id for h in svc.index.search_id(pid, 100, filter=both)]


@pytest.mark.parametrize("bad, says", [
    ('category = "bag"', "syntax"),
    ("no_such_column == 1", "unknown column"),
    ('__import__("os").system("true")', "filter"),
])
def test_a_bad_filter_is_a_400_with_the_reason(world, bad, says):
    _, client, table, _ = world
    r = client.post("/search", data={"title": "mug", "filter": bad})
    assert r.status_code == 400 and "bad filter" in r.json()["detail"] and says in r.json()["detail"]
    pid = table.iloc[0]["id"]
    r = client.get(f"/similar/{pid}", params={"filter": bad})
    assert r.status_code == 400 and says in r.json()["detail"]


def test_offset_pages_agree_with_one_larger_k(world):
    _, client, table, catalog = world
    title = str(table.iloc[7]["title"])
    whole = _ok(client.post("/search", data={"title": title, "k": "30"}))
    pages = [_ok(client.post("/search", data={"title": title, "k": "10", "offset": str(o)})) for o in (0, 10, 20)]
    assert sum((_ids(p) for p in pages), []) == _ids(whole)
    assert [h["rank"] for p in pages for h in p["hits"]] == list(range(1, 31))
    assert all(p["has_more"] for p in pages) and pages[1]["offset"] == 10
    n = len(world[0].index)
    last = _ok(client.post("/search", data={"title": title, "k": "10", "offset": str(n - 4)}))
    assert len(last["hits"]) == 4 and not last["has_more"] and last["total"] == n

    pid = table.iloc[2]["id"]
    whole = _ok(client.get(f"/similar/{pid}", params={"k": 20}))
    halves = [_ok(client.get(f"/similar/{pid}", params={"k": 10, "offset": o})) for o in (0, 10)]
    assert _ids(halves[0]) + _ids(halves[1]) == _ids(whole)
    assert whole["total"] == n - 1
    for bad in ("-1", "100000", "x"):
        assert client.post("/search", data={"title": title, "offset": bad}).status_code == 422


@pytest.mark.parametrize("mode", ["joint", "title", "photo", "product"])
def test_relevance_is_a_share_and_follows_the_score(world, mode):
    svc, client, table, catalog = world
    if mode == "product":
        body = _ok(client.get(f"/similar/{table.iloc[4]['id']}", params={"k": 40}))
    else:
        data = {"k": "40"}
        files = {"image": ("q.jpg", _image(catalog, table, 4), "image/jpeg")} if mode in ("joint", "photo") else None
        if mode in ("joint", "title"):
            data["title"] = str(table.iloc[4]["title"])
        body = _ok(client.post("/search", data=data, files=files))
    assert body["mode"] == mode
    assert (body["note"] == PHOTO_ONLY_NOTE) == (mode == "photo")
    scores = [h["score"] for h in body["hits"]]
    rel = [h["relevance"] for h in body["hits"]]
    assert all(0.0 <= r <= 1.0 for r in rel)
    assert scores == sorted(scores, reverse=True) and rel == sorted(rel, reverse=True)  # monotone
    assert rel[0] > 0.9  # the top hit is closer than nearly the whole catalog, whatever the raw score
    assert rel[-1] < rel[0]


def test_facets_list_the_columns_and_their_values(world):
    svc, client, _, _ = world
    body = _ok(client.get("/facets"))
    assert body["index_size"] == len(svc.index) and body["max_values"] == MAX_FACET_VALUES
    cols = {c["name"]: c for c in body["columns"]}
    meta = svc.index.metadata
    counts = meta["category"].value_counts()
    assert cols["category"]["filterable"] and cols["category"]["kind"] == "string"
    assert {v["value"]: v["count"] for v in cols["category"]["values"]} == counts.to_dict()
    assert cols["category"]["distinct"] == len(counts)
    many = [c for c in cols.values() if c["distinct"] > MAX_FACET_VALUES]
    assert all(c["values"] == [] for c in many)
