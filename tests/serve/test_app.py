"""The search service (service.py) through FastAPI's TestClient, and the ``serve`` subcommand."""

from __future__ import annotations

import io
import select
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from item_embed.serve.app import create_app, load_service  # noqa: E402
from item_embed.serve.product_images import ProductImages  # noqa: E402
from item_embed.serve.service import MAX_K, ServiceLoadError  # noqa: E402

from item_embed.cli import main  # noqa: E402
from item_embed.data.catalog import Catalog  # noqa: E402
from item_embed.embeddings import read_embeddings  # noqa: E402
from item_embed.encode import ItemEncoder  # noqa: E402
from item_embed.index.product_index import IndexLoadError, ProductIndex  # noqa: E402


class Setup:
    """A tiny served world: model, embedding file, index folder, catalog, app and client."""

    def __init__(self, root: Path, catalog: Path, run: Path) -> None:
        self.root, self.catalog, self.run = root, catalog, run
        self.embeddings = root / "emb.parquet"
        # fp32 on both sides, so the index's vectors and the service's agree to 1e-5.
        assert main(["embed", str(catalog), "--model", str(run), "--out", str(self.embeddings), "--no-progress",
                     "--precision", "fp32"]) == 0
        self.index_dir = root / "index"
        ProductIndex.from_embedding_file(self.embeddings).save(self.index_dir)
        self.frame, self.vectors = read_embeddings(self.embeddings)
        self.table = pd.read_csv(catalog, dtype=str)
        self.app = load_service(run, self.index_dir, precision="fp32")
        self.service = self.app.state.service
        self.encoder: ItemEncoder = self.service.encoder
        self.index: ProductIndex = self.service.index

    def row(self, i: int) -> dict:
        return self.table.iloc[i].to_dict()

    def image_bytes(self, i: int) -> bytes:
        return (self.catalog.parent / self.row(i)["image"]).read_bytes()


@pytest.fixture(scope="module")
def world(tiny_catalog, tiny_run, tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("service"), tiny_catalog, tiny_run)


@pytest.fixture(scope="module")
def client(world):
    with TestClient(world.app) as c:
        yield c


def _upload(data: bytes, name: str = "query.jpg", mime: str = "image/jpeg") -> dict:
    return {"image": (name, data, mime)}


def _ids(body: dict) -> list[str]:
    return [h["id"] for h in body["hits"]]


def _expected_ids(world: Setup, record: dict, k: int) -> list[str]:
    """What the library says, to compare the service with: encoder + index directly."""
    vec = world.encoder.encode([record])
    return [h.id for h in world.index.search(vec, k)[0]]


