"""Limits and exposure of the service: decode memory, the upload pixel cap, the read
deadline, the Host check, what 404s reveal, and a manifest whose kind does not match its FAISS file.

The memory load test (``-m slow``) runs the real ``item-embed serve`` in a subprocess.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from item_embed.cli import main  # noqa: E402
from item_embed.data.catalog import Catalog  # noqa: E402
from item_embed.index.product_index import IndexLoadError, ProductIndex  # noqa: E402
from item_embed.serve.app import create_app, load_service  # noqa: E402
from item_embed.serve.memory import MIB, DecodeBudget, decode_bounded, decode_cost  # noqa: E402
from item_embed.data.images import ImageLimits  # noqa: E402
from item_embed.serve.product_images import ProductImages  # noqa: E402
from item_embed.serve.server import HostPolicy, deadline_protocol  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png16_rgba(width: int, height: int, pixel: tuple[int, int, int, int] = (0x8000, 0x4000, 0x2000, 0xC000),
               pixels: np.ndarray | None = None) -> bytes:
    """A 16-bit RGBA PNG (bit depth 16, colour type 6) of one colour, written row by row: a few
    hundred KB for tens of megapixels; or of ``pixels`` (h, w, 4) uint16. Pillow cannot write 16-bit
    RGBA itself."""
    z = zlib.compressobj(9)
    if pixels is None:
        row = b"\x00" + struct.pack(">4H", *pixel) * width
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    else:
        height, width = pixels.shape[:2]
        rows = pixels.astype(">u2").reshape(height, width * 8 // 2).view(np.uint8).reshape(height, width * 8)
        raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
        idat = z.compress(raw) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def header_only_png(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header claims width x height and whose data is empty (refused before decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _upload(data: bytes, name: str = "q.png", mime: str = "image/png") -> dict:
    return {"image": (name, data, mime)}


class World:
    def __init__(self, root: Path, catalog: Path, run: Path) -> None:
        self.root, self.catalog, self.run = root, catalog, run
        emb = root / "emb.parquet"
        assert main(["embed", str(catalog), "--model", str(run), "--out", str(emb), "--no-progress",
                     "--precision", "fp32"]) == 0
        self.index_dir = root / "index"
        ProductIndex.from_embedding_file(emb).save(self.index_dir)
        self.app = load_service(run, self.index_dir, precision="fp32")
        self.encoder = self.app.state.service.encoder
        self.index = self.app.state.service.index
        self.table = pd.read_csv(catalog, dtype=str)


@pytest.fixture(scope="module")
def world(tiny_catalog, tiny_run, tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("limits"), tiny_catalog, tiny_run)


# --------------------------------------------------------------------------------------------
# Decode memory
# --------------------------------------------------------------------------------------------


def test_decode_cost_follows_pixels_and_bit_depth():
    """The estimate comes from the header: 16-bit RGBA (decoded to 8-bit RGBA plus a premultiplied
    copy when it is reduced) costs more per pixel than RGB; a JPEG is costed at its draft size."""
    px = 3000 * 2000
    rgba16 = Image.open(io.BytesIO(png16_rgba(3000, 2000)))
    assert rgba16.mode == "RGBA"
    assert 8 * px <= decode_cost(rgba16, 96) <= 8 * px + 2 * MIB  # decoded + premultiplied copy
    assert decode_cost(rgba16, None) >= 20 * px  # not reduced: the conversions to RGB copy it four times
    rgb = Image.open(io.BytesIO(header_only_png(3000, 2000)))
    assert decode_cost(rgb, 96) <= 4 * px + 2 * MIB
    jpeg = Image.open(io.BytesIO(_encode(Image.new("RGB", (3000, 2000), (9, 9, 9)), "JPEG")))
    jpeg.draft("RGB", (96, 96))  # decoded at 1/8: 375 x 250
    assert jpeg.size == (375, 250) and decode_cost(jpeg, 96) < 2 * MIB


def test_decode_budget_bounds_what_concurrent_decodes_hold():
    budget = DecodeBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        with budget.reserve(n):
            with lock:
                held[0] += n
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= n

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 50, 40, 30, 70, 500)]  # 500: clamped, alone
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] <= 100 or peak[0] == 500  # the oversized one ran alone
    assert budget.peak <= 100 and budget.used == 0


def test_a_large_alpha_upload_is_reduced_as_it_decodes_and_embeds_like_the_library(world):
    """A 16-bit RGBA upload far larger than the model's input is box-reduced right after decoding
    (before the RGB conversions): the model's input differs from the library's (which converts at
    full size, then reduces) by at most one level in rounding, and the embeddings agree."""
    yy, xx = np.mgrid[0:1200, 0:1600].astype(np.float64)
    pixels = np.stack([xx / 1600, yy / 1200, (np.sin(xx / 50) * np.cos(yy / 40) + 1) / 2,
                       0.3 + 0.7 * (xx > 800)], axis=-1)  # gradients, a pattern, half transparent
    data = png16_rgba(0, 0, pixels=np.round(pixels * 65535).astype(np.uint16))
    budget = DecodeBudget(64 * MIB)
    limits = ImageLimits(max_pixels=40_000_000)
    im = decode_bounded(data, 32, limits, budget)
    assert im.mode == "RGB" and max(im.size) < 200  # reduced: 1600 / 16 = 100
    assert 0 < budget.peak <= 1600 * 1200 * 8 + 2 * MIB
    ours = world.encoder.to_product({"image": im}).image.astype(int)
    theirs = world.encoder.to_product({"image": data}).image.astype(int)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.05
    app = create_app(world.encoder, world.index)
    with TestClient(app) as c:
        r = c.post("/embed", files=_upload(data))
    assert r.status_code == 200, r.text
    served = np.asarray(r.json()["embedding"])
    library = world.encoder.encode([{"image": data}])[0]
    assert float(served @ library) > 0.99  # an untrained tiny model: one level on 18 values moves it by 1e-3
    assert app.state.service.decode_budget.used == 0 and app.state.service.decode_budget.peak > 0


def test_uploads_have_a_lower_pixel_cap_than_catalog_images(world):
    """Default 16 Mpx for uploads (refused from the header, 413), 40 Mpx for catalog images."""
    with TestClient(create_app(world.encoder, world.index)) as c:
        assert c.get("/health").json()["max_upload_pixels"] == 16_000_000
        r = c.post("/embed", files=_upload(header_only_png(5000, 4000)))  # 20 Mpx
        assert r.status_code == 413 and "16,000,000-pixel cap for uploads" in r.json()["detail"]
    with TestClient(create_app(world.encoder, world.index, max_upload_pixels=25_000_000)) as c:
        r = c.post("/embed", files=_upload(header_only_png(5000, 4000)))
        assert r.status_code == 422, r.text  # past the cap: decoded, and found empty


def test_an_upload_needing_more_than_the_decode_budget_is_413(world):
    """The per-request limit is the decode budget: a 16-bit RGBA image of 2.4 Mpx needs ~19 MiB."""
    app = create_app(world.encoder, world.index, decode_memory_mb=8)
    with TestClient(app) as c:
        assert c.get("/health").json()["decode_memory_mb"] == 8
        r = c.post("/embed", files=_upload(png16_rgba(1600, 1500)))
        assert r.status_code == 413 and "8 MiB decode budget" in r.json()["detail"], r.text
        # The same pixels as a JPEG decode at 1/8 scale: well inside the budget.
        jpeg = _encode(Image.new("RGB", (1600, 1500), (200, 10, 10)), "JPEG")
        assert c.post("/embed", files=_upload(jpeg, "q.jpg", "image/jpeg")).status_code == 200
    assert app.state.service.decode_budget.used == 0


def test_tune_allocator_applies_on_glibc(tmp_path):
    """Run in a child process: mallopt changes the whole process's allocator."""
    import subprocess

    code = ("from item_embed.serve.memory import tune_allocator, _glibc\n"
            "print(tune_allocator(), _glibc() is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    applied, glibc = out.stdout.split()
    assert applied == glibc  # True on glibc (mallopt accepted both settings), False elsewhere


# --------------------------------------------------------------------------------------------
# Exposure: Host header, 404 messages, index kinds
# --------------------------------------------------------------------------------------------


def test_host_policy_names():
    loop = HostPolicy.for_bind("127.0.0.1")
    for ok in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "127.0.0.1"):
        assert loop.allows(ok), ok
    for bad in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1", "", None):
        assert not loop.allows(bad), bad
    assert HostPolicy.for_bind("::1").allows("[::1]:9000") and HostPolicy.for_bind("localhost").allows("127.0.0.1")
    extra = HostPolicy.for_bind("127.0.0.1", ["search.internal", "Shop.Example:443"])
    assert extra.allows("search.internal:8000") and extra.allows("shop.example") and not extra.allows("x.example")
    wide = HostPolicy.for_bind("0.0.0.0")
    assert wide.allows("192.168.1.20:8000") and wide.allows("[fe80::1]") and wide.allows("localhost")
    assert not wide.allows("rebind.evil.example")
    assert HostPolicy.for_bind("192.168.1.20").allows("192.168.1.20:8000")
    assert not HostPolicy.for_bind("192.168.1.20").allows("10.0.0.1")
    assert HostPolicy.for_bind("127.0.0.1", ["*"]).allows("anything.example")


