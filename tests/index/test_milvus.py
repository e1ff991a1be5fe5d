"""index/milvus_index.py on Milvus Lite: agreement with FAISS exact search, filters, add/remove, the model
check, rebuilds, and the CLI (`index` / `search` / `index-update` with --backend milvus)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pymilvus")

from item_embed.cli import main  # noqa: E402
from item_embed.index.filters import parse_filter  # noqa: E402
from item_embed.index.milvus_index import (MilvusBackendError, MilvusIndex, MilvusSource, connect,  # noqa: E402
                                           load_index)
from item_embed.index.product_index import IndexLoadError, ProductIndex  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def metadata(n: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    price = rng.uniform(0, 100, n).round(2)
    price[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({
        "title": [f'item "{i}" ünï\\{i % 7}' for i in range(n)],
        "category": pd.Series(rng.choice(["bag", "shoe", "hat", 'say "hi"'], n), dtype=object)
        .where(rng.random(n) > 0.1, None),
        "price": price,
        "stock": rng.integers(-5, 50, n),
        "rating": pd.array(np.where(rng.random(n) < 0.15, None, rng.integers(1, 6, n)), dtype="Int64"),
        "on_sale": pd.Series(rng.random(n) < 0.4, dtype=object).where(rng.random(n) > 0.1, None),
        "has_image": rng.random(n) < 0.8,
    })


def write_embedding_file(path: Path, emb: np.ndarray, meta: pd.DataFrame, ids, model_id: str = "model-a") -> Path:
    table = pa.Table.from_pandas(meta.assign(id=list(ids))[["id", *meta.columns]], preserve_index=False)
    flat = pa.array(emb.astype(np.float32).reshape(-1), type=pa.float32())
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))
    kv = {b"item_embed.model_id": model_id.encode(), b"item_embed.config_hash": b"cfg",
          b"item_embed.dim": str(emb.shape[1]).encode(), b"item_embed.catalog": b"/data/catalog.csv"}
    pq.write_table(table.replace_schema_metadata(kv), path)
    return path


def ids_of(hits) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


def agreement(milvus_hits, faiss_hits, k: int = 10) -> float:
    """Share of Milvus's top-k that is in FAISS's exact top-k (or ties its k-th score)."""
    agree = total = 0
    for got, want in zip(milvus_hits, faiss_hits):
        want_ids = {h.id for h in want[:k]}
        kth = want[min(k, len(want)) - 1].score - 1e-5
        agree += sum(1 for h in got[:k] if h.id in want_ids or h.score >= kth)
        total += min(k, len(want))
    return agree / total


N = 600


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "products.db")


@pytest.fixture(scope="module")
def data():
    x = clustered(N)
    return x, [f"p{i}" for i in range(N)], metadata(N)


@pytest.fixture(scope="module")
def exact(data) -> ProductIndex:
    x, ids, meta = data
    return ProductIndex.build(x, ids, meta, "model-a", "cfg")


@pytest.fixture(scope="module")
def flat(db, data) -> MilvusIndex:
    x, ids, meta = data
    return MilvusIndex.build(x, ids, meta, "model-a", "cfg", uri=db, collection="flat_products", kind="flat")


# ---------------------------------------------------------------- search and filters


def test_hnsw_top10_agrees_with_faiss_exact(db, data, exact):
    x, ids, meta = data
    index = MilvusIndex.build(x, ids, meta, "model-a", "cfg", uri=db, collection="hnsw_products", kind="hnsw")
    manifest = index.manifest
    assert manifest["index_type"] == "HNSW" and manifest["metric"] == "IP" and manifest["count"] == N
    assert manifest["recall_at_10"]["recall"] >= 0.99 and manifest["recall_at_10"]["queries"] == N
    q = clustered(100, seed=5)
    got, want = index.search(q, 10), exact.search(q, 10)
    assert agreement(got, want) >= 0.99
    # Scores are the same cosines (inner products of unit vectors).
    np.testing.assert_allclose([h.score for h in got[0]], [h.score for h in want[0]][:len(got[0])], atol=1e-5)
    assert ids_of(index.search(x[:3], 1)) == [["p0"], ["p1"], ["p2"]]


@pytest.mark.parametrize("expr", [
    None,
    'category == "bag"',
    'category != "bag"',
    'category in ["bag", "hat"]',
    'category not in ["bag"]',
    'category == \'say "hi"\'',
    "price < 30",
    "not (price < 30)",
    "10 <= price < 40 and stock > 2.5",
    "rating in [4, 5] or on_sale == true",
    "has_image == false and not (category is None)",
    '(category == "shoe" or price > 90) and not (stock < 0 or rating == 1)',
    "price > 1000",
])
def test_filters_give_faiss_exact_results(flat, exact, expr):
    q = clustered(30, seed=7)
    got, want = flat.search(q, 10, filter=expr), exact.search(q, 10, filter=expr)
    assert ids_of(got) == ids_of(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
    if expr:  # every hit passes, by its own returned metadata
        for row in got:
            cells = pd.DataFrame([h.metadata for h in row], columns=flat.columns)
            assert parse_filter(expr, exact.metadata).mask(cells.astype(exact.metadata.dtypes.to_dict())).all()


def test_hits_carry_the_metadata_as_written(flat, data):
    x, ids, meta = data
    (hit,), = flat.search(x[4:5], 1)
    assert hit.id == "p4" and hit.row == -1
    row = meta.iloc[4]
    assert hit.metadata["title"] == row["title"]
    assert hit.metadata["stock"] == int(row["stock"]) and hit.metadata["has_image"] == bool(row["has_image"])
    assert flat.product("p4") == hit.metadata
    nulls = meta.index[meta["price"].isna()][0]
    assert flat.product(f"p{nulls}")["price"] is None
    assert flat.metadata_of(["p4", "nope"]).iloc[1].isna().all()
    np.testing.assert_allclose(flat.vector("p4"), x[4], atol=1e-6)
    assert "p4" in flat and "nope" not in flat and len(flat) == N
    with pytest.raises(KeyError, match="'nope' is not in the index"):
        flat.vector("nope")
    assert flat.search_id("p4", 3)[0].id != "p4"
    assert set(flat.ids) == set(ids)


def test_filter_errors_are_refused_before_milvus(flat):
    with pytest.raises(ValueError, match="unknown column 'colour'; the columns are: title, category"):
        flat.search(clustered(1), 3, filter='colour == "red"')
    with pytest.raises(ValueError, match="holds text"):
        flat.search(clustered(1), 3, filter="category == 3")


def test_metadata_types_names_and_conversions(db):
    x = clustered(40, d=8)
    meta = pd.DataFrame({"colour group": ["a"] * 40, "meta": ["m"] * 40, "Type": range(40),
                         "tags": [["x", "y"]] * 40, "when": pd.Timestamp("2024-05-01"), "blob": [b"\x00"] * 40})
    notes: list[str] = []
    index = MilvusIndex.build(x, [f"q{i}" for i in range(40)], meta, "model-a", "cfg", uri=db,
                              collection="odd_columns", kind="flat", notes=notes)
    fields = {c["column"]: c["field"] for c in index.manifest["columns"]}
    assert fields["Type"] == "Type" and fields["meta"] != "meta" and " " not in fields["colour group"]
    assert "blob" not in fields and any("'blob'" in n and "binary" in n for n in notes)
    assert any("'when'" in n and "ISO 8601" in n for n in notes)
    cells = index.product("q1")
    assert cells == {"colour group": "a", "meta": "m", "Type": 1, "tags": '["x", "y"]', "when": "2024-05-01T00:00:00"}
    hits = index.search(x[:5], 3, filter='meta == "m" and Type >= 3')
    assert all(len(row) == 3 and all(h.metadata["Type"] >= 3 for h in row) for row in hits)
    assert index.search(x[3:4], 1, filter='meta == "m" and Type >= 3')[0][0].id == "q3"
    with pytest.raises(ValueError, match="longer than 512 bytes"):
        MilvusIndex.build(x[:1], ["é" * 300], None, "model-a", "cfg", uri=db, collection="long_ids")


# ---------------------------------------------------------------- add / remove


def test_add_remove_then_search_matches_faiss(db, data):
    x, ids, meta = data
    first = 500
    index = MilvusIndex.build(x[:first], ids[:first], meta.iloc[:first], "model-a", "cfg", uri=db,
                              collection="updates", kind="flat")
    exact = ProductIndex.build(x[:first], ids[:first], meta.iloc[:first], "model-a", "cfg")
    gone = ids[:20]
    index.remove(gone)
    exact.remove(gone)
    new_meta = meta.iloc[first:].reset_index(drop=True).assign(extra=1)
    ignored = index.add(ids[first:], x[first:], new_meta)
    exact.add(ids[first:], x[first:], new_meta.drop(columns=["extra"]))
    assert ignored == ["extra"]
    assert len(index) == len(exact) == N - 20
    q = clustered(40, seed=11)
    for expr in (None, 'category == "hat" and price < 60'):
        assert ids_of(index.search(q, 10, filter=expr)) == ids_of(exact.search(q, 10, filter=expr))
    assert "p0" not in index and ids[-1] in index
    # Refusals change nothing.
    with pytest.raises(ValueError, match="already in the index: 'p30'"):
        index.add(["p30"], x[:1])
    with pytest.raises(KeyError, match="not in the index: 'p0'"):
        index.remove(["p25", "p0"])
    assert "p25" in index
    with pytest.raises(ValueError, match="product 'z1', column 'stock'"):
        index.add(["z1"], x[:1], pd.DataFrame({"stock": ["many"]}))
    with pytest.raises(ValueError, match="dimension 8, the index has 32"):
        index.add(["z2"], x[:1, :8])
    assert "z1" not in index and len(index) == N - 20
    # update(): a replacement (remove and add the same id) is allowed in one go.
    index.update(add=(["p30"], x[31:32], None), remove=["p30"])
    np.testing.assert_allclose(index.vector("p30"), x[31], atol=1e-6)
    assert index.product("p30")["title"] is None


# ---------------------------------------------------------------- model check, rebuilds, refusals


def test_another_models_collection_is_refused(db, flat):
    with pytest.raises(IndexLoadError, match="'flat_products' was built by model model-a, this model is model-b"):
        MilvusIndex.open(db, "flat_products", expected_model_id="model-b")
    assert MilvusIndex.open(db, "flat_products", expected_model_id="model-a").model_id == "model-a"
    assert load_index(MilvusSource(db, "flat_products"), "model-a").kind == "flat"
    with pytest.raises(IndexLoadError, match="was built by model model-a, this model is model-c"):
        load_index(MilvusSource(db, "flat_products"), "model-c")


def test_rebuild_swaps_the_alias_and_open_indexes_follow_same_model_only(db):
    x = clustered(60, d=8)
    ids = [f"r{i}" for i in range(60)]
    old = MilvusIndex.build(x, ids, None, "model-a", "cfg", uri=db, collection="rebuilt", kind="flat")
    reader = MilvusIndex.open(db, "rebuilt", "model-a")
    first = reader.manifest["physical_collection"]
    MilvusIndex.build(x[:30], ids[:30], None, "model-a", "cfg", uri=db, collection="rebuilt", kind="flat")
    client = connect(db)
    assert not client.has_collection(first), "the previous collection should be dropped"
    assert len(reader) == 30 and reader.search(x[40:41], 1)[0][0].id in ids[:30]
    assert reader.manifest["physical_collection"] != first and len(old) == 30
    MilvusIndex.build(x, ids, None, "model-z", "cfg", uri=db, collection="rebuilt", kind="flat")
    with pytest.raises(IndexLoadError, match="built by model model-z, this model is model-a"):
        reader.search(x[:1], 1)


def test_refuses_collections_it_did_not_make_and_missing_ones(db, tmp_path):
    from pymilvus import DataType, MilvusClient

    client = connect(db)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("theirs", schema=schema)
    with pytest.raises(IndexLoadError, match="'theirs' is not an item-embed index"):
        MilvusIndex.open(db, "theirs")
    with pytest.raises(IndexLoadError, match="'theirs' is not an item-embed index"):
        MilvusIndex.build(clustered(5, d=4), list("abcde"), None, "model-a", "cfg", uri=db, collection="theirs")
    assert client.has_collection("theirs")
    with pytest.raises(IndexLoadError, match="no collection 'absent'"):
        MilvusIndex.open(db, "absent")
    missing = tmp_path / "nothing.db"
    with pytest.raises(IndexLoadError, match="no Milvus Lite database at"):
        MilvusIndex.open(str(missing), "x")
    assert not missing.exists(), "opening must not create a database"
    with pytest.raises(ValueError, match="ending in .db"):
        MilvusIndex.open(str(tmp_path / "products.lite"), "x")
    with pytest.raises(ValueError, match="collection name"):
        MilvusIndex.open(db, "bad-name")


def test_missing_pymilvus_gives_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(MilvusBackendError, match=r"pip install 'item-embed\[milvus\]'"):
        MilvusIndex.build(clustered(3, d=4), list("abc"), None, "m", "c", uri=str(tmp_path / "a.db"), collection="c")


# ---------------------------------------------------------------- CLI


def test_cli_index_search_update(db, data, exact, tmp_path, capsys):
    x, ids, meta = data
    first = write_embedding_file(tmp_path / "first.parquet", x[:550], meta.iloc[:550], ids[:550])
    rest = write_embedding_file(tmp_path / "rest.parquet", x[550:], meta.iloc[550:], ids[550:])
    milvus = ["--backend", "milvus", "--uri", db, "--collection", "cli_products"]
    capsys.readouterr()
    assert main(["index", str(first), *milvus, "--kind", "flat", "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "indexed 550 products into Milvus collection cli_products at" in out and "kind flat (Milvus FLAT" in out
    assert json.loads((tmp_path / "r.json").read_text())["rows_indexed"] == 550

    assert main(["index-update", *milvus, "--add", str(rest), "--remove", "p0", "p1"]) == 0
    assert f"removed 2, added {N - 550}: {N - 2} products" in capsys.readouterr().out
    reference = ProductIndex.build(x[2:], ids[2:], meta.iloc[2:], "model-a", "cfg")
    expr = 'category in ["bag", "shoe"] and price < 60'
    assert main(["search", *milvus, "--id", "p5", "-k", "5", "--filter", expr, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in got["results"]] == [h.id for h in reference.search_id("p5", 5, filter=expr)]
    assert all(r["category"] in ("bag", "shoe") and r["price"] < 60 for r in got["results"])
    assert got["index"].startswith("Milvus collection cli_products")
    assert main(["search", *milvus, "--id", "p5", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "title"] and len(lines) == 4

    other = write_embedding_file(tmp_path / "other.parquet", x[:2], meta.iloc[:2], ["o1", "o2"], model_id="model-b")
    assert main(["index-update", *milvus, "--add", str(other)]) == 2
    assert "embedded by model model-b, the index by model-a" in capsys.readouterr().err
    assert main(["index-update", *milvus, "--add", str(rest), "--remove", "nope"]) == 2
    assert "not in the index: 'nope'" in capsys.readouterr().err
    assert main(["index-update", *milvus, "--add", str(rest)]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert len(MilvusIndex.open(db, "cli_products")) == N - 2, "a refused update changed the collection"

    for argv, message in [
        (["index", str(first), "--backend", "milvus", "--uri", db], "--backend milvus needs --collection"),
        (["index", str(first), *milvus, "--out", str(tmp_path / "ix")], "--out is a FAISS index folder"),
        (["index", str(first), "--uri", db], "add --backend milvus"),
        (["index", str(first)], "give the index folder (--out)"),
        (["search", "--backend", "milvus", "--uri", db, "--collection", "absent", "--id", "p5"], "no collection 'absent'"),
        (["index-update", "--remove", "p5"], "give the index folder (INDEX)"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.fixture(scope="module")
def tiny_embedded(tiny_catalog, tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(out), "--no-progress",
                 "--precision", "fp32"]) == 0
    return out


def test_cli_with_a_real_model_agrees_with_faiss_and_checks_the_model(db, tiny_catalog, tiny_run, tiny_embedded,
                                                                      tmp_path, capsys):
    from item_embed.encode import ItemEncoder

    milvus = ["--backend", "milvus", "--uri", db, "--collection", "tiny"]
    assert main(["index", str(tiny_embedded), *milvus]) == 0  # hnsw, the Milvus default
    assert main(["index", str(tiny_embedded), "--out", str(tmp_path / "ix")]) == 0
    faiss_index = ProductIndex.load(tmp_path / "ix")
    encoder = ItemEncoder.from_pretrained(tiny_run, precision="fp32")
    index = MilvusIndex.open(db, "tiny", expected_model_id=encoder.model_id)
    assert index.kind == "hnsw" and len(index) == len(faiss_index)
    titles = pd.read_csv(tiny_catalog)["title"].tolist()[:20]
    q = encoder.encode([{"title": t} for t in titles])
    assert agreement(index.search(q, 10), faiss_index.search(q, 10)) >= 0.99

    capsys.readouterr()
    common = ["--model", str(tiny_run), "--title", titles[3], "-k", "4", "--precision", "fp32", "--json"]
    assert main(["search", *milvus, *common]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in got["results"]] == [h.id for h in index.search(q[3:4], 4)[0]]
    assert got["results"][0]["title"] is not None
    # A collection of another model is refused with both ids named.
    other = tmp_path / "other.parquet"
    table = pq.read_table(tiny_embedded)
    meta = dict(table.schema.metadata)
    meta[b"item_embed.model_id"] = b"someone-else"
    pq.write_table(table.replace_schema_metadata(meta), other)
    assert main(["index", str(other), "--backend", "milvus", "--uri", db, "--collection", "foreign"]) == 0
    capsys.readouterr()
    assert main(["search", "--backend", "milvus", "--uri", db, "--collection", "foreign", *common]) == 2
    err = capsys.readouterr().err
    assert f"was built by model someone-else, this model is {encoder.model_id}" in err


# ---------------------------------------------------------------- real data (slow)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "hm-dev.parquet").is_file(), reason="../shared/data/hm-dev.parquet absent")
def test_hm_dev_top10_agreement_with_faiss_exact(tmp_path):
    """2,000 hm-dev products embedded by all-MiniLM-L6-v2 (titles and descriptions, 384-d), in Milvus Lite
    (HNSW) and FAISS flat: top-10 agreement >= 0.99 over 500 product queries, and with a category filter."""
    from item_embed.evaluate.baselines import _load_minilm
    from item_embed.evaluate.featurizers import l2_normalise

    frame = pd.read_parquet(SHARED_DATA / "hm-dev.parquet",
                            columns=["id", "title", "description", "product_group", "colour"]).head(2000)
    texts = (frame["title"].fillna("") + ". " + frame["description"].fillna("")).tolist()
    x = l2_normalise(_load_minilm("cpu")(texts, 64)).astype(np.float32)
    ids = frame["id"].astype(str).tolist()
    meta = frame[["title", "product_group", "colour"]]
    exact = ProductIndex.build(x, ids, meta, "minilm", "cfg")
    index = MilvusIndex.build(x, ids, meta, "minilm", "cfg", uri=str(tmp_path / "hm.db"), collection="hm",
                              kind="hnsw")
    q = x[::4]
    assert agreement(index.search(q, 10), exact.search(q, 10)) >= 0.99
    expr = 'product_group == "Garment Upper body"'
    got, want = index.search(q[:100], 10, filter=expr), exact.search(q[:100], 10, filter=expr)
    assert agreement(got, want) >= 0.99
    assert all(h.metadata["product_group"] == "Garment Upper body" for row in got for h in row)