def _png(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------
# Searching
# --------------------------------------------------------------------------------------------


def test_search_by_image_matches_the_library(world, client):
    r = client.post("/search", files=_upload(world.image_bytes(5)), data={"k": "7"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["modalities"] == ["image"]
    assert len(body["hits"]) == 7
    assert _ids(body) == _expected_ids(world, {"image": world.catalog.parent / world.row(5)["image"]}, 7)
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)


def test_search_by_title_matches_the_library(world, client):
    title = world.row(9)["title"]
    r = client.post("/search", data={"title": title, "k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["modalities"] == ["title"]
    assert _ids(body) == _expected_ids(world, {"title": title}, 5)


def test_search_by_image_and_title_finds_the_listing_itself(world, client):
    row = world.row(12)
    r = client.post("/search", files=_upload(world.image_bytes(12)), data={"title": row["title"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 10 and len(body["hits"]) == 10  # the default k
    top = body["hits"][0]
    # Same image and title as the indexed listing: the same embedding.
    assert top["id"] == row["id"] and top["score"] > 0.999
    assert top["title"] == row["title"]
    assert top["metadata"]["group"] == row["group"] and top["metadata"]["category"] == row["category"]
    assert "title" not in top["metadata"] and "embedding" not in top["metadata"]
    assert top["image_url"] == f"/products/{row['id']}/image"
    assert top["predicted_category"] is None and body["query"]["predicted_category"] is None


def test_hit_image_urls_serve_jpeg_thumbnails(world, client):
    body = client.post("/search", data={"title": world.row(0)["title"], "k": "3"}).json()
    for hit in body["hits"]:
        r = client.get(hit["image_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "JPEG" and min(im.size) >= 4


def test_similar_searches_from_an_indexed_product(world, client):
    pid = world.row(3)["id"]
    r = client.get(f"/similar/{pid}", params={"k": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert pid not in _ids(body) and len(body["hits"]) == 6
    assert _ids(body) == [h.id for h in world.index.search_id(pid, 6)]
    assert body["query"]["product"]["id"] == pid and body["query"]["product"]["title"] == world.row(3)["title"]


def test_k_larger_than_the_index_returns_every_product(world, client):
    r = client.get(f"/similar/{world.row(0)['id']}", params={"k": MAX_K})
    assert r.status_code == 200
    assert len(r.json()["hits"]) == min(MAX_K, len(world.index) - 1)


def test_concurrent_searches_agree_with_sequential_ones(world, client):
    titles = [world.row(i)["title"] for i in range(0, 48, 6)]
    expected = [_ids(client.post("/search", data={"title": t, "k": "5"}).json()) for t in titles]

    def ask(i: int) -> list[str]:
        r = client.post("/search", files=_upload(world.image_bytes(i)), data={"title": titles[i], "k": "5"})
        assert r.status_code == 200, r.text
        r = client.post("/search", data={"title": titles[i], "k": "5"})
        assert r.status_code == 200, r.text
        return _ids(r.json())

    with ThreadPoolExecutor(max_workers=len(titles)) as pool:
        assert list(pool.map(ask, range(len(titles)))) == expected


# --------------------------------------------------------------------------------------------
# Embedding, classifying, products, health, schema, page
# --------------------------------------------------------------------------------------------


def test_embed_returns_the_normalised_model_embedding(world, client):
    row = world.row(2)
    r = client.post("/embed", files=_upload(world.image_bytes(2)), data={"title": row["title"]})
    assert r.status_code == 200, r.text
    body = r.json()
    vec = np.asarray(body["embedding"], dtype=np.float32)
    assert body["dim"] == world.encoder.dim == vec.shape[0]
    assert body["model_id"] == world.encoder.model_id and body["modalities"] == ["image", "title"]
    assert abs(np.linalg.norm(vec) - 1) < 1e-4
    np.testing.assert_allclose(vec, world.vectors[world.frame.index[world.frame["id"] == row["id"]][0]], atol=1e-5)


def test_classify_without_a_classifier_is_a_clear_404(client):
    r = client.post("/classify", data={"title": "red mug"})
    assert r.status_code == 404
    assert "no classifier" in r.json()["detail"]


def test_product_metadata_and_unknown_ids(world, client):
    row = world.row(7)
    r = client.get(f"/products/{row['id']}")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == row["id"] and body["title"] == row["title"] and body["metadata"]["colour"] == row["colour"]
    for path in ("/products/nope", "/products/nope/image", "/similar/nope"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "'nope'" in r.json()["detail"]


def test_health(world, client):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model_id"] == world.encoder.model_id
    assert h["precision"] == world.encoder.precision
    assert h["index_size"] == len(world.frame) and h["dim"] == world.encoder.dim
    assert h["images"] is True and h["classifier"] is None and h["max_upload_bytes"] == 10_000_000


def test_openapi_lists_the_endpoints(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in ("/search", "/embed", "/classify", "/health", "/similar/{product_id}", "/products/{product_id}",
              "/products/{product_id}/image"):
        assert p in paths, p
    assert "post" in paths["/search"] and "get" in paths["/similar/{product_id}"]
    assert client.get("/docs").status_code == 200


def test_search_page_and_its_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for ref in ("/static/app.js", "/static/style.css"):
        assert ref in page.text
        r = client.get(ref)
        assert r.status_code == 200 and len(r.content) > 500
    assert 'type="file"' in page.text and 'id="results"' in page.text


# --------------------------------------------------------------------------------------------
# Error paths: always a 4xx with a message, never a 500
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
def test_neither_image_nor_title_is_422(client, endpoint):
    for data in ({}, {"title": "   "}):
        r = client.post(endpoint, data={**data, "k": "3"} if endpoint == "/search" else data)
        assert r.status_code == 422
        assert "image, a title, or both" in r.json()["detail"]


@pytest.mark.parametrize("kwargs, message", [
    ({"data": {"title": "x" * 20_000}}, "maximum size"),
    ({"files": [("image", ("a.png", _png(), "image/png")), ("image", ("b.png", _png(), "image/png"))]}, "files"),
    ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, "multipart"),
    ({"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, "boundary"),
])
def test_malformed_forms_are_400(client, kwargs, message):
    r = client.post("/search", **kwargs)
    assert r.status_code == 400 and message in r.json()["detail"]


@pytest.mark.parametrize("data", [b"this is not an image at all", b"\x89PNG\r\n\x1a\n truncated", b"\xff\xd8\xff\xe0"])
def test_bad_image_bytes_are_422(client, data):
    r = client.post("/search", files=_upload(data, "bad.png", "image/png"), data={"title": "mug"})
    assert r.status_code == 422, r.text
    assert "image" in r.json()["detail"]


def test_empty_and_tiny_images_are_422(client):
    r = client.post("/search", files=_upload(b"", "empty.png", "image/png"))
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/embed", files=_upload(_png((2, 2)), "dot.png", "image/png"))
    assert r.status_code == 422 and "smaller than" in r.json()["detail"]


def test_decompression_bomb_header_is_413(client):
    bomb = _bomb_png()
    assert len(bomb) < 200
    for endpoint in ("/search", "/embed"):
        r = client.post(endpoint, files=_upload(bomb, "bomb.png", "image/png"))
        assert r.status_code == 413, r.text
        assert "bomb" in r.json()["detail"] or "pixel" in r.json()["detail"]


def test_images_over_the_pixel_cap_are_413(world):
    app = create_app(world.encoder, world.index, max_pixels=50 * 50)
    with TestClient(app) as c:
        assert c.post("/embed", files=_upload(_png((40, 40)), "ok.png", "image/png")).status_code == 200
        r = c.post("/embed", files=_upload(_png((60, 60)), "big.png", "image/png"))
        assert r.status_code == 413 and "60x60" in r.json()["detail"]


@pytest.fixture(scope="module")
def small_upload_client(world):
    app = create_app(world.encoder, world.index, max_upload_bytes=20_000)
    with TestClient(app) as c:
        yield c


def test_oversize_upload_is_413_from_its_content_length(small_upload_client):
    big = b"\xff" * 200_000
    r = small_upload_client.post("/search", files=_upload(big), data={"title": "mug"})
    assert r.status_code == 413
    assert "20,000 bytes" in r.json()["detail"]


def test_oversize_chunked_upload_is_413_while_streaming(small_upload_client):
    boundary = "xyzzy"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
               "Content-Type: image/jpeg\r\n\r\n").encode()
        for _ in range(1000):  # 10 MB, without a Content-Length
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = small_upload_client.post("/search", content=body(),
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert "20,000 bytes" in r.json()["detail"]  # the body limit's message, not the per-file check's


def test_file_over_the_cap_inside_the_body_allowance_is_413(small_upload_client):
    # 30 kB: over the 20 kB file cap, under the request allowance (cap + multipart overhead).
    r = small_upload_client.post("/embed", files=_upload(b"\xff" * 30_000))
    assert r.status_code == 413 and "20,000-byte" in r.json()["detail"]


def test_a_real_server_stops_reading_a_streamed_oversize_body(world, live_server):
    """Over a socket to uvicorn: a chunked body is cut off near the limit, not read to its end."""
    app = create_app(world.encoder, world.index, max_upload_bytes=100_000)
    total, block = 256 * 2**20, b"\0" * 2**16
    sent, reply = 0, b""
    with live_server(app) as (host, port), socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < total:
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered before the body ended
            reply = s.recv(4096)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the server closed or stopped reading: what matters is how much it took
    assert sent < total // 4, f"the server read {sent:,} bytes of a {total:,}-byte body"
    if reply:
        assert reply.startswith(b"HTTP/1.1 413"), reply[:100]


@pytest.mark.parametrize("k", ["0", "101", "-3", "ten"])
def test_bad_k_is_422(world, client, k):
    r = client.post("/search", data={"title": "mug", "k": k})
    assert r.status_code == 422 and r.json()["detail"].startswith("k:")
    r = client.get(f"/similar/{world.row(0)['id']}", params={"k": k})
    assert r.status_code == 422 and r.json()["detail"].startswith("k:")


def test_unexpected_errors_are_a_generic_logged_500(world, monkeypatch, caplog):
    app = create_app(world.encoder, world.index)

    def broken(*a, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.service.index, "search", broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/search", data={"title": "mug"})
    assert r.status_code == 500
    assert "secret" not in r.text and "internal server error" in r.json()["detail"]
    assert any("secret internals" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)


def test_a_decoder_crash_on_hostile_bytes_is_422_not_500(world, monkeypatch):
    from PIL import ImageFile

    def crashing_decoder(*a, **kw):
        raise struct.error("unpack requires a buffer of 4 bytes")  # what a Pillow plugin may raise

    app = create_app(world.encoder, world.index)
    monkeypatch.setattr(ImageFile.ImageFile, "load", crashing_decoder)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/embed", files=_upload(world.image_bytes(0)))
    assert r.status_code == 422 and "decoder failed (error" in r.json()["detail"]


# --------------------------------------------------------------------------------------------
# Reloading the index in service
# --------------------------------------------------------------------------------------------


def test_reload_index_swaps_in_a_rebuilt_index(world, tmp_path, caplog):
    folder = tmp_path / "index"
    ProductIndex.from_embedding_file(world.embeddings).save(folder)
    app = load_service(world.run, folder, precision="fp32")
    svc = app.state.service
    keep = world.frame.iloc[:30].reset_index(drop=True)
    gone = world.frame["id"].iloc[40]
    with TestClient(app) as c:
        assert c.get("/health").json()["index_generation"] == 0 and c.get(f"/products/{gone}").status_code == 200
        ProductIndex.build(world.vectors[:30], keep["id"], keep.drop(columns=["id"]), world.index.model_id,
                           world.index.manifest["config_hash"], catalog=world.index.catalog,
                           image_root=world.index.image_root).save(folder)
        assert svc.reload_index() is True
        h = c.get("/health").json()
        assert h["index_size"] == 30 and h["index_generation"] == 1 and h["last_reload"] == "ok"
        assert c.get(f"/products/{gone}").status_code == 404
        body = c.post("/search", data={"title": world.row(0)["title"], "k": "50"}).json()
        assert len(body["hits"]) == 30 and {h["id"] for h in body["hits"]} == set(keep["id"])
        # Images follow the new index (re-read from its catalog).
        assert c.get(f"/products/{keep['id'][0]}/image").status_code == 200

        # Refused: an index built by another model, a damaged one, a missing folder. The old one stays.
        table = pq.read_table(world.embeddings)
        other = tmp_path / "other.parquet"
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                      b"item_embed.model_id": b"another-model-0000"}), other)
        ProductIndex.from_embedding_file(other).save(tmp_path / "foreign")
        broken = tmp_path / "broken"
        ProductIndex.from_embedding_file(world.embeddings).save(broken)
        (broken / "ids.parquet").write_bytes(b"garbage")
        for bad, why in [(tmp_path / "foreign", "another-model-0000"), (broken, "ids.parquet"),
                         (tmp_path / "nowhere", "not an index")]:
            caplog.clear()
            assert svc.reload_index(bad) is False
            assert any("refused" in rec.message and why in rec.message for rec in caplog.records), why
            h = c.get("/health").json()
            assert h["index_size"] == 30 and h["index_generation"] == 1 and h["last_reload"] == "refused"
        assert c.post("/search", data={"title": "mug"}).status_code == 200

    with pytest.raises(ValueError, match="no index directory"):
        create_app(world.encoder, world.index).state.service.reload_index()


# --------------------------------------------------------------------------------------------
# Loading: identity checks and confinement of catalog images
# --------------------------------------------------------------------------------------------


def test_index_built_by_another_model_is_refused(world, tmp_path):
    table = pq.read_table(world.embeddings)
    meta = {**table.schema.metadata, b"item_embed.model_id": b"another-model-0000"}
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata(meta), other)
    foreign = ProductIndex.from_embedding_file(other)
    foreign.save(tmp_path / "index")
    with pytest.raises(IndexLoadError, match="another-model-0000"):
        load_service(world.run, tmp_path / "index")
    with pytest.raises(ServiceLoadError, match="another-model-0000"):
        create_app(world.encoder, foreign)


def test_catalog_images_never_leave_the_image_root(world, tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    (root / "img" / "ok.png").write_bytes(_png())
    (root / "img" / "link.png").symlink_to(outside)
    ids = [world.row(i)["id"] for i in range(4)]
    frame = pd.DataFrame({"id": ids, "image": ["img/ok.png", "../outside.png", str(outside), "img/link.png"]})
    images = ProductImages.from_catalog(Catalog(frame, image_root=root), world.index.ids)
    with TestClient(create_app(world.encoder, world.index, catalog=images)) as c:
        assert c.get(f"/products/{ids[0]}/image").status_code == 200
        for pid in ids[1:]:
            r = c.get(f"/products/{pid}/image")
            assert r.status_code == 404, pid
            assert "outside the image root" in r.json()["detail"]
        # Products without a catalog row get no image URL (and a 404, not a 500).
        body = c.get(f"/products/{world.row(10)['id']}").json()
        assert body["image_url"] is None
        assert c.get(f"/products/{world.row(10)['id']}/image").status_code == 404


def test_catalog_with_inline_image_bytes(world, tmp_path):
    ids = [world.row(i)["id"] for i in range(3)]
    frame = pd.DataFrame({"id": ids, "title": ["a", "b", "c"], "image": [world.image_bytes(i) for i in range(3)]})
    path = tmp_path / "catalog.parquet"
    frame.to_parquet(path)
    app = load_service(world.run, world.index_dir, catalog=path)
    with TestClient(app) as c:
        r = c.get(f"/products/{ids[1]}/image")
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "JPEG"
        assert c.get(f"/products/{world.row(5)['id']}").json()["image_url"] is None


def test_a_catalog_sharing_no_id_with_the_index_is_refused(world, tmp_path):
    path = tmp_path / "wrong.csv"
    pd.DataFrame({"id": ["x1", "x2"], "image": ["a.png", "b.png"]}).to_csv(path, index=False)
    with pytest.raises(ServiceLoadError, match="shares no product id"):
        load_service(world.run, world.index_dir, catalog=path)


# --------------------------------------------------------------------------------------------
# With a classifier
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_classifier(world, tmp_path_factory):
    classify = pytest.importorskip("item_embed.classify")
    clf = classify.fit_linear(world.vectors, world.frame["category"], world.frame["group"],
                              model_id=world.encoder.model_id, label_column="category", log=lambda m: None)
    folder = tmp_path_factory.mktemp("clf") / "category"
    clf.save(folder)
    return folder


def test_classifier_labels_queries_and_results(world, linear_classifier):
    app = load_service(world.run, world.index_dir, classifier_dir=linear_classifier, precision="fp32")
    clf = app.state.service.classifier
    with TestClient(app) as c:
        assert c.get("/health").json()["classifier"] == "category"
        row = world.row(4)
        r = c.post("/classify", files=_upload(world.image_bytes(4)), data={"title": row["title"], "k": "3"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label_column"] == "category" and len(body["labels"]) == 3
        probs = [p["probability"] for p in body["labels"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        vec = world.encoder.encode([{"image": world.catalog.parent / row["image"], "title": row["title"]}])
        assert [p["label"] for p in body["labels"]] == [lab for lab, _ in clf.top_k(vec, 3)[0]]

        r = c.post("/search", data={"title": row["title"], "k": "4"})
        body = r.json()
        assert body["label_column"] == "category"
        assert body["query"]["predicted_category"]["label"] in clf.labels
        for hit in body["hits"]:
            expected = clf.top_k(world.index.vector(hit["id"])[None, :], 1)[0][0][0]
            assert hit["predicted_category"]["label"] == expected
        r = c.post("/classify", data={"title": "mug", "k": "0"})
        assert r.status_code == 422


def test_classifier_of_another_model_is_refused(world, tmp_path):
    classify = pytest.importorskip("item_embed.classify")
    clf = classify.fit_linear(world.vectors, world.frame["category"], world.frame["group"],
                              model_id="another-model", label_column="category", log=lambda m: None)
    with pytest.raises(ServiceLoadError, match="another-model"):
        create_app(world.encoder, world.index, clf)


def test_finetuned_classifier_labels_results_with_its_own_encoder(world, tmp_path):
    classify = pytest.importorskip("item_embed.classify")
    products = Catalog.open(world.catalog).load_all(world.encoder.cfg.image_size)
    labels = world.table.set_index("id").loc[[p.id for p in products], "category"].tolist()
    clf = classify.fit_finetune(products, labels, [p.id for p in products], world.encoder, label_column="category",
                                epochs=0.2, batch_size=16, log=lambda m: None)
    clf.save(tmp_path / "ft")
    app = load_service(world.run, world.index_dir, classifier_dir=tmp_path / "ft", precision="fp32")
    svc = app.state.service
    assert svc.clf_encoder is not svc.encoder and svc.clf_encoder.model_id != world.encoder.model_id
    with TestClient(app) as c:
        row = world.row(1)
        body = c.post("/search", files=_upload(world.image_bytes(1)), data={"title": row["title"], "k": "3"}).json()
    top = body["hits"][0]
    assert top["id"] == row["id"]  # the base encoder still does the search
    vec = svc.clf_encoder.encode([{"image": world.catalog.parent / row["image"], "title": row["title"]}])
    assert top["predicted_category"]["label"] == svc.classifier.top_k(vec, 1)[0][0][0]
    assert body["query"]["predicted_category"]["label"] == top["predicted_category"]["label"]


# --------------------------------------------------------------------------------------------
# The serve subcommand
# --------------------------------------------------------------------------------------------


def test_serve_command_binds_localhost_and_prints_the_url(world, monkeypatch, capsys):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    rc = main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--port", "8123",
               "--max-upload-mb", "2"])
    assert rc == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8123
    assert calls["app"].state.service.max_upload_bytes == 2_000_000
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out


def test_serve_command_refuses_a_mismatched_index(world, tmp_path, capsys):
    (tmp_path / "not-an-index").mkdir()
    assert main(["serve", "--model", str(world.run), "--index", str(tmp_path / "not-an-index")]) == 2
    assert "not an index" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Catalog ids and hostile catalog paths
# --------------------------------------------------------------------------------------------


def test_catalog_ids_follow_the_one_id_rule():
    """clean_id is data.ids.product_id: ids are never rewritten; refused ones are None (never indexed)."""
    from item_embed.serve.product_images import clean_id

    assert clean_id("a  b") == "a  b"  # inner spaces kept, not collapsed
    assert clean_id(3.0) == "3" and clean_id(12) == "12" and clean_id(np.int64(7)) == "7"
    for refused in (" a", "a ", "x\ny", "tab\there", 2.5, 2.0**60, True, None, float("nan"), pd.NA, "   "):
        assert clean_id(refused) is None, refused
    frame = pd.DataFrame({"id": ["a  b", " a  b", "c"], "image": [b"\x01", b"\x02", b"\x03"]})
    images = ProductImages.from_catalog(Catalog(frame), ["a  b", "c"])
    assert "a  b" in images and images.source("a  b") == b"\x01"  # the padded row is not a second spelling


def test_a_symlink_loop_or_nul_byte_in_a_catalog_path_is_a_clean_404(world, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    ids = [world.row(i)["id"] for i in range(3)]
    frame = pd.DataFrame({"id": ids, "image": ["loop/a.png", "img/a\0.png", "x" * 300 + ".png"]})
    images = ProductImages.from_catalog(Catalog(frame, image_root=root), world.index.ids)
    with TestClient(create_app(world.encoder, world.index, catalog=images)) as c:
        for pid, reason in zip(ids, ("symlink loop", "NUL byte", "")):
            r = c.get(f"/products/{pid}/image")
            assert r.status_code == 404, (pid, r.text)
            detail = r.json()["detail"]
            assert reason in detail and str(tmp_path) not in detail, detail


# --------------------------------------------------------------------------------------------
# Served from Milvus (Milvus Lite)
# --------------------------------------------------------------------------------------------


def _same_hits(got: list[dict], want: list[dict]) -> None:
    """The same ranking: the same scores in order, and the same ids (in any order among exact ties)."""
    assert [round(h["score"], 4) for h in got] == pytest.approx([round(h["score"], 4) for h in want], abs=2e-4)
    by_score = lambda hits: sorted((round(h["score"], 3), h["id"]) for h in hits)  # noqa: E731
    assert [h["id"] for h in got] == [h["id"] for h in want] or by_score(got) == by_score(want)


@pytest.fixture(scope="module")
def milvus_db(world, tmp_path_factory):
    pytest.importorskip("pymilvus")
    from item_embed.index.milvus_index import MilvusIndex

    db = str(tmp_path_factory.mktemp("milvus") / "serve.db")
    MilvusIndex.from_embedding_file(world.embeddings, uri=db, collection="served", kind="flat")
    table = pq.read_table(world.embeddings)
    other = tmp_path_factory.mktemp("foreign") / "other.parquet"
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                  b"item_embed.model_id": b"another-model-0000"}), other)
    MilvusIndex.from_embedding_file(other, uri=db, collection="foreign", kind="flat")
    return db


def test_serving_a_milvus_collection_answers_as_the_faiss_index(world, client, milvus_db):
    from item_embed.index.milvus_index import MilvusSource

    app = load_service(world.run, MilvusSource(milvus_db, "served"), precision="fp32")
    svc = app.state.service
    assert svc.index.kind == "flat" and len(svc.index) == len(world.index)
    with TestClient(app) as m:
        for i in (3, 17):
            row = world.row(i)
            form = {"title": row["title"], "k": "6"}
            got = m.post("/search", files=_upload(world.image_bytes(i)), data=form)
            want = client.post("/search", files=_upload(world.image_bytes(i)), data=form)
            assert got.status_code == want.status_code == 200, got.text
            _same_hits(got.json()["hits"], want.json()["hits"])
            for g, w in zip(got.json()["hits"], want.json()["hits"]):
                if g["id"] == w["id"]:  # the cards: the same title, metadata and image link
                    assert (g["title"], g["metadata"], g["image_url"]) == (w["title"], w["metadata"], w["image_url"])
            got, want = m.get(f"/similar/{row['id']}?k=5"), client.get(f"/similar/{row['id']}?k=5")
            assert got.status_code == 200, got.text
            assert row["id"] not in [h["id"] for h in got.json()["hits"]]
            _same_hits(got.json()["hits"], want.json()["hits"])
            assert got.json()["query"]["product"] == want.json()["query"]["product"]
            assert m.get(f"/products/{row['id']}").json() == client.get(f"/products/{row['id']}").json()
        pid = world.row(2)["id"]
        r = m.get(f"/products/{pid}/image")  # the catalog recorded with the embeddings
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        for path in ("/products/no-such-id", "/similar/no-such-id", "/products/no-such-id/image"):
            assert m.get(path).status_code == 404, path
        health = m.get("/health").json()
        assert health["index_size"] == len(world.index) and health["index_kind"] == "flat"
    assert svc.reload_index() is True  # SIGHUP: the alias read again, the model checked again
    assert svc.index_generation == 1


def test_a_milvus_collection_of_another_model_is_refused_at_start(world, milvus_db, capsys):
    from item_embed.index.milvus_index import MilvusSource

    with pytest.raises(IndexLoadError, match="another-model-0000"):
        load_service(world.run, MilvusSource(milvus_db, "foreign"))
    assert main(["serve", "--model", str(world.run), "--backend", "milvus", "--uri", milvus_db,
                 "--collection", "foreign"]) == 2
    assert "another-model-0000" in capsys.readouterr().err
    assert main(["serve", "--model", str(world.run), "--backend", "milvus", "--uri", milvus_db]) == 2
    assert "--collection" in capsys.readouterr().err
    assert main(["serve", "--model", str(world.run)]) == 2
    assert "give the index folder" in capsys.readouterr().err


def test_serve_command_serves_a_milvus_collection(world, milvus_db, monkeypatch, capsys):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    assert main(["serve", "--model", str(world.run), "--backend", "milvus", "--uri", milvus_db,
                 "--collection", "served", "--precision", "fp32"]) == 0
    assert f"serving {len(world.index)} products" in capsys.readouterr().out
    svc = calls["app"].state.service
    assert type(svc.index).__name__ == "MilvusIndex" and svc.index_dir.collection == "served"
