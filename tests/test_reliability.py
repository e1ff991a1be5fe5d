"""Reliability: nothing lost, nothing crashes, memory stays put, the index swaps under load.

- Accounting end to end through the CLI (train, embed, index) on a generated catalog with every
  kind of bad row: rows in = rows used + rows reported, each bad row reported with its reason,
  read back from the report files the commands write.
- Index accounting on hand-corrupted embedding rows (NaN, inf, zeros, wrong dimension, null,
  missing and duplicate ids), and ``--strict``.
- The real service (``item-embed serve`` in a subprocess on 127.0.0.1): a short load test with
  zero errors, oversize uploads and a decompression bomb answered 413 without the server's RSS
  growing, and the index rebuilt and reloaded (SIGHUP) several times while searches run: every
  request succeeds and, after each swap, results come from the new index.

Everything is generated under tmp_path; the served tests share one server process.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from item_embed.cli import build_parser, main
from item_embed.embeddings import read_embedding_metadata, read_embeddings
from item_embed.index.product_index import REPORT_FILE, ProductIndex

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_service_load", REPO / "benchmarks" / "bench_service_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# --------------------------------------------------------------------------------------------
# A catalog of bad rows
# --------------------------------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(w: int = 32, h: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))


def _bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose header claims w x h pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) // 2]


def _alpha_png() -> bytes:
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[:, :16] = (255, 0, 0, 255)
    return _encode(Image.fromarray(arr, mode="RGBA"))


def _oriented_jpeg() -> bytes:
    """A photo stored sideways with EXIF orientation 6, as phones write them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)),
                   "JPEG", exif=exif)