def test_serve_answers_only_its_own_host_names(world, monkeypatch, capsys):
    """`item-embed serve` on 127.0.0.1: a request naming another host (DNS rebinding) gets 400."""
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--port", "8123",
                 "--allowed-host", "search.internal"]) == 0
    capsys.readouterr()
    with TestClient(calls["app"], base_url="http://127.0.0.1:8123") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"host": "localhost:8123"}).status_code == 200
        assert c.get("/health", headers={"host": "search.internal"}).status_code == 200
        for host in ("rebind.evil.example", "rebind.evil.example:8123"):
            r = c.get("/health", headers={"host": host})
            assert r.status_code == 400 and "--allowed-host" in r.json()["detail"], host
            r = c.post("/search", data={"title": "mug"}, headers={"host": host})
            assert r.status_code == 400
    assert calls["http"].__name__ == "DeadlineH11Protocol" and calls["timeout_keep_alive"] > 0


def test_404_messages_do_not_reveal_server_paths(world, tmp_path):
    root = tmp_path / "shop-images"
    (root / "img").mkdir(parents=True)
    ids = [world.table.iloc[i]["id"] for i in range(4)]
    absolute = tmp_path / "elsewhere" / "gone.png"
    frame = pd.DataFrame({"id": ids, "image": ["img/missing.png", str(absolute), "img/empty.png", "img/pipe.png"]})
    (root / "img" / "empty.png").write_bytes(b"")
    os.mkfifo(root / "img" / "pipe.png")  # would block a reader forever
    images = ProductImages.from_catalog(Catalog(frame, image_root=root), world.index.ids)
    with TestClient(create_app(world.encoder, world.index, catalog=images)) as c:
        for pid in ids:
            r = c.get(f"/products/{pid}/image")
            assert r.status_code == 404, r.text
            assert str(tmp_path) not in r.text and "/tmp" not in r.text, r.text
            assert repr(pid) in r.json()["detail"]
        assert "img/missing.png" in c.get(f"/products/{ids[0]}/image").json()["detail"]  # the catalog's own name


