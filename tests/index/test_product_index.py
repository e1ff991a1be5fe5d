"""index.py: the pure exact search, ProductIndex (build, save/load refusals, add/remove) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embed.cli import main
from item_embed.index.product_index import IndexLoadError, ProductIndex, search


def unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(n: int = 300, kind: str = "flat", **options) -> tuple[ProductIndex, np.ndarray]:
    x = unit(n)
    meta = pd.DataFrame({"title": [f"title {i}" for i in range(n)], "group": [i // 3 for i in range(n)]})
    return ProductIndex.build(x, [f"p{i}" for i in range(n)], meta, "model-a", "cfg", kind, **options), x


def write_embedding_file(path: Path, emb: np.ndarray, frame: pd.DataFrame, model_id: str = "model-a") -> Path:
    """An embedding file as `item-embed embed` writes it (see export.embed_catalog)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    flat = pa.array(emb.astype(np.float32).reshape(-1), type=pa.float32())
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))
    meta = {b"item_embed.model_id": model_id.encode(), b"item_embed.config_hash": b"cfg",
            b"item_embed.dim": str(emb.shape[1]).encode(), b"item_embed.catalog": b"/data/catalog.csv",
            b"item_embed.image_root": b"/data/images"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


# ---------------------------------------------------------------- pure search


def brute_force(q: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: every score, sorted by (-score, index) in plain Python."""
    idx, scores = [], []
    for row in q:
        sims = [float(np.dot(row, c)) for c in corpus]
        order = sorted(range(len(corpus)), key=lambda j: (-sims[j], j))[:k]
        idx.append(order)
        scores.append([sims[j] for j in order])
    return np.array(scores, dtype=np.float32), np.array(idx)


def test_search_matches_brute_force_including_ties():
    rng = np.random.default_rng(1)
    # Small integers: every dot product is exact in float32, so ties are real ties.
    corpus = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    corpus[[7, 19, 33]] = corpus[3]  # exact duplicates of row 3: tie with it for every query
    queries = np.concatenate([rng.integers(-2, 3, size=(9, 6)), corpus[3:4]]).astype(np.float32)
    for k in (1, 5, 12):
        scores, idx = search(queries, corpus, k)
        want_scores, want_idx = brute_force(queries, corpus, k)
        assert idx.shape == (10, k) and scores.shape == (10, k)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(scores, want_scores)
    _, idx = search(corpus[3], corpus, 4)  # 1-d query; the 4 copies tie: lower index first
    assert idx.tolist() == [[3, 7, 19, 33]]


def test_search_clips_k_to_corpus():
    scores, idx = search(unit(3), unit(5, seed=1), 50)
    assert idx.shape == (3, 5) and sorted(idx[0].tolist()) == list(range(5))
    assert (np.diff(scores, axis=1) <= 0).all()


# ---------------------------------------------------------------- ProductIndex


def test_flat_index_agrees_with_pure_search():
    index, x = make_index(200)
    q = unit(7, seed=5)
    hits = index.search(q, k=10)
    # Vectors of any length are normalised: scores stay cosines.
    scale = np.random.default_rng(2).uniform(0.1, 10, size=(len(x), 1)).astype(np.float32)
    scaled = ProductIndex.build(x * scale, index.ids, None, "m", "h")
    assert [[(h.id, round(h.score, 5)) for h in r] for r in scaled.search(q * 3, 10)] == \
        [[(h.id, round(h.score, 5)) for h in r] for r in hits]
    want_scores, want_idx = search(q, x, 10)
    assert [[h.id for h in row] for row in hits] == [[f"p{j}" for j in row] for row in want_idx]
    np.testing.assert_allclose([[h.score for h in row] for row in hits], want_scores, atol=1e-5)
    assert hits[0][0].row == want_idx[0][0]
    assert index.metadata.loc[hits[0][0].row, "title"] == f"title {want_idx[0][0]}"


def test_search_id_and_exclude():
    index, x = make_index(100)
    hits = index.search_id("p4", k=5)
    assert len(hits) == 5 and "p4" not in [h.id for h in hits]
    _, want = search(x[4], x, 6)
    assert [h.id for h in hits] == [f"p{j}" for j in want[0] if j != 4][:5]
    hits = index.search(x[:2], k=3, exclude=[{"p0", "p99"}, set()])
    assert "p0" not in [h.id for h in hits[0]] and len(hits[0]) == 3
    assert hits[1][0].id == "p1"
    np.testing.assert_allclose(index.vector("p4"), x[4], atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        index.vector("nope")


def test_build_refuses_bad_input():
    x = unit(5)
    with pytest.raises(ValueError, match="'a'"):
        ProductIndex.build(x, ["a", "a", "b", "c", "d"], None, "m", "h")
    x[2] = 0
    with pytest.raises(ValueError, match="zero"):
        ProductIndex.build(x, list("abcde"), None, "m", "h")
    with pytest.raises(ValueError, match="nlist"):
        ProductIndex.build(unit(5), list("abcde"), None, "m", "h", kind="hnsw", nlist=4)
    with pytest.raises(ValueError, match="at least 312"):
        ProductIndex.build(unit(100), [str(i) for i in range(100)], None, "m", "h", kind="ivf", nlist=8)


def test_save_load_round_trip(tmp_path):
    index, x = make_index(150)
    index.save(tmp_path / "ix")
    loaded = ProductIndex.load(tmp_path / "ix", expected_model_id="model-a")
    q = unit(6, seed=3)
    def results(ix: ProductIndex) -> list:
        return [[(h.id, h.row) for h in r] for r in ix.search(q, 8)]

    assert results(loaded) == results(index)
    pd.testing.assert_frame_equal(loaded.metadata, index.metadata)
    m = loaded.manifest
    assert (m["model_id"], m["config_hash"], m["dim"], m["count"], m["kind"]) == ("model-a", "cfg", 16, 150, "flat")
    assert set(m["files"]) == {"index.faiss", "ids.parquet", "metadata.parquet"} and m["format_version"] == 1
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    # Saving again over the same folder replaces it.
    loaded.remove(["p0"])
    loaded.save(tmp_path / "ix")
    assert len(ProductIndex.load(tmp_path / "ix")) == 149


def test_from_embedding_file_keeps_identity(tmp_path):
    x = unit(20)
    frame = pd.DataFrame({"id": [f"s{i}" for i in range(20)], "title": list("abcdefghijklmnopqrst")})
    index = ProductIndex.from_embedding_file(write_embedding_file(tmp_path / "e.parquet", x, frame))
    assert index.model_id == "model-a" and index.manifest["config_hash"] == "cfg"
    assert index.catalog == "/data/catalog.csv" and index.image_root == "/data/images"
    assert list(index.metadata.columns) == ["title"] and index.search(x[3], 1)[0][0].id == "s3"


def test_load_refuses_other_model(tmp_path):
    make_index(50)[0].save(tmp_path / "ix")
    msg = "built by model model-a, this model is model-b: rebuild it with `item-embed index`"
    with pytest.raises(IndexLoadError, match=msg):
        ProductIndex.load(tmp_path / "ix", expected_model_id="model-b")


@pytest.mark.parametrize("name", ["index.faiss", "ids.parquet", "metadata.parquet"])
def test_load_refuses_damaged_files(tmp_path, name):
    make_index(50)[0].save(tmp_path / "ix")
    path = tmp_path / "ix" / name
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one flipped byte
    with pytest.raises(IndexLoadError, match="checksum"):
        ProductIndex.load(tmp_path / "ix")
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexLoadError, match="truncated"):
        ProductIndex.load(tmp_path / "ix")
    path.unlink()
    with pytest.raises(IndexLoadError, match="missing"):
        ProductIndex.load(tmp_path / "ix")


def test_load_refuses_broken_manifest_and_counts(tmp_path):
    make_index(50)[0].save(tmp_path / "ix")
    manifest = tmp_path / "ix" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**good, "count": 49}))
    with pytest.raises(IndexLoadError, match="counts disagree"):
        ProductIndex.load(tmp_path / "ix")
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(IndexLoadError, match="corrupted"):
        ProductIndex.load(tmp_path / "ix")
    manifest.unlink()
    with pytest.raises(IndexLoadError, match="not an index"):
        ProductIndex.load(tmp_path / "ix")


def test_save_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an item-embed index"):
        make_index(20)[0].save(tmp_path / "docs")
    assert (tmp_path / "docs" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kind, options",
                         [("flat", {}), ("hnsw", {"ef_search": 64}), ("ivf", {"nlist": 4, "nprobe": 4})])
def test_add_remove_without_rebuild(tmp_path, kind, options):
    index, x = make_index(300, kind, **options)
    faiss_index = index._index
    removed = [f"p{i}" for i in range(0, 300, 7)]
    index.remove(removed)
    extra = unit(5, seed=9)
    index.add([f"new{i}" for i in range(5)], extra, pd.DataFrame({"title": [f"new title {i}" for i in range(5)]}))
    assert index._index is faiss_index, "add/remove rebuilt the FAISS index"
    assert len(index) == 300 - len(removed) + 5 and "p7" not in index and "new2" in index

    def check(ix: ProductIndex) -> None:
        hits = ix.search(x, k=20)
        assert all(len(row) == 20 for row in hits), "fewer results than asked"
        assert not {h.id for row in hits for h in row} & set(removed), "a removed product was returned"
        top = ix.search(extra, k=1)
        assert [r[0].id for r in top] == [f"new{i}" for i in range(5)]
        assert ix.metadata.loc[top[2][0].row, "title"] == "new title 2"
        assert pd.isna(ix.metadata.loc[top[2][0].row, "group"])  # column it did not bring
        np.testing.assert_allclose(ix.vector("new3"), extra[3], atol=1e-6)
        # Every live product is still found by its own vector.
        assert [r[0].id for r in ix.search(x[1:4], k=1)] == ["p1", "p2", "p3"]

    check(index)
    index.save(tmp_path / "ix")
    check(ProductIndex.load(tmp_path / "ix"))

    with pytest.raises(ValueError, match="'new1'"):
        index.add(["new1", "fresh"], unit(2))
    with pytest.raises(KeyError, match="'p7'"):
        index.remove(["p1", "p7"])
    assert "p1" in index, "a refused remove changed the index"


@pytest.mark.parametrize("kind, options", [("flat", {}), ("hnsw", {}), ("ivf", {"nlist": 8, "nprobe": 2})])
def test_add_and_remove_while_other_threads_search(kind, options):
    """Updates wait for running searches and hold new ones off: searches from several threads during
    add/remove cycles never fail, always get k hits, and never see a product that is not in the index."""
    import threading

    index, x = make_index(400, kind, **options)
    extra = unit(20, seed=5)
    ever = {f"p{i}" for i in range(400)} | {f"new{i}" for i in range(20)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                hits = index.search(x[rng.integers(0, 400, 8)], k=5)
                assert all(len(row) == 5 for row in hits)
                assert {h.id for row in hits for h in row} <= ever
                index.search_id("p0", k=3)  # p0 is never removed
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for cycle in range(30):
            index.add([f"new{i}" for i in range(20)], extra)
            gone = [f"p{i}" for i in range(1 + cycle % 5, 400, 9)]
            index.remove(gone + [f"new{i}" for i in range(20)])
            index.add(gone, x[[int(g[1:]) for g in gone]])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    assert len(index) == 400 and [r[0].id for r in index.search(x[:3], k=1)] == ["p0", "p1", "p2"]


def test_read_write_lock_lets_readers_share_and_a_writer_wait_for_them():
    import threading

    from item_embed.index.product_index import _ReadWriteLock

    lock, events = _ReadWriteLock(), []

    def write() -> None:
        with lock.write():
            events.append("wrote")

    with lock.read(), lock.read():  # readers share
        writer = threading.Thread(target=write)
        writer.start()
        writer.join(0.2)
        assert writer.is_alive() and not events  # the writer waits for both readers
    writer.join(5)
    assert events == ["wrote"]


@pytest.mark.parametrize("kind, options", [("hnsw", {}), ("ivf", {"nlist": 8, "nprobe": 2})])
def test_approximate_kinds_record_recall(kind, options):
    index, _ = make_index(1200, kind, **options)
    recall = index.manifest["recall_at_10"]
    assert recall["k"] == 10 and recall["queries"] == 1000 and recall["count"] == 1200
    assert 0.0 < recall["recall"] <= 1.0
    if kind == "hnsw":
        assert recall["recall"] > 0.9
    else:
        # 2 of 8 lists visited cannot find every neighbour of random vectors.
        assert recall["recall"] < 0.95
    assert make_index(50)[0].manifest["recall_at_10"] is None


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def embedded(tiny_catalog, tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb.parquet"
    # fp32 (not the CLI's `auto`), so searches below can be compared with the library's fp32 encoder.
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(out), "--no-progress",
                 "--precision", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def cli_index(embedded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ix") / "index"
    assert main(["index", str(embedded), "--out", str(out)]) == 0
    return out


def search_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["search", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_index_prints_and_records(embedded, tmp_path, capsys):
    capsys.readouterr()
    assert main(["index", str(embedded), "--out", str(tmp_path / "h"), "--kind", "hnsw", "--ef-search", "16"]) == 0
    out = capsys.readouterr().out
    n = len(pd.read_parquet(embedded))
    assert f"indexed {n} products: dim 96, kind hnsw" in out and "ef_search=16" in out
    assert "recall@10 vs exact search:" in out
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["count"] == n and manifest["catalog"].endswith("catalog.csv")
    assert main(["index", str(embedded), "--out", str(tmp_path / "i"), "--kind", "ivf", "--nlist", "64"]) == 2
    assert "needs at least" in capsys.readouterr().err


def test_cli_search_by_title_image_and_id(tiny_catalog, tiny_run, embedded, cli_index, capsys):
    from item_embed.encode import ItemEncoder

    catalog = pd.read_csv(tiny_catalog)
    encoder = ItemEncoder.from_pretrained(tiny_run, precision="fp32")  # as the CLI below is told
    index = ProductIndex.load(cli_index)
    title, image = catalog.loc[5, "title"], str(tiny_catalog.parent / catalog.loc[5, "image"])
    common = ["--index", str(cli_index), "--model", str(tiny_run), "-k", "4", "--precision", "fp32"]

    got = search_json(capsys, *common, "--title", title)
    by_title = got["results"][0]["id"]
    want = index.search(encoder.encode([{"title": title}]), 4)[0]
    assert [r["id"] for r in got["results"]] == [h.id for h in want]
    assert [r["rank"] for r in got["results"]] == [1, 2, 3, 4]
    assert got["results"][0]["title"] == index.metadata.loc[want[0].row, "title"]

    got = search_json(capsys, *common, "--image", image)
    want = index.search(encoder.encode([{"image": image}]), 4)[0]
    assert [r["id"] for r in got["results"]] == [h.id for h in want]

    got = search_json(capsys, *common, "--image", image, "--title", title)
    assert got["results"][0]["id"] == str(catalog.loc[5, "id"]), "image + title should find its own listing first"

    pid = str(catalog.loc[5, "id"])
    got = search_json(capsys, "--index", str(cli_index), "--id", pid, "-k", "4")
    assert pid not in [r["id"] for r in got["results"]] and len(got["results"]) == 4
    assert [r["id"] for r in got["results"]] == [h.id for h in index.search_id(pid, 4)]

    capsys.readouterr()
    assert main(["search", *common, "--title", title]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "title"] and len(lines) == 5
    assert lines[1].split()[:2] == ["1", by_title]


def test_cli_search_refusals(tiny_run, cli_index, tmp_path, capsys):
    common = ["--index", str(cli_index), "--model", str(tiny_run)]
    capsys.readouterr()
    assert main(["search", *common]) == 2
    assert "give a query" in capsys.readouterr().err
    assert main(["search", *common, "--id", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    other = tmp_path / "other"
    ProductIndex.load(cli_index).save(other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "model_id": "someone-else"}))
    assert main(["search", "--index", str(other), "--model", str(tiny_run), "--title", "mug"]) == 2
    err = capsys.readouterr().err
    assert "was built by model someone-else, this model is" in err and "item-embed index" in err


def test_cli_index_update(embedded, tmp_path, capsys):
    frame = pd.read_parquet(embedded)
    ix = tmp_path / "ix"
    first = tmp_path / "first.parquet"
    rest = tmp_path / "rest.parquet"
    table = pq.read_table(embedded)
    pq.write_table(table.slice(0, 30), first)
    pq.write_table(table.slice(30), rest)
    assert main(["index", str(first), "--out", str(ix)]) == 0
    ids = [str(i) for i in frame["id"]]
    assert main(["index-update", str(ix), "--add", str(rest), "--remove", ids[0], ids[1]]) == 0
    index = ProductIndex.load(ix)
    assert len(index) == len(ids) - 2 and ids[0] not in index and ids[-1] in index
    capsys.readouterr()
    assert main(["index-update", str(ix), "--add", str(rest)]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert main(["index-update", str(ix), "--remove", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert len(ProductIndex.load(ix)) == len(ids) - 2, "a refused update changed the saved index"


def test_cli_registration(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("index", "index-update", "search", "dedup"):
        assert name in out
