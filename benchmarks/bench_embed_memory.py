"""Peak memory of ``item-embed embed`` as the catalog grows (10k vs 100k products).

Builds Parquet catalogs with the images inline by repeating synthetic rows
(``item_embed.data.synthetic.generate_catalog``, 256-px JPEG/PNG listings of ~10 KB, close to real product
photos) under new ids, trains a tiny-preset model for 1 step (``item-embed train --preset tiny
--steps 1``), then runs ``python -m item_embed embed`` once per catalog as a subprocess and reads
that child's peak RSS from ``os.wait4`` (its own rusage, not a cumulative maximum), through a tiny
launcher process so that the benchmark's own memory is not inherited into the number. The target is a
flat peak: 100k within 20% of 10k.

    python benchmarks/bench_embed_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.data.synthetic import generate_catalog  # noqa: E402

TARGET = 1.20


def build_catalog(base: pd.DataFrame, n: int, path: Path) -> Path:
    """``n`` rows cycling through ``base``, each with a new unique id."""
    rows = base.iloc[np.arange(n) % len(base)].reset_index(drop=True)
    rows["id"] = [f"r{i:07d}" for i in range(n)]
    # Unique bytes per row (a tail after the image's end marker, which decoders ignore), so neither
    # Parquet's dictionary encoding nor Arrow's object de-duplication can share repeated images.
    rows["image"] = [img + f"#{i:07d}".encode() for i, img in enumerate(rows["image"])]
    rows.to_parquet(path, index=False)
    return path


def embed_rate(log: Path) -> float:
    """products/s as ``item-embed embed`` itself reports it (start-up and model loading excluded)."""
    m = re.search(r"embedded (\d+) products in ([\d.]+)s", log.read_text())
    return int(m.group(1)) / max(float(m.group(2)), 1e-9) if m else float("nan")


def embed_precision(log: Path) -> str:
    """The precision ``--precision auto`` resolved to, as ``item-embed embed`` reports it."""
    m = re.search(r"embedded \d+ products in [\d.]+s \([^,]*, (\w+)\)", log.read_text())
    return m.group(1) if m else "?"


# A child's ru_maxrss also counts the memory its parent had when it was forked (Linux keeps the
# pre-exec high-water mark), so a big parent would inflate every number. The measured command
# therefore runs under this tiny launcher, and only the launcher's child is measured.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(f"\\nBENCH_MAXRSS_KIB={usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(argv: list[str], log: Path) -> tuple[float, float, int]:
    """Run ``argv`` (under LAUNCHER); returns (peak RSS MiB of that process, wall seconds, exit status)."""
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], stdout=fh, stderr=subprocess.STDOUT,
                            cwd=C.REPO).returncode
        wall = time.perf_counter() - t0
    m = re.findall(r"BENCH_MAXRSS_KIB=(\d+)", log.read_text())
    rss = int(m[-1]) / 1024 if m else float("nan")
    return rss, wall, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1k, 2k and 10k products")
    ap.add_argument("--sizes", help="comma-separated catalog sizes (default 1000,10000,100000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--wait-quiet", type=float, default=None, help="seconds to wait for load < 1.5 (default 180)")
    ap.add_argument("--no-results", action="store_true",
                    help="print only; leave RESULTS.md alone (--quick never writes it)")
    a = ap.parse_args()
    if a.sizes:
        sizes = [int(s) for s in a.sizes.split(",")]
    else:
        sizes = [1000, 2000, 10_000] if a.quick else [1000, 10_000, 100_000]
    small, large = (sizes[-2], sizes[-1])
    wait = a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 180)
    wall0 = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_memory_"))
    try:
        base = generate_catalog(n_products=100, image_size=256)
        img_kb = base["image"].map(len).mean() / 1024
        base.to_parquet(tmp / "train.parquet", index=False)
        python = sys.executable
        print("training a tiny model for 1 step", flush=True)
        rss, wall, rc = run_child([python, "-m", "item_embed", "train", str(tmp / "train.parquet"), "--out",
                                   str(tmp / "run"), "--preset", "tiny", "--steps", "1", "--no-progress"],
                                  tmp / "train.log")
        if rc:
            print((tmp / "train.log").read_text())
            return 1
        catalogs = {n: build_catalog(base, n, tmp / f"catalog-{n}.parquet") for n in sizes}
        _, quiet = C.wait_for_quiet(1.5, wait)
        load_start = C.loadavg()
        results, precision = {}, "?"
        for n in sizes:
            out = tmp / f"emb-{n}.parquet"
            argv = [python, "-m", "item_embed", "embed", str(catalogs[n]), "--model", str(tmp / "run"), "--out",
                    str(out), "--no-progress"]
            rss, wall, rc = run_child(argv, tmp / f"embed-{n}.log")
            if rc:
                print((tmp / f"embed-{n}.log").read_text())
                return 1
            results[n] = (rss, wall, embed_rate(tmp / f"embed-{n}.log"))
            precision = embed_precision(tmp / f"embed-{n}.log")
            print(f"  {n:>7,} products: peak RSS {rss:,.0f} MiB, {wall:.1f} s, {results[n][2]:,.0f} products/s",
                  flush=True)
        # The same catalogs only opened (Catalog.open, what `embed` does first), nothing embedded.
        open_rss = {}
        for n in (small, large):
            code = "import sys; from item_embed.data.catalog import Catalog; Catalog.open(sys.argv[1])"
            open_rss[n], _, rc = run_child([python, "-c", code, str(catalogs[n])], tmp / f"open-{n}.log")
            if rc:
                print((tmp / f"open-{n}.log").read_text())
                return 1
        load_end = C.loadavg()
        # For scale: what the catalog would cost read whole into pandas (what embed did before it streamed).
        frame_mib = {}
        for n in (small, large):
            frame = pd.read_parquet(catalogs[n])
            frame_mib[n] = frame.memory_usage(deep=True).sum() / 2**20
            del frame
        file_mib = {n: catalogs[n].stat().st_size / 2**20 for n in sizes}
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")

    headers = ["products", "catalog file MiB", "peak RSS MiB", "wall s (whole process)",
               "products/s (as reported by embed)"]
    rows = [[f"{n:,}", f"{file_mib[n]:,.0f}", f"{results[n][0]:,.0f}", f"{results[n][1]:.1f}",
             f"{results[n][2]:,.0f}"] for n in sizes]
    ratio = results[large][0] / results[small][0]
    ok = ratio <= TARGET
    print()
    print(C.text_table(headers, rows))
    per_product_kib = (results[large][0] - results[small][0]) * 1024 / (large - small)
    line = (f"peak RSS {large:,} / {small:,} = {ratio:.2f}x (target <= {TARGET:.2f}x, i.e. flat within 20%): "
            f"{'PASS' if ok else 'MISS'}; growth {per_product_kib:.1f} KiB per extra product "
            f"(images ~{img_kb:.1f} KiB each)")
    frame_line = (f"read whole into pandas, the catalog would hold {frame_mib[small]:,.0f} MiB at {small:,} and "
                  f"{frame_mib[large]:,.0f} MiB at {large:,} products; `Catalog.open` reads only the schema "
                  f"(a process that only opens it peaks at {open_rss[small]:,.0f} MiB and {open_rss[large]:,.0f} MiB) "
                  f"and `embed` reads Parquet batch by batch (pyarrow without pre-buffering), then decodes, "
                  f"encodes and writes chunk by chunk: +{results[large][0] - results[small][0]:,.0f} MiB "
                  f"for the whole embed")
    print(line)
    print(frame_line)
    wall = time.perf_counter() - wall0
    if C.leave_results(a):
        return 0
    body = f"""{C.run_context(load_start, load_end, quiet, wall)}
- Catalogs: Parquet, images inline (synthetic listings, 256 px, ~{img_kb:.1f} KiB each), rows repeated under
  new ids. Model: tiny preset trained 1 step. Each size runs `python -m item_embed embed CATALOG --model RUN
  --out OUT --no-progress` (defaults: precision auto, {precision} here; batch 64) as a child process; peak RSS from `os.wait4` in a tiny
  launcher process (a child forked straight from the benchmark would inherit its high-water mark).

{C.markdown_table(headers, rows)}

- Peak RSS {large:,} / {small:,} = **{ratio:.2f}x** (target <= {TARGET:.2f}x): {C.verdict(ok)}.
  Growth {per_product_kib:.1f} KiB per extra product.
- Why flat: {frame_line}.
"""
    C.update_results("bench_embed_memory", "(e) Peak memory of `item-embed embed` vs catalog size", body)
    print(f"\nwrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