class Made:
    """An image path made by write_bad_catalog: a symlink loop, a FIFO."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


class RawLine:
    """A CSV line written as is (malformed on purpose)."""

    def __init__(self, text: str) -> None:
        self.text = text


# (id, title, image) -> expected: None = used, else substrings of the reported reason.
# image: bytes written to a file, a str used as the raw path, None for no image, Made(kind) for a
# special file. A title given as bytes is written raw (not UTF-8); a RawLine title is the whole line.
BAD_ROWS: list[tuple[object, object, object, list[str] | None]] = [
    ("trunc-jpeg", "Truncated photo", _truncated_jpeg(), ["bad image", "corrupt or truncated"]),
    ("zero-byte", "Empty file", b"", ["bad image", "empty"]),
    ("not-image", "Text posing as a photo", b"just some text\n" * 20, ["bad image", "not a recognised image"]),
    ("alpha", "Transparent PNG", _alpha_png(), None),
    ("cmyk", "CMYK JPEG", _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), None),
    ("gray16", "16-bit grey PNG", _encode(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))), None),
    ("bomb", "Decompression bomb", _bomb_png(), ["bad image", "bomb"]),
    ("one-px", "One pixel", _rgb(1, 1), ["bad image", "smaller than"]),
    ("banner", "Extreme aspect", _rgb(800, 8), ["bad image", "aspect ratio"]),
    ("missing-file", "Photo that is not there", "images/nope.png", ["bad image", "not found"]),
    ("escape", "Path escaping the root", "../outside.png", ["bad image", "escapes"]),
    ("bad-utf8", "Caf\xe9 au lait".encode("latin-1"), _rgb(seed=3), ["title is not valid UTF-8"]),
    ("empty-title", "", _rgb(seed=4), None),
    ("long-title", "x" * 10_000, _rgb(seed=5), None),
    ("emoji", "👟 Laufschuh – 跑步鞋 🏃‍♀️", _rgb(seed=6), None),
    ("cjk", "綿100％ Ｔシャツ（白） 무지 티셔츠", None, None),
    ("good-00", "Duplicate id, second row", _rgb(seed=7), ["duplicate id", "first seen at row 0"]),
    (None, "Row without an id", _rgb(seed=8), ["missing id"]),
    ("exif-6", "Phone photo stored sideways", _oriented_jpeg(), None),
    ("loop", "Symlink loop", Made("loop"), ["bad image", "symlink loop"]),
    ("long-name", "File name over 255 bytes", "images/" + "n" * 300 + ".png", ["bad image", "file name too long"]),
    ("a-dir", "A directory as the image", "images", ["bad image", "is a directory"]),
    ("fifo", "A named pipe as the image", Made("fifo"), ["bad image", "FIFO"]),
    ("dev-zero", "A device as the image", "/dev/zero", ["bad image", "device"]),
    (" padded", "Id with padding", _rgb(seed=9), ["leading or trailing whitespace"]),
    ("two\nlines", "Id with a newline", _rgb(seed=10), ["control character"]),
    ("extra", RawLine("extra,Line with a surplus field,,surplus"), None, ["bad CSV line", "4 fields"]),
    ("short", RawLine("short"), None, ["bad CSV line", "1 field"]),
]
GOOD_ROWS = [(f"good-{i:02d}", f"Good product number {i}, colour {c}", _rgb(seed=100 + i), None)
             for i, c in enumerate(["red", "blue", "green", "black", "white", "grey", "pink", "navy", "teal", "tan"])]
ROWS = GOOD_ROWS[:1] + BAD_ROWS + GOOD_ROWS[1:]


def write_bad_catalog(folder: Path) -> Path:
    shop = folder / "shop"
    (shop / "images").mkdir(parents=True)
    (folder / "outside.png").write_bytes(_rgb())  # exists, outside the image root
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["id", "title", "image"])
    raw_titles = {}
    for row, (pid, title, image, _) in enumerate(ROWS):
        if isinstance(title, RawLine):
            buf.write(title.text + "\n")
            continue
        if isinstance(image, Made):
            rel = f"images/{image.kind}"
            if image.kind == "loop":
                (shop / rel).symlink_to(shop / rel)
            else:
                os.mkfifo(shop / rel)
            image = rel
        if isinstance(image, bytes):
            rel = f"images/row{row:02d}.img"
            (shop / rel).write_bytes(image)
            image = rel
        if isinstance(title, bytes):
            raw_titles[f"@@RAW{row}@@"] = title
            title = f"@@RAW{row}@@"
        out.writerow([pid or "", title, image or ""])
    data = buf.getvalue().encode("utf-8")
    for marker, raw in raw_titles.items():
        data = data.replace(marker.encode(), raw)
    path = shop / "catalog.csv"
    path.write_bytes(data)
    return path


def _check_report(report: dict) -> dict[int, dict]:
    """The accounting identity, and each catalog row's fate against ROWS. Returns row -> problem."""
    assert report["rows_in"] == len(ROWS)
    assert report["rows_in"] == report["rows_used"] + report["rows_reported"]
    assert report["rows_reported"] == len(report["problems"])
    problems = {p["row"]: p for p in report["problems"]}
    for row, (pid, _, _, reasons) in enumerate(ROWS):
        if reasons is None:
            assert row not in problems, f"row {row} ({pid}) should be used: {problems.get(row)}"
        else:
            assert row in problems, f"row {row} ({pid}) should be reported"
            for word in reasons:
                assert word in problems[row]["reason"], (row, pid, problems[row]["reason"])
            assert problems[row]["id"] == (pid or None)
    return problems


USED_IDS = [pid for pid, _, _, reasons in ROWS if reasons is None]


def test_accounting_through_train_embed_and_index(tmp_path, capsys):
    catalog = write_bad_catalog(tmp_path)
    run, emb, index = tmp_path / "run", tmp_path / "emb.parquet", tmp_path / "index"
    assert main(["train", str(catalog), "--out", str(run), "--preset", "tiny", "--steps", "1", "--batch-size", "4",
                 "--image-size", "32", "--patch-size", "16", "--precision", "fp32", "--no-progress"]) == 0
    _check_report(json.loads((run / "catalog_report.json").read_text()))

    assert main(["embed", str(catalog), "--model", str(run), "--out", str(emb), "--no-progress"]) == 0
    report = json.loads((tmp_path / "emb.report.json").read_text())
    _check_report(report)
    frame, _ = read_embeddings(emb)
    assert frame["id"].tolist() == USED_IDS and report["rows_used"] == len(frame)

    capsys.readouterr()
    assert main(["index", str(emb), "--out", str(index)]) == 0
    out = capsys.readouterr().out
    ix_report = json.loads((index / REPORT_FILE).read_text())
    assert ix_report["rows_in"] == len(frame) == ix_report["rows_indexed"] and ix_report["rows_reported"] == 0
    assert ProductIndex.load(index).ids == USED_IDS
    assert f"{len(frame)} rows in, {len(frame)} indexed, 0 reported" in out