def _index_with_kind(src: Path, dst: Path, kind: str, options: dict) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(kind=kind, options=options)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("kind, options", [("hnsw", {"m": 32, "ef_construction": 40, "ef_search": 64}),
                                           ("ivf", {"nlist": 2, "nprobe": 2})])
def test_a_manifest_kind_that_does_not_match_the_faiss_file_is_a_clear_error(world, tmp_path, capsys, kind, options):
    """A flat FAISS file under a manifest saying hnsw/ivf: a load error naming both kinds, not an
    AttributeError from deep inside FAISS; `serve` exits 2 with it."""
    bad = _index_with_kind(world.index_dir, tmp_path / f"ix-{kind}", kind, options)
    with pytest.raises(IndexLoadError) as err:
        ProductIndex.load(bad)
    message = str(err.value)
    assert str(bad) in message and f"kind {kind!r}" in message and "kind 'flat'" in message
    assert main(["serve", "--model", str(world.run), "--index", str(bad)]) == 2
    assert f"says kind {kind!r}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The read deadline, over real sockets
# --------------------------------------------------------------------------------------------


def _until_closed(s: socket.socket, drip: bytes | None = None, every: float = 0.25, limit: float = 8.0):
    """Read until the server closes (optionally sending ``drip`` every ``every`` s, as slowloris
    does); returns (what came back, seconds it took) or fails after ``limit`` s."""
    t0, reply = time.monotonic(), b""
    s.settimeout(every)
    while time.monotonic() - t0 < limit:
        try:
            data = s.recv(65536)
        except socket.timeout:
            if drip:
                try:
                    s.sendall(drip)
                except OSError:
                    break
            continue
        except ConnectionResetError:
            break
        if not data:
            break
        reply += data
    return reply, time.monotonic() - t0


@pytest.fixture(scope="module")
def deadline_server(world, live_server):
    """The app behind uvicorn with a 1 s read deadline; the service's search waits 1.5 s when asked."""
    app = create_app(world.encoder, world.index)
    svc = app.state.service
    real_search = svc.search

    def search(query, k, *rest):
        if query.title == "take your time":
            time.sleep(1.5)
        return real_search(query, k, *rest)

    svc.search = search
    with live_server(app, http=deadline_protocol(1.0), timeout_keep_alive=5) as addr:
        yield addr


