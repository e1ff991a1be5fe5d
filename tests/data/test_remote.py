"""Catalogs and images at URIs, against real endpoints on loopback: an HTTP server started here
(404s, timeouts, dropped connections, a redirect loop, an endless body, a flaky host) and S3 through
moto's standalone server. Every row is used or reported, with its status, URI and id."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from item_embed.data.catalog import Catalog, CatalogError, CatalogReport
from item_embed.data.images import ImageError, ImageLimits, decode_image, load_image_array
from item_embed.data.remote import FetchError, FetchOptions, fetch_bytes, redact

S = 32
QUICK = FetchOptions(workers=8, timeout=0.5, retries=1, backoff=0.01)


def jpeg(color=(200, 30, 30), size=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def _products(catalog: Catalog, **kwargs):
    report = CatalogReport()
    products = [p for chunk in catalog.iter_chunks(S, report=report, **kwargs) for p in chunk]
    report.check_accounting()
    return products, report


def test_redact_drops_credentials_and_query():
    assert redact("https://user:secret@cdn.example/a/b.jpg?X-Amz-Signature=abc#frag") == "https://cdn.example/a/b.jpg"
    assert redact("s3://bucket/key.jpg") == "s3://bucket/key.jpg"
    assert redact("images/a.jpg") == "images/a.jpg"


def test_http_image_is_fetched_not_taken_for_a_local_path(http_server, tmp_path):
    """The reported bug: an https image was resolved as ".../https:/cdn...". Also through a root
    that went through pathlib (the way older callers pass it)."""
    http_server.files["/img/a.jpg"] = jpeg()
    url = f"{http_server.url}/img/a.jpg"
    assert decode_image(url).size == (40, 40)
    arr = load_image_array("a.jpg", S, Path(f"{http_server.url}/img"))
    assert arr.shape == (S, S, 3) and arr[S // 2, S // 2, 0] > 150
    with pytest.raises(ImageError, match="escapes the image root"):
        load_image_array("../../etc/passwd", S, f"{http_server.url}/img")


def test_http_image_failures_are_reported_per_row(http_server, tmp_path):
    srv = http_server
    srv.slow_seconds = 3.0
    srv.files["/img/ok.jpg"] = jpeg()
    srv.files["/img/rel.jpg"] = jpeg((0, 0, 200))
    srv.files["/img/not-an-image.jpg"] = b"<html>hello</html>"
    base = srv.url
    rows = [
        ("ok", f"{base}/img/ok.jpg?sig=SECRET"),  # a presigned URL: the signature stays out of reports
        ("rel", "rel.jpg"),  # relative to --image-root, itself a URL
        ("missing", f"{base}/status/404"),
        ("forbidden", f"http://user:PASSWORD@127.0.0.1:{base.rsplit(':', 1)[1]}/status/403"),
        ("server-error", f"{base}/status/500"),
        ("slow", f"{base}/slow/img/ok.jpg"),
        ("dropped", f"{base}/drop"),
        ("loop", f"{base}/loop"),
        ("huge", f"{base}/huge"),
        ("flaky", f"{base}/flaky/img/ok.jpg"),  # one 503, then the image: a retry fetches it
        ("junk", f"{base}/img/not-an-image.jpg"),
        ("title-only", None),
    ]
    frame = pd.DataFrame({"id": [r[0] for r in rows], "title": [f"product {r[0]}" for r in rows],
                          "image": [r[1] for r in rows]})
    catalog = Catalog(frame, image_root=f"{base}/img", fetch=QUICK)
    t0 = time.perf_counter()
    products, report = _products(catalog, limits=ImageLimits(max_bytes=200_000), chunk_size=5)
    elapsed = time.perf_counter() - t0
    assert {p.id for p in products} == {"ok", "rel", "flaky", "title-only"}
    assert next(p for p in products if p.id == "rel").image[S // 2, S // 2, 2] > 150
    problems = {p.id: p for p in report.problems}
    assert set(problems) == {"missing", "forbidden", "server-error", "slow", "dropped", "loop", "huge", "junk"}
    assert problems["missing"].status == 404 and "HTTP 404" in problems["missing"].reason
    assert problems["forbidden"].status == 403
    assert problems["server-error"].status == 500 and "after 2 tries" in problems["server-error"].reason
    assert problems["slow"].status == "timeout" and "timed out" in problems["slow"].reason
    assert "connection failed" in problems["dropped"].reason
    assert problems["loop"].status == "redirect loop"
    assert "over the 200,000-byte cap" in problems["huge"].reason
    assert problems["junk"].reason.startswith("bad image:")
    for p in report.problems:
        assert p.row == frame.index[frame["id"] == p.id][0]
    text = json.dumps(report.to_dict())
    assert "SECRET" not in text and "PASSWORD" not in text
    assert problems["missing"].uri == f"{base}/status/404"
    # The endless body stopped near the cap (the server fills socket buffers, not 200 MB).
    assert srv.huge_sent < 32 * 1024 * 1024
    # Two tries of the slow path at 0.5 s, not the 3 s it would take to answer.
    assert elapsed < 2.5


def test_fetch_stops_at_declared_length_before_reading(http_server):
    http_server.files["/big.jpg"] = b"x" * 300_000
    with pytest.raises(FetchError, match="over the 1,000-byte cap") as e:
        fetch_bytes(f"{http_server.url}/big.jpg", 1_000, QUICK)
    assert e.value.status == "too large"


def test_fetching_overlaps_a_slow_host(http_server):
    """40 images at 0.1 s each: fetched 8 at a time, not one after another (4 s)."""
    http_server.delay = 0.1
    for i in range(40):
        http_server.files[f"/img/{i}.jpg"] = jpeg((i * 5, 0, 0))
    frame = pd.DataFrame({"id": [str(i) for i in range(40)], "title": ["t"] * 40,
                          "image": [f"{http_server.url}/img/{i}.jpg" for i in range(40)]})
    t0 = time.perf_counter()
    products, report = _products(Catalog(frame, fetch=FetchOptions(workers=8)), chunk_size=10)
    assert len(products) == 40 and report.reported == 0
    assert [p.id for p in products] == [str(i) for i in range(40)]  # row order kept
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_catalog_at_a_url_with_relative_images(http_server, fmt):
    srv = http_server
    srv.files["/shop/images/a.jpg"] = jpeg()
    frame = pd.DataFrame({"id": ["a", "b", "c"], "title": ["A", "B", "C"],
                          "image": ["images/a.jpg", "images/none.jpg", "../../secret.jpg"]})
    buf = io.BytesIO()
    frame.to_csv(buf, index=False) if fmt == "csv" else frame.to_parquet(buf)
    srv.files[f"/shop/catalog.{fmt}"] = buf.getvalue()
    catalog = Catalog.open(f"{srv.url}/shop/catalog.{fmt}?token=SECRET", fetch=QUICK)
    assert catalog.source == f"{srv.url}/shop/catalog.{fmt}"
    assert catalog.image_root == f"{srv.url}/shop"
    products, report = _products(catalog)
    assert [p.id for p in products] == ["a"]
    reasons = {p.id: p.reason for p in report.problems}
    assert "HTTP 404" in reasons["b"] and "escapes the image root" in reasons["c"]
    with pytest.raises(CatalogError, match="not found"):
        Catalog.open(f"{srv.url}/shop/nothing.csv")


@pytest.fixture
def s3_catalog(s3_server):
    """A bucket with a Parquet catalog: relative keys, absolute s3:// URIs, a missing object."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="shop-catalog")
    for name, color in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
        s3.put_object(Bucket="shop-catalog", Key=f"photos/{name}.jpg", Body=jpeg(color))
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "title": ["red", "green", "gone", "text only"],
                          "image": ["photos/a.jpg", "s3://shop-catalog/photos/b.jpg", "photos/c.jpg", None],
                          "category": ["x", "y", "z", "w"]})
    buf = io.BytesIO()
    frame.to_parquet(buf, row_group_size=2)
    s3.put_object(Bucket="shop-catalog", Key="catalog.parquet", Body=buf.getvalue())
    return "s3://shop-catalog/catalog.parquet"


def test_s3_catalog_and_images(s3_catalog):
    catalog = Catalog.open(s3_catalog, fetch=QUICK)
    assert catalog.image_root == "s3://shop-catalog" and len(catalog) == 4
    products, report = _products(catalog, chunk_size=2)
    assert [p.id for p in products] == ["a", "b", "d"]
    assert products[0].image[S // 2, S // 2, 0] > 150 and products[1].image[S // 2, S // 2, 1] > 150
    (problem,) = report.problems
    assert problem.id == "c" and problem.status == 404 and problem.uri == "s3://shop-catalog/photos/c.jpg"
    assert list(catalog.frame["category"]) == ["x", "y", "z", "w"]
    with pytest.raises(CatalogError, match="not found"):
        Catalog.open("s3://shop-catalog/missing.parquet")


def test_s3_image_over_the_cap_is_refused_before_download(s3_catalog):
    with pytest.raises(FetchError, match="cap"):
        fetch_bytes("s3://shop-catalog/photos/a.jpg", 10, QUICK)
    assert np.asarray(decode_image("s3://shop-catalog/photos/a.jpg")).shape == (40, 40, 3)
