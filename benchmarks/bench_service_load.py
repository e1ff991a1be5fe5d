"""Load test of `item-embed serve`: the real service under uvicorn on 127.0.0.1, concurrent clients.

Starts the service in a subprocess on a free loopback port, runs ``--clients`` client threads
(httpx, one connection each) for ``--seconds``, each sending a mix of searches (2 of 5 by title,
2 of 5 by image, 1 of 5 by both), then stops the service. A request counts as an error unless it
is answered 200 with hits. Prints the results and writes them to ``--out`` (a Markdown fragment,
benchmarks/service_load.md by default); exits 1 if any request failed.

    python benchmarks/bench_service_load.py [--clients 8] [--seconds 30]
                                            [--model RUN --index INDEX --catalog CATALOG.csv]

Without --model/--index it first builds a small world in a temporary folder: the built-in
synthetic catalog, a tiny-preset model trained for a few steps, its embeddings and a flat index.
Loopback only: nothing listens beyond 127.0.0.1. The client threads share the machine's cores
with the service, so the numbers are a lower bound for a service with the machine to itself.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "service_load.md"
KINDS_CYCLE = ("title", "image", "title", "image", "image+title")
QUERY_IMAGE_PX = 480  # query photos are re-encoded at this size: decoding is part of the work


# --------------------------------------------------------------------------- the service process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field_name}:\s+(\d+) kB$", text, re.M)
    if not m:
        raise RuntimeError(f"no {field_name} in /proc/{pid}/status")
    return int(m.group(1))


class Server:
    """``item-embed serve`` in a subprocess on 127.0.0.1 and a free port; a context manager."""

    def __init__(self, model: str | Path, index: str | Path, *extra: str, log: str | Path | None = None,
                 start_timeout: float = 180.0) -> None:
        self.model, self.index, self.extra = str(model), str(index), list(extra)
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="item-embed-serve-", suffix=".log")[1])
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "Server":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        for attempt in range(3):  # another process may take the free port between probe and bind
            self.port = free_port()
            # All load comes from one address: the per-client rate limit is off to measure capacity.
            cmd = [sys.executable, "-m", "item_embed", "serve", "--model", self.model, "--index", self.index,
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--rate-limit", "0",
                   *self.extra]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if self._wait_ready():
                return self
            if attempt == 2 or "address already in use" not in self.log().lower():
                raise RuntimeError(f"item-embed serve did not start:\n{self.log()[-3000:]}")
        return self

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        return False

    def health(self) -> dict:
        r = httpx.get(f"{self.base_url}/health", timeout=10)
        r.raise_for_status()
        return r.json()

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: write 5 to /proc/<pid>/clear_refs); False if refused."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def sighup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- queries and load


@dataclass
class Query:
    kind: str  # "title", "image" or "image+title"
    title: str | None = None
    image: bytes | None = None

    def request(self, k: int = 10) -> dict:
        kwargs: dict = {"data": {"k": str(k), **({"title": self.title} if self.title else {})}}
        if self.image is not None:
            kwargs["files"] = {"image": ("query.jpg", self.image, "image/jpeg")}
        return kwargs


def queries_from_catalog(catalog_csv: str | Path, n: int = 40, image_px: int = QUERY_IMAGE_PX) -> list[Query]:
    """Mixed queries from catalog rows: titles as they are, images re-encoded as image_px JPEGs."""
    import pandas as pd
    from PIL import Image

    catalog_csv = Path(catalog_csv)
    table = pd.read_csv(catalog_csv, dtype=str).dropna(subset=["title", "image"]).head(n)
    out = []
    for i, (title, rel) in enumerate(zip(table["title"], table["image"])):
        kind = KINDS_CYCLE[i % len(KINDS_CYCLE)]
        image = None
        if "image" in kind:
            with Image.open(catalog_csv.parent / rel) as im:
                buf = io.BytesIO()
                im.convert("RGB").resize((image_px, image_px), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
                image = buf.getvalue()
        out.append(Query(kind, title if "title" in kind else None, image))
    return out


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds of successful requests
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentiles(self, kind: str | None = None) -> tuple[float, float]:
        """(p50, p99) latency in ms, of one kind or all."""
        values = self.latencies.get(kind, []) if kind else [x for v in self.latencies.values() for x in v]
        if not values:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.asarray(values) * 1000, [50, 99])
        return float(p50), float(p99)


def run_load(base_url: str, queries: list[Query], clients: int = 8, seconds: float = 30.0,
             timeout: float = 60.0) -> LoadResult:
    """``clients`` threads sending ``queries`` round-robin to POST /search until ``seconds`` have passed."""
    result = LoadResult(clients, seconds)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        latencies: dict[str, list[float]] = {}
        errors, samples = 0, []
        with httpx.Client(base_url=base_url, timeout=timeout) as http:
            start.wait()
            i = c
            while time.perf_counter() < stop_at[0]:
                q = queries[i % len(queries)]
                i += 1
                t0 = time.perf_counter()
                try:
                    r = http.post("/search", **q.request())
                    good = r.status_code == 200 and len(r.json().get("hits", [])) > 0
                    problem = None if good else f"{q.kind}: HTTP {r.status_code} {r.text[:200]}"
                except (httpx.HTTPError, ValueError) as e:
                    problem = f"{q.kind}: {type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                if problem is None:
                    latencies.setdefault(q.kind, []).append(dt)
                else:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(problem)
        with lock:
            for kind, v in latencies.items():
                result.latencies.setdefault(kind, []).extend(v)
            result.errors += errors
            result.error_samples.extend(samples[: 5 - len(result.error_samples)])

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + seconds
    start.wait()
    for t in threads:
        t.join(seconds + timeout + 30)
    result.seconds = time.perf_counter() - t_start
    return result


# --------------------------------------------------------------------------- a world to serve


def build_world(folder: Path, products: int = 200, steps: int = 4,
                preset: str = "tiny") -> tuple[Path, Path, Path]:
    """Synthetic catalog -> a model trained a few steps -> embeddings -> flat index.

    Returns (model, index, catalog.csv)."""
    from item_embed.cli import main

    catalog = folder / "catalog"
    run, emb, index = folder / "run", folder / "emb.parquet", folder / "index"
    steps_argv = [
        ["synth", str(catalog), "--products", str(products), "--image-size", "64"],
        ["train", str(catalog / "catalog.csv"), "--out", str(run), "--preset", preset, "--steps", str(steps),
         "--batch-size", "16", "--image-size", "64", "--patch-size", "16", "--precision", "fp32", "--no-progress"],
        ["embed", str(catalog / "catalog.csv"), "--model", str(run), "--out", str(emb), "--no-progress"],
        ["index", str(emb), "--out", str(index)],
    ]
    for argv in steps_argv:
        print("$ item-embed " + " ".join(argv), flush=True)
        if main(argv) != 0:
            raise SystemExit(f"building the world failed at: item-embed {' '.join(argv)}")
    return run, index, catalog / "catalog.csv"


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        m = re.search(r"^Model name:\s*(.+)$", subprocess.run(["lscpu"], capture_output=True, text=True,
                                                              timeout=10).stdout, re.M)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    mem = "?"
    try:
        kib = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}"}


def render(result: LoadResult, info: dict[str, str], setup: dict[str, str], label: str = "") -> str:
    p50, p99 = result.percentiles()
    rows = [("all", result.requests, result.errors, result.throughput, p50, p99)]
    for kind in sorted(result.latencies):
        n = len(result.latencies[kind])
        k50, k99 = result.percentiles(kind)
        rows.append((kind, n, "", n / result.seconds, k50, k99))
    table = ["| queries | requests | errors | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for kind, n, err, rps, a, b in rows:
        table.append(f"| {kind} | {n} | {err} | {rps:.1f} | {a:.1f} | {b:.1f} |")
    lines = [
        "## Service under load (`item-embed serve`, loopback" + (f", {label}" if label else "") + ")",
        "",
        f"**{result.requests} requests, {result.errors} errors, {result.throughput:.1f} req/s, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms** ({result.clients} clients for {result.seconds:.1f} s).",
        "",
        *table,
        "",
        *[f"- {k}: {v}" for k, v in setup.items()],
        f"- Machine: {info['cpu']} ({info['cores']} cores, {info['memory']}, {info['os']}, "
        f"Python {info['python']})",
        "- Clients and service share the machine's cores (the client threads are in the benchmark process); "
        "latency is measured by the client, from sending the request to the parsed response.",
    ]
    if result.error_samples:
        lines += ["", "Errors (first few):", *[f"- `{e}`" for e in result.error_samples]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--model", help="run folder (default: build a tiny one on the synthetic catalog)")
    p.add_argument("--index", help="index folder built by --model")
    p.add_argument("--preset", choices=["tiny", "minilm"], default="tiny",
                   help="model built when no --model is given (minilm: the real encoder size, slower)")
    p.add_argument("--catalog", help="catalog CSV to draw query titles and images from (default: the index's)")
    p.add_argument("--threads", type=int, default=2, help="serve --threads")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown fragment to write ('-': none)")
    p.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    a = p.parse_args(argv)
    if (a.model is None) != (a.index is None):
        p.error("give both --model and --index, or neither")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        if a.model is None:
            model, index, catalog = build_world(Path(tmp), preset=a.preset)
            world = (f"built-in synthetic catalog (`synth --products 200`, 64 px images), {a.preset} preset "
                     "trained 4 steps, flat index")
        else:
            import json

            model, index = Path(a.model), Path(a.index)
            catalog = a.catalog or json.loads((index / "manifest.json").read_text()).get("catalog")
            if not catalog or not str(catalog).endswith(".csv"):
                p.error("give --catalog CATALOG.csv to draw the queries from")
            world = f"model {model}, index {index}"
        queries = queries_from_catalog(catalog)
        load0 = os.getloadavg()
        with Server(model, index, "--threads", str(a.threads), log=Path(tmp) / "serve.log") as server:
            health = server.health()
            for q in queries[:5]:  # warm-up, not counted
                httpx.post(f"{server.base_url}/search", timeout=60, **q.request())
            rss0 = server.rss_kib()
            print(f"service on {server.base_url}: {health['index_size']} products, dim {health['dim']}; "
                  f"{a.clients} clients for {a.seconds:g} s ...", flush=True)
            result = run_load(server.base_url, queries, a.clients, a.seconds)
            rss1, peak = server.rss_kib(), server.peak_rss_kib()
        load1 = os.getloadavg()

    setup = {
        "Command": "`" + " ".join(["python benchmarks/bench_service_load.py",
                                   *(argv if argv is not None else sys.argv[1:])]) + "`",
        "When": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "Served": f"{world}; {health['index_size']} products, dim {health['dim']}, serve --threads {a.threads}",
        "Queries": f"{len(queries)} catalog rows, cycled: 2/5 title, 2/5 image ({QUERY_IMAGE_PX} px JPEG upload), "
                   "1/5 image+title; k=10",
        "Service memory": f"RSS {rss0 / 1024:.0f} MiB before the load, {rss1 / 1024:.0f} MiB after, "
                          f"peak {peak / 1024:.0f} MiB",
        "Load average (1/5/15 min)": f"{'/'.join(f'{x:.2f}' for x in load0)} at the start, "
                                     f"{'/'.join(f'{x:.2f}' for x in load1)} at the end (other users share "
                                     "this machine)",
    }
    label = f"{a.preset} model" if a.model is None else f"model {Path(a.model).name}"
    text = render(result, machine(), setup, f"{label}, {a.clients} clients")
    print(text)
    if a.out != "-":
        out = Path(a.out)
        if a.append and out.exists():
            text = out.read_text().rstrip("\n") + "\n\n" + text
        out.write_text(text)
        print(f"results: {a.out}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