def test_slow_headers_get_408_and_the_connection_closed(deadline_server):
    with socket.create_connection(deadline_server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        reply, took = _until_closed(s, drip=b"X-Slow: 1\r\n")  # a header line every 0.25 s, never the end
    assert reply.startswith(b"HTTP/1.1 408") and b"1 s" in reply, reply[:200]
    assert took < 4, f"closed after {took:.1f}s"


def test_a_slow_body_gets_408_and_the_connection_closed(deadline_server):
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with socket.create_connection(deadline_server) as s:
        s.sendall(head + b'--b\r\nContent-Disposition: form-data; name="title"\r\n\r\n')
        reply, took = _until_closed(s, drip=b"x")
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert took < 4, f"closed after {took:.1f}s"


def test_an_idle_connection_is_closed(deadline_server):
    with socket.create_connection(deadline_server) as s:
        reply, took = _until_closed(s)
    assert reply == b"" and took < 4


def test_answering_takes_as_long_as_it_takes_and_keep_alive_works(deadline_server):
    """The deadline is for receiving a request: a 1.5 s answer is not cut off by a 1 s deadline, and
    the next request on the same connection gets a deadline of its own."""
    import httpx

    host, port = deadline_server
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=20) as http:
        r = http.post("/search", data={"title": "take your time", "k": "3"})
        assert r.status_code == 200, r.text
        time.sleep(0.6)
        assert http.get("/health").status_code == 200
        time.sleep(0.6)  # 1.2 s since the first response: within keep-alive, each request on time
        assert http.get("/health").status_code == 200


# --------------------------------------------------------------------------------------------
# Memory of the real service under concurrent large uploads (slow)
# --------------------------------------------------------------------------------------------


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_service_load", REPO / "benchmarks" / "bench_service_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _hammer(base_url: str, data: bytes, clients: int, uploads: int) -> dict[int, int]:
    import httpx

    codes: dict[int, int] = {}
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=300) as http:
            for _ in range(uploads):
                r = http.post("/embed", files=_upload(data, "big.png"))
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


RSS_PEAK_BOUND_MIB = 512  # the default --decode-memory-mb
RSS_AFTER_BOUND_MIB = 128


@pytest.mark.slow
def test_rss_stays_bounded_under_8_clients_uploading_large_16bit_rgba_pngs(world, tmp_path):
    """8 clients x 20 uploads of a 39.7 Mpx 16-bit RGBA PNG (a few hundred KB), then 8 x 20 of a
    15.9 Mpx one (just under the 16 Mpx upload cap: decoded for real).

    Bounds, over the server's RSS before the uploads: peak (VmHWM) growth < 512 MiB (the default
    decode budget), RSS left after < 128 MiB. Measured before the fix (8 x 20, 0.53 GB base): the
    39.7 Mpx uploads were all decoded, peak +6.0 GB, +2.9 GB left after one round, +5.2 GB after
    two; the 15.9 Mpx ones peak +807 MiB, +261 MiB left. With it: 39.7 Mpx all 413 from the header
    (+0 MiB); 15.9 Mpx peak +260 MiB, +14 MiB left.
    """
    import httpx

    bench = _load_bench()
    over_cap, under_cap = png16_rgba(6300, 6300), png16_rgba(3990, 3990)
    assert len(over_cap) < 600_000 and 6300 * 6300 > 39_600_000
    with bench.Server(world.run, world.index_dir, log=tmp_path / "serve.log") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            assert http.post("/embed", files=_upload(png16_rgba(600, 600))).status_code == 200  # warm up
        time.sleep(0.5)
        base = server.rss_kib() / 1024
        peak_known = server.reset_peak_rss()
        results = []
        for name, data, expected in (("39.7 Mpx", over_cap, 413), ("15.9 Mpx", under_cap, 200)):
            codes = _hammer(server.base_url, data, clients=8, uploads=20)
            assert codes == {expected: 160}, (name, codes, server.log()[-2000:])
            time.sleep(1.0)
            after = server.rss_kib() / 1024 - base
            peak = (server.peak_rss_kib() / 1024 - base) if peak_known else math.nan
            results.append(f"{name}: peak +{peak:.0f} MiB, after +{after:.0f} MiB")
            print(f"server RSS base {base:.0f} MiB; {results[-1]}")
            assert after < RSS_AFTER_BOUND_MIB, results[-1]
            assert not peak_known or peak < RSS_PEAK_BOUND_MIB, results[-1]
