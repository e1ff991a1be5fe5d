"""WebDataset shards as a catalog (img2dataset's layout), written with webdataset.ShardWriter:
local and over HTTP, brace patterns, bad members reported like bad rows, and the CLI verbs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from item_embed.cli import main
from item_embed.data.catalog import Catalog, CatalogReport, Columns
from item_embed.embeddings import read_embeddings

S = 32


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(folder: Path, samples: list[dict], per_shard: int = 4) -> str:
    """Shards as img2dataset writes them; returns the brace pattern naming them all."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    n = len(list(folder.glob("shard-*.tar")))
    return str(folder / f"shard-{{000000..{n - 1:06d}}}.tar")


def img2dataset_samples(n: int) -> list[dict]:
    return [{"__key__": f"{i:09d}", "jpg": jpeg((i * 20 % 256, 50, 100)), "txt": f"product number {i}",
             "json": {"key": f"{i:09d}", "url": f"https://cdn.example/{i}.jpg", "category": f"c{i % 3}",
                      "width": 40}} for i in range(n)]


def _read(catalog: Catalog, **kwargs):
    report = CatalogReport()
    products = [p for chunk in catalog.iter_chunks(S, report=report, **kwargs) for p in chunk]
    report.check_accounting()
    return products, report


def test_shards_read_in_order_with_json_fields_carried(tmp_path):
    spec = write_shards(tmp_path / "s", img2dataset_samples(10))
    assert spec.endswith("shard-{000000..000002}.tar")
    catalog = Catalog.open(spec)
    assert catalog.known_len() is None and len(catalog) == 10
    assert catalog.extra_columns == ["title", "key", "url", "category", "width"]
    products, report = _read(catalog, chunk_size=3)
    assert [p.id for p in products] == [f"{i:09d}" for i in range(10)]  # the key is the id
    assert [p.row for p in products] == list(range(10))
    assert products[3].text == "product number 3" and products[3].image.shape == (S, S, 3)
    assert list(catalog.frame["category"])[:4] == ["c0", "c1", "c2", "c0"]


def test_json_id_and_title_win_over_key_and_txt(tmp_path):
    samples = [{"__key__": "k1", "png": np.asarray(Image.new("RGB", (40, 40), "red")), "txt": "caption",
                "json": {"id": "sku-1", "title": "Red mug"}}]
    spec = write_shards(tmp_path / "s", samples)
    (product,), _ = _read(Catalog.open(spec))
    assert product.id == "sku-1" and product.text == "Red mug" and product.image is not None


def test_bad_members_are_reported_like_bad_rows(tmp_path):
    samples = img2dataset_samples(6)
    samples[1]["jpg"] = b"not a jpeg"
    samples[2]["json"] = b"{broken"
    del samples[3]["jpg"]
    del samples[3]["txt"]  # neither photo nor title
    spec = write_shards(tmp_path / "s", samples, per_shard=3)
    # A third shard cut short in the middle of a member, and a fourth that does not exist.
    good = (tmp_path / "s" / "shard-000000.tar").read_bytes()
    (tmp_path / "s" / "shard-000002.tar").write_bytes(good[:5000])  # inside its first sample
    spec = str(tmp_path / "s" / "shard-{000000..000003}.tar")
    with pytest.raises(Exception, match="shard not found"):
        Catalog.open(spec)
    spec = str(tmp_path / "s" / "shard-{000000..000002}.tar")
    products, report = _read(Catalog.open(spec))
    # Shard 2 (a copy of shard 0, cut inside its first sample's members): that sample is reported.
    assert [p.id for p in products] == ["000000000", "000000004", "000000005"]
    reasons = {p.row: p.reason for p in report.problems}
    assert reasons[1].startswith("bad image:")
    assert "bad member 000000002.json" in reasons[2] and "shard-000000.tar" in reasons[2]
    assert reasons[3] == "no usable image and no title"
    assert "shard unreadable from here on" in reasons[6] and "truncated" in reasons[6]
    assert report.rows_in == 7
    assert report.rows_in == report.used + report.reported


def test_shards_over_http_match_local(tmp_path, http_server):
    spec = write_shards(tmp_path / "s", img2dataset_samples(7), per_shard=3)
    for f in (tmp_path / "s").glob("*.tar"):
        http_server.files[f"/shards/{f.name}"] = f.read_bytes()
    local, _ = _read(Catalog.open(spec))
    remote, _ = _read(Catalog.open(f"{http_server.url}/shards/shard-{{000000..000002}}.tar"))
    assert [(p.id, p.text, p.image.tobytes()) for p in local] == [(p.id, p.text, p.image.tobytes()) for p in remote]
    (missing,) = _read(Catalog.open(f"{http_server.url}/shards/shard-{{000002..000003}}.tar"))[1].problems
    assert "shard unreadable" in missing.reason


def _catalog_as_shards(catalog_csv: Path, folder: Path) -> str:
    frame = pd.read_csv(catalog_csv)
    samples = []
    for rec in frame.to_dict("records"):
        extra = {k: v for k, v in rec.items() if k not in ("image", "title")}
        samples.append({"__key__": str(rec["id"]), "jpg": (catalog_csv.parent / rec["image"]).read_bytes(),
                        "txt": rec["title"], "json": extra})
    return write_shards(folder, samples, per_shard=25)


def test_cli_embed_prepare_train_read_shards(tiny_catalog, tiny_run, tmp_path):
    spec = _catalog_as_shards(tiny_catalog, tmp_path / "shards")
    a, b = tmp_path / "csv.parquet", tmp_path / "shards.parquet"
    common = ["--model", str(tiny_run), "--no-progress", "--precision", "fp32", "--batch-size", "16"]
    assert main(["embed", str(tiny_catalog), "--out", str(a), *common]) == 0
    assert main(["embed", spec, "--out", str(b), *common]) == 0
    fa, ea = read_embeddings(a)
    fb, eb = read_embeddings(b)
    assert list(fa["id"].astype(str)) == list(fb["id"])
    assert list(fa["category"]) == list(fb["category"])
    np.testing.assert_allclose(ea, eb, atol=1e-5)

    assert main(["prepare", spec, "--out", str(tmp_path / "cache"), "--preset", "tiny", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    report = json.loads((tmp_path / "cache" / "catalog_report.json").read_text())
    assert meta["count"] == len(fa) and report["rows_in"] == len(fa)
    assert main(["train", spec, "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "8", "--no-progress", "--precision", "fp32"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_columns_map_into_shards(tmp_path):
    samples = [{"__key__": "a", "webp": jpeg((1, 2, 3)), "json": {"sku": "X1", "name": "Blue tee"}}]
    spec = write_shards(tmp_path / "s", samples)
    catalog = Catalog.open(spec, Columns(id="sku", title="name", image="webp"))
    (product,), _ = _read(catalog)
    assert (product.id, product.text) == ("X1", "Blue tee")


def test_tar_member_without_extension_is_reported(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("README", b"hello"), ("a.txt", b"title a")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    products, report = _read(Catalog.open(path))
    assert [p.id for p in products] == ["a"]
    assert "no extension" in report.problems[0].reason
