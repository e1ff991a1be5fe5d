"""Shared tiny fixtures: a small built-in catalog and a tiny trained run (session-scoped)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs an engine worker in this process (it sets torch's threads to its share) must
    not change the thread count later tests train with: bit-exact comparisons depend on it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Path:
    """CSV catalog with image files: 40 products x 2-4 listings at 32 px."""
    from item_embed.data.synthetic import write_catalog

    return write_catalog(tmp_path_factory.mktemp("catalog"), n_products=40, seed=0, image_size=32)


@pytest.fixture(scope="session")
def tiny_run(tiny_catalog, tmp_path_factory) -> Path:
    """A tiny-preset model trained for a few steps on the tiny catalog."""
    from item_embed.cli import main

    run = tmp_path_factory.mktemp("run")
    rc = main(["train", str(tiny_catalog), "--out", str(run), "--preset", "tiny", "--steps", "6",
               "--batch-size", "8", "--save-every", "3", "--no-progress", "--precision", "fp32"])
    assert rc == 0
    return run


# ------------------------------------------------------------------ the dual encoder on coloured squares
# (module-scoped: tests/evaluate/test_dual.py and tests/train/test_dual.py each train their own)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (15, 15, 15), "orange": (250, 140, 0), "purple": (140, 40, 180), "pink": (250, 150, 200)}


def squares(per_colour: int = 4, size: int = 32, seed: int = 0) -> list:
    """Coloured squares on white, jittered in place and size, titled by their colour."""
    import numpy as np

    from item_embed.data.catalog import Product

    rng = np.random.default_rng(seed)
    out = []
    for i in range(per_colour * len(COLOURS)):
        name = list(COLOURS)[i % len(COLOURS)]
        img = np.full((size, size, 3), 255, np.uint8)
        a, b = int(rng.integers(0, 8)), int(rng.integers(20, 30))
        img[a:b, a:b] = COLOURS[name]
        out.append(Product(i, f"sq{i}", f"{name} square", img))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from item_embed.data.arrays import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_cfg():
    from item_embed.config import model_config_for

    return model_config_for("tiny")


@pytest.fixture(scope="module")
def square_data(tokenizer, tiny_cfg):
    from item_embed.data.arrays import ProductArrays

    products = squares()
    return products, ProductArrays.build(products, tokenizer, tiny_cfg.max_text_len, tiny_cfg.image_size)


@pytest.fixture(scope="module")
def dual_run(square_data, tokenizer, tiny_cfg, tmp_path_factory):
    """The tiny dual encoder trained for 20 steps on the coloured squares."""
    from item_embed.config import TrainConfig
    from item_embed.train.dual import train_dual

    _, data = square_data
    run = tmp_path_factory.mktemp("dual")
    cfg = TrainConfig(steps=20, batch_size=8, lr=2e-3, precision="fp32", save_every=10)  # lr scale: dual's default
    result = train_dual(data, tokenizer, run, tiny_cfg, cfg, progress=False, log=lambda _m: None)
    return run, result


# ------------------------------------------------------------------ real protocol endpoints on loopback


class LoopbackHTTP:
    """An HTTP server on 127.0.0.1 in a thread: ``files`` by path, plus misbehaving paths.

    ``/status/N`` answers N; ``/slow/...`` waits ``slow_seconds`` before answering; ``/drop`` closes
    the connection without a response; ``/loop`` redirects to itself; ``/huge`` streams ``huge_bytes``
    with no length (``huge_sent`` counts what went out); ``/flaky/...`` answers 503 ``flaky_failures``
    times per path, then the file. Every response waits ``delay`` seconds first (a distant CDN).
    Range requests are honoured, as fsspec reads Parquet files by range.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        self.files: dict[str, bytes] = {}
        self.delay = 0.0
        self.slow_seconds = 5.0
        self.huge_bytes = 200 * 1024 * 1024
        self.huge_sent = 0
        self.flaky_failures = 1
        self.requests: list[str] = []
        self._flaky: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                import time as _time

                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append(self.path)
                if server.delay:
                    _time.sleep(server.delay)
                if path.startswith("/status/"):
                    return self._send(int(path.rsplit("/", 1)[1]), b"no", head)
                if path.startswith("/slow/"):
                    _time.sleep(server.slow_seconds)
                    path = path[len("/slow"):]
                if path == "/drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path == "/huge":
                    return self._huge()
                if path.startswith("/flaky/"):
                    with server._lock:
                        n = server._flaky.get(path, 0)
                        server._flaky[path] = n + 1
                    if n < server.flaky_failures:
                        return self._send(503, b"busy", head)
                    path = path[len("/flaky"):]
                body = server.files.get(path)
                if body is None:
                    return self._send(404, b"not found", head)
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    lo, _, hi = rng[6:].partition("-")
                    lo, hi = int(lo), min(int(hi) if hi else len(body) - 1, len(body) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(body)}")
                    part = body[lo: hi + 1]
                    self.send_header("Content-Length", str(len(part)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(part)
                    return
                self._send(200, body, head)

            def _send(self, status: int, body: bytes, head: bool) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _huge(self) -> None:
                self.send_response(200)
                self.send_header("Connection", "close")  # no length: the body runs until we close
                self.end_headers()
                self.close_connection = True
                block = b"\xff" * (1 << 16)
                try:
                    while server.huge_sent < server.huge_bytes:
                        self.wfile.write(block)
                        server.huge_sent += len(block)
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    server = LoopbackHTTP()
    yield server
    server.close()


@pytest.fixture
def s3_server(monkeypatch):
    """moto's standalone S3 server on loopback; boto-style credentials and the endpoint for this test
    only (AWS_ENDPOINT_URL_S3 is botocore's standard setting, which s3fs follows)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would still point at the last server
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