# --------------------------------------------------------------------------------------------
# Index accounting on corrupted embedding rows
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tiny_catalog, tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel-emb") / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    return out


def test_index_accounts_for_every_embedding_row(embedded, tmp_path, capsys):
    frame, emb = read_embeddings(embedded)
    d = emb.shape[1]
    n_good = 20
    ids = frame["id"].tolist()[:n_good]
    vectors = [v.tolist() for v in emb[:n_good]]
    bad = [  # (id, embedding, reason words)
        ("nan-row", [float("nan")] + [0.1] * (d - 1), ["non-finite"]),
        ("inf-row", [float("inf")] + [0.1] * (d - 1), ["non-finite"]),
        ("zero-row", [0.0] * d, ["all-zero"]),
        ("short-row", [0.1] * (d - 1), ["wrong dimension", f"{d - 1} values"]),
        ("long-row", [0.1] * (d + 5), ["wrong dimension", f"{d + 5} values"]),
        ("null-row", None, ["no embedding"]),
        ("null-value", [None] + [0.1] * (d - 1), ["non-finite"]),
        (None, [0.2] * d, ["missing id"]),
        ("   ", [0.2] * d, ["missing id"]),
        (ids[3], [0.3] * d, ["duplicate id", "first indexed at row 3"]),
    ]
    rows_ids = ids + [b[0] for b in bad]
    rows_vec = vectors + [b[1] for b in bad]
    order = list(range(len(rows_ids)))
    random.Random(0).shuffle(order[n_good:])  # bad rows after the first n_good, in a shuffled order
    table = pa.table({"id": pa.array([rows_ids[i] for i in order], pa.string()),
                      "title": [f"title {i}" for i in order],
                      "embedding": pa.array([rows_vec[i] for i in order], pa.list_(pa.float32()))})
    meta = {f"item_embed.{k}".encode(): v.encode() for k, v in read_embedding_metadata(embedded).items()}
    corrupted = tmp_path / "corrupted.parquet"
    pq.write_table(table.replace_schema_metadata(meta), corrupted)

    capsys.readouterr()
    assert main(["index", str(corrupted), "--out", str(tmp_path / "ix")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ix" / REPORT_FILE).read_text())
    assert report["rows_in"] == len(order) == report["rows_indexed"] + report["rows_reported"]
    assert report["rows_indexed"] == n_good and report["rows_reported"] == len(bad)
    by_row = {p["row"]: p for p in report["problems"]}
    for pos, i in enumerate(order):
        if i < n_good:
            assert pos not in by_row
            continue
        pid, _, words = bad[i - n_good]
        assert by_row[pos]["id"] == (pid if pid and pid.strip() else None)
        for w in words:
            assert w in by_row[pos]["reason"], (pid, by_row[pos])
    index = ProductIndex.load(tmp_path / "ix")
    assert index.ids == ids
    np.testing.assert_allclose(index.vector(ids[3]), emb[3] / np.linalg.norm(emb[3]), atol=1e-6)
    assert f"{len(order)} rows in, {n_good} indexed, {len(bad)} reported" in out and "skipped row" in out

    # --strict: the first bad row is fatal, named with its row and id, and nothing is written.
    assert main(["index", str(corrupted), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    first = min(by_row)
    assert f"row {first} " in err and by_row[first]["reason"] in err
    assert not (tmp_path / "strict").exists()


def test_index_update_skips_and_reports_bad_rows_and_keeps_the_build_report(embedded, tmp_path, capsys):
    """`index-update --add` treats unusable rows as `index` does (skipped, named in a report saved in
    the index folder; --strict refuses the update), and an update keeps the build's own report."""
    from item_embed.index.product_index import UPDATE_REPORT_FILE

    frame, emb = read_embeddings(embedded)
    d = emb.shape[1]
    ids = frame["id"].tolist()
    meta = {f"item_embed.{k}".encode(): v.encode() for k, v in read_embedding_metadata(embedded).items()}
    first, rest = tmp_path / "first.parquet", tmp_path / "rest.parquet"
    pq.write_table(pq.read_table(embedded).slice(0, 10), first)
    add_ids = ids[10:20] + ["nan-row", "zero-row", ids[11]]
    add_vec = [v.tolist() for v in emb[10:20]] + [[float("nan")] * d, [0.0] * d, emb[11].tolist()]
    table = pa.table({"id": pa.array(add_ids, pa.string()),
                      "embedding": pa.array(add_vec, pa.list_(pa.float32()))})
    pq.write_table(table.replace_schema_metadata(meta), rest)
    ix = tmp_path / "ix"
    assert main(["index", str(first), "--out", str(ix)]) == 0
    build_report = (ix / REPORT_FILE).read_text()

    capsys.readouterr()
    assert main(["index-update", str(ix), "--add", str(rest), "--strict"]) == 2
    assert "row 10 " in capsys.readouterr().err
    assert len(ProductIndex.load(ix)) == 10 and not (ix / UPDATE_REPORT_FILE).exists()

    assert main(["index-update", str(ix), "--add", str(rest)]) == 0
    out = capsys.readouterr().out
    assert "13 rows in, 10 indexed, 3 reported" in out
    index = ProductIndex.load(ix)
    assert index.ids == ids[:20]
    report = json.loads((ix / UPDATE_REPORT_FILE).read_text())
    assert {p["row"]: p["id"] for p in report["problems"]} == {10: "nan-row", 11: "zero-row", 12: ids[11]}
    assert (ix / REPORT_FILE).read_text() == build_report, "the update dropped the build's row report"
    assert main(["index-update", str(ix), "--remove", ids[0]]) == 0
    assert (ix / UPDATE_REPORT_FILE).is_file() and (ix / REPORT_FILE).read_text() == build_report

    # Nothing usable to add is an error, as for `index`; the index is left as it was.
    bad_only = tmp_path / "bad-only.parquet"
    pq.write_table(table.slice(10, 2).replace_schema_metadata(meta), bad_only)
    capsys.readouterr()
    assert main(["index-update", str(ix), "--add", str(bad_only)]) == 2
    assert "no usable rows" in capsys.readouterr().err and len(ProductIndex.load(ix)) == 19

    # A rebuild over the folder is a new index: the old update report does not survive it.
    assert main(["index", str(first), "--out", str(ix)]) == 0
    assert not (ix / UPDATE_REPORT_FILE).exists() and (ix / REPORT_FILE).is_file()


def test_index_and_index_update_read_a_sharded_embedding_folder(embedded, tmp_path):
    """`embed` under torchrun writes a folder of checksummed parts: `index` and `index-update --add`
    read it as one file (and a part that fails its checksum is refused)."""
    from item_embed.checkpoint import sha256_file

    frame, _ = read_embeddings(embedded)
    ids = frame["id"].tolist()
    table = pq.read_table(embedded)
    shards = []
    for name, (start, stop) in {"a": (0, 10), "b": (10, 16)}.items():
        folder = tmp_path / name
        folder.mkdir()
        parts = []
        for k, (lo, hi) in enumerate(((start, start + 3), (start + 3, stop))):
            f = folder / f"part-{k:05d}.parquet"
            pq.write_table(table.slice(lo, hi - lo), f)
            parts.append({"file": f.name, "sha256": sha256_file(f)})
        (folder / "manifest.json").write_text(json.dumps({"parts": parts}))
        shards.append(folder)
    ix = tmp_path / "ix"
    assert main(["index", str(shards[0]), "--out", str(ix)]) == 0
    assert main(["index-update", str(ix), "--add", str(shards[1])]) == 0
    assert ProductIndex.load(ix).ids == ids[:16]
    (shards[1] / "part-00001.parquet").write_bytes(b"damaged")
    assert main(["index-update", str(ix), "--remove", ids[0], "--add", str(shards[1])]) == 2
    assert len(ProductIndex.load(ix)) == 16


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--model", "m", "--index", "i"])
    assert args.host == "127.0.0.1"


# --------------------------------------------------------------------------------------------
# The real service in a subprocess
# --------------------------------------------------------------------------------------------


class Served:
    def __init__(self, server, embedded: Path, index_dir: Path, catalog: Path) -> None:
        self.server, self.embedded, self.index_dir, self.catalog = server, embedded, index_dir, catalog
        self.frame, self.vectors = read_embeddings(embedded)
        self.meta = read_embedding_metadata(embedded)

    def build_index(self, rows: list[int]) -> set[str]:
        """Save an index of these embedding rows over the served folder (atomically); returns its ids."""
        part = self.frame.iloc[rows].reset_index(drop=True)
        ProductIndex.build(self.vectors[rows], part["id"], part.drop(columns=["id"]), self.meta["model_id"],
                           self.meta.get("config_hash", ""), catalog=self.meta.get("catalog"),
                           image_root=self.meta.get("image_root")).save(self.index_dir)
        return set(part["id"])


@pytest.fixture(scope="module")
def served(embedded, tiny_catalog, tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    index_dir = folder / "index"
    assert main(["index", str(embedded), "--out", str(index_dir)]) == 0
    server = bench.Server(tiny_run, index_dir, log=folder / "serve.log").start()
    try:
        yield Served(server, embedded, index_dir, tiny_catalog)
    finally:
        server.stop()


def test_load_smoke_has_no_errors(served):
    queries = bench.queries_from_catalog(served.catalog, n=20, image_px=128)
    result = bench.run_load(served.server.base_url, queries, clients=4, seconds=3)
    p50, p99 = result.percentiles()
    print(f"load smoke: {result.requests} requests, {result.errors} errors, {result.throughput:.1f} req/s, "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert result.errors == 0, result.error_samples
    assert result.requests >= 20 and set(result.latencies) == {"title", "image", "image+title"}
    assert 0 < p50 <= p99
    assert "| all |" in bench.render(result, bench.machine(), {"Command": "test"})


def _raw_upload(port: int, total: int, chunked: bool) -> tuple[bytes, int]:
    """POST /search with a ``total``-byte image over a raw socket; returns (reply head, body bytes sent)."""
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + (b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % total) + b"\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
    block = b"\xff" * 2**16
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head)
        try:
            # A declared length over the limit is answered from the headers alone: wait for that
            # answer first (a body sent after it would make the closed connection reset).
            answered = not chunked and select.select([s], [], [], 10)[0]
            if not answered:
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                while sent < total:
                    if select.select([s], [], [], 0)[0]:
                        break  # answered before the body ended
                    s.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                    sent += len(block)
            while b"\r\n\r\n" not in reply:
                data = s.recv(65536)
                if not data:
                    break
                reply += data
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
    return reply, sent


def test_oversize_uploads_and_bombs_do_not_grow_memory(served):
    server = served.server
    port = server.port
    bomb = _bomb_png(60_000, 60_000)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        def post_bomb() -> httpx.Response:
            return http.post("/search", files={"image": ("bomb.png", bomb, "image/png")}, data={"title": "mug"})

        # Warm-up: every path once, so that one-off allocations are not counted.
        assert http.post("/search", data={"title": "warm up"}).status_code == 200
        assert post_bomb().status_code == 413
        _raw_upload(port, 12 * 2**20, chunked=True)
        time.sleep(0.3)
        base = server.rss_kib()
        peak_known = server.reset_peak_rss()

        total = 50 * 2**20
        replies = []
        for chunked in (True, False, True):
            reply, sent = _raw_upload(port, total, chunked)
            assert sent < total // 2, f"the server read {sent:,} of {total:,} bytes (chunked={chunked})"
            replies.append(reply)
        r = post_bomb()
        assert r.status_code == 413 and ("bomb" in r.json()["detail"] or "pixel" in r.json()["detail"])
        r = http.post("/embed", files={"image": ("b.png", _bomb_png(9_000, 9_000), "image/png")})
        assert r.status_code == 413, r.text  # 81 Mpx: over the 40 Mpx cap, refused from the header
        assert http.post("/search", data={"title": "still serving"}).status_code == 200
    # The Content-Length one is refused from its headers, before any byte of the body.
    assert replies[1].startswith(b"HTTP/1.1 413"), replies[1][:200]
    for reply in replies:  # a streamed one may lose the race with the connection's reset
        assert not reply or reply.startswith(b"HTTP/1.1 413"), reply[:200]
    time.sleep(0.3)
    grown = (server.rss_kib() - base) / 1024
    peak = (server.peak_rss_kib() - base) / 1024 if peak_known else grown
    print(f"server RSS: base {base / 1024:.0f} MiB, +{grown:.1f} MiB after, peak +{peak:.1f} MiB")
    assert grown < 30 and peak < 30, f"RSS grew {grown:.1f} MiB (peak {peak:.1f} MiB) over {base / 1024:.0f} MiB"


def test_index_hot_swap_under_load_loses_no_request(served):
    server = served.server
    n = len(served.frame)
    all_ids = served.frame["id"].tolist()
    common = list(range(30))  # in every index: what the clients query
    rng = random.Random(0)
    titles = served.frame["title"].tolist()
    title_of = dict(zip(all_ids, titles))
    generation = server.health()["index_generation"]
    served_sets = [set(all_ids)]  # every index served so far (the fixture's has every row)
    problems: list[str] = []
    counts = {"requests": 0}
    stop = threading.Event()

    def client(c: int) -> None:
        i = c
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            while not stop.is_set():
                pid = all_ids[common[i % len(common)]]
                if i % 3 == 0:
                    r = http.post("/search", data={"title": titles[i % n], "k": "10"})
                elif i % 3 == 1:
                    r = http.get(f"/similar/{pid}", params={"k": 10})
                else:
                    r = http.get(f"/products/{pid}")
                i += 1
                counts["requests"] += 1
                if r.status_code != 200:
                    problems.append(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                hits = {h["id"] for h in body.get("hits", [])}
                if not any(hits <= s for s in list(served_sets)):
                    problems.append(f"hits from no single index: {sorted(hits)[:5]}")
                # Each hit's metadata is its own product's (not another row of another index).
                for h in body.get("hits", []) + ([body] if "title" in body else []):
                    if h["title"] != title_of[h["id"]]:
                        problems.append(f"{h['id']} came with the title {h['title']!r}")

    def wait_for(predicate, what: str) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            h = server.health()
            if predicate(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; server log:\n{server.log()[-2000:]}")

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(3)]
    for t in threads:
        t.start()
    try:
        previous = set(all_ids)
        for cycle in range(4):
            rest = [r for r in range(len(common), n)]
            rows = common + sorted(rng.sample(rest, len(rest) // 2))
            new = served.build_index(rows)
            served_sets.append(new)
            server.sighup()
            generation += 1
            wait_for(lambda h: h["index_generation"] == generation and h["last_reload"] == "ok", f"reload {cycle}")
            assert server.health()["index_size"] == len(new)
            with httpx.Client(base_url=server.base_url, timeout=30) as http:
                added, removed = sorted(new - previous), sorted(previous - new)
                assert removed and (added or cycle == 0)  # the first index replaces one with every product
                for pid in added[:3]:
                    assert http.get(f"/similar/{pid}").status_code == 200, "an added product is not served"
                assert http.get(f"/products/{removed[0]}").status_code == 404, "a removed product is still served"
                for t in titles[:5]:
                    hits = {h["id"] for h in http.post("/search", data={"title": t, "k": "20"}).json()["hits"]}
                    assert hits <= new, "a search after the swap answered from an old index"
            previous = new

        # A damaged index is refused: the previous one keeps serving, and the refusal is logged.
        faiss_file = served.index_dir / "index.faiss"
        faiss_file.write_bytes(faiss_file.read_bytes()[:-100])
        server.sighup()
        wait_for(lambda h: h["last_reload"] == "refused", "the refusal")
        h = server.health()
        assert h["index_generation"] == generation and h["index_size"] == len(previous)
        assert "refused" in server.log() and "still serving the previous index" in server.log()
        time.sleep(0.5)  # keep the clients running on the kept index for a moment
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"hot swap: {counts['requests']} requests during 4 reloads + 1 refusal")
    assert not problems, problems[:5]
    assert counts["requests"] >= 50
