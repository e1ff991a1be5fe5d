"""Embedding throughput by where the catalog lives: local Parquet, images behind a slow HTTP server,
WebDataset shards.

The same hm-dev products (2,000 by default) are embedded through ``embeddings.embed_catalog`` (the
``item-embed embed`` path) from (1) a local Parquet file with the JPEG bytes inline, (2) a Parquet
file whose ``image`` column holds URLs of an HTTP server on loopback that waits 50 ms before every
answer (a separate process, like a CDN, so that its work does not share this process's GIL), and
(3) WebDataset shards of 500 samples (img2dataset's layout) on local disk. Reported: products/s of
each and its ratio to local. Target: the 50 ms source at >= 0.8x local, i.e. fetching overlaps the
model's work. Sources run interleaved, best of ``--repeats``; model loading and catalog writing are
not timed.

    python benchmarks/bench_remote.py [--products 2000] [--model RUN_DIR] [--quick] [--no-results]

Without ``--model`` it trains the recipe's model (``--preset minilm``) for 20 steps on these products:
enough for the compute of a real model, not for quality, which this does not measure.
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.8
LATENCY = 0.05


def serve(folder: str, port: int, delay: float) -> None:
    """The HTTP server process: files under ``folder``, each answer ``delay`` seconds late."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(delay)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_sources(products: pd.DataFrame, tmp: Path, url: str) -> dict[str, str]:
    """The same products as local Parquet, Parquet of URLs (images under tmp/www), and shards."""
    import webdataset as wds

    local = tmp / "local.parquet"
    products.to_parquet(local, index=False)
    www = tmp / "www" / "img"
    www.mkdir(parents=True)
    for pid, data in zip(products["id"], products["image"]):
        (www / f"{pid}.jpg").write_bytes(data)
    remote = products.drop(columns=["image"]).assign(image=[f"{url}/img/{pid}.jpg" for pid in products["id"]])
    remote_path = tmp / "remote.parquet"
    remote.to_parquet(remote_path, index=False)
    shards = tmp / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "shard-%06d.tar"), maxcount=500, verbose=0) as sink:
        for rec in products.to_dict("records"):
            extra = {k: v for k, v in rec.items() if k not in ("image", "title", "id")}
            sink.write({"__key__": rec["id"], "jpg": rec["image"], "txt": rec["title"], "json": extra})
    n = len(list(shards.glob("*.tar")))
    return {"local Parquet": str(local), f"HTTP, {LATENCY * 1000:.0f} ms per image": str(remote_path),
            "WebDataset shards": str(shards / f"shard-{{000000..{n - 1:06d}}}.tar")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_embed_options(ap)
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--serve", nargs=3, metavar=("DIR", "PORT", "DELAY"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve[0], int(a.serve[1]), float(a.serve[2]))
        return 0
    if a.quick:
        a.products, a.repeats = min(a.products, 400), 1

    from item_embed.cli import main as cli
    from item_embed.data.catalog import Catalog, CatalogReport
    from item_embed.data.remote import FetchOptions
    from item_embed.embeddings import embed_catalog
    from item_embed.encode import ItemEncoder

    load0, t_start = C.loadavg(), time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "www"), str(port), str(LATENCY)])
    try:
        products = pd.read_parquet(C.SHARED_DATA / "hm-dev.parquet").head(a.products)
        sources = write_sources(products, tmp, f"http://127.0.0.1:{port}")
        model = a.model
        if model is None:
            model = str(tmp / "model")
            preset = "tiny" if a.quick else "minilm"
            rc = cli(["train", sources["local Parquet"], "--out", model, "--preset", preset, "--steps", "20",
                      "--batch-size", "16", "--no-progress"])
            assert rc == 0, "training the benchmark model failed"
        encoder = ItemEncoder.from_pretrained(model)
        warm = Catalog.open(sources["local Parquet"])
        embed_catalog(Catalog(warm.frame.head(128), source="warm-up"), encoder, tmp / "warm", a.batch_size,
                      progress=False)
        rates: dict[str, list[float]] = {name: [] for name in sources}
        noise: dict[str, float] = {name: 0.0 for name in sources}
        for r in range(a.repeats):
            for name, location in sources.items():
                report = CatalogReport()
                out = tmp / f"out-{r}-{len(rates[name])}-{abs(hash(name))}"
                with C.Interference() as it:
                    n = embed_catalog(Catalog.open(location), encoder, out, a.batch_size, report=report,
                                      progress=False)
                assert n == len(products) and report.reported == 0, report.summary()
                rates[name].append(n / it.seconds)
                noise[name] = max(noise[name], it.cores)
                print(f"  {name}: {n / it.seconds:.1f} products/s (others used {it.cores:.2f} cores)", flush=True)
    finally:
        server.terminate()
        server.wait()
    local = max(rates["local Parquet"])
    rows = []
    for name in sources:
        best = max(rates[name])
        rows.append([name, f"{best:.1f}", f"{best / local:.2f}", f"{noise[name]:.2f}"])
    http_name = next(n for n in sources if n.startswith("HTTP"))
    ratio = max(rates[http_name]) / local
    headers = ["source", "products/s (best of runs)", "x local", "other processes' cores"]
    print(C.text_table(headers, rows))
    print(f"HTTP at {LATENCY * 1000:.0f} ms per image: {ratio:.2f}x local (target >= {TARGET})")
    shutil.rmtree(tmp, ignore_errors=True)  # nothing below reads it
    if a.no_results:
        return 0
    body = "\n".join([
        C.run_context(load0, C.loadavg(), load0[0] < 1.5, time.time() - t_start),
        f"- {len(products)} hm-dev products through `embeddings.embed_catalog` (batch {a.batch_size}, precision "
        f"{encoder.precision}, model: {'20-step ' + ('tiny' if a.quick else 'minilm') + ' preset' if a.model is None else a.model}), "
        f"best of {a.repeats} interleaved runs each; the HTTP server is another process on loopback that waits "
        f"{LATENCY * 1000:.0f} ms before each answer; images fetched by {FetchOptions().workers} "
        "threads (the default `--fetch-workers`)",
        "",
        C.markdown_table(headers, rows),
        "",
        f"HTTP source at {LATENCY * 1000:.0f} ms per image: **{ratio:.2f}x** local (target >= {TARGET}): "
        f"{C.verdict(ratio >= TARGET)}",
    ])
    print(f"updated {C.update_results('bench_remote', 'Embedding from remote catalogs and shards (bench_remote.py)', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
