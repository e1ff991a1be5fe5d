"""``embed --engine ray`` against the single-process ``embed``: products/s on this machine.

The same hm-dev products (2,000 by default, a local Parquet file with the JPEG bytes inline) are
embedded by ``embeddings.embed_catalog`` (one process, the model loaded beforehand) and by
``embed_ray.embed_catalog_ray`` on a local Ray with 2 actors and with 1 actor (each actor one
share of the cores as its threads), interleaved, best of ``--repeats``. On a 2-core machine the
pool cannot show scaling; what it shows is the engine's overhead. Target: Ray with 2 actors at
>= 0.85x the single process in steady state.

Reported separately:
- Ray start-up: ``ray.init`` of a local Ray (once per command);
- pool start-up: from the call to every actor up (started, the model loaded in each): paid once
  per command, whatever the catalog's size;
- steady state: products/s from the pool being up to the last chunk back (the engine's throughput
  on a long catalog), and the whole call (pool start-up included) for this catalog's size;
- on a machine other users load, wall-clock rates favour Ray, whose processes the kernel schedules
  as groups of their own (autogroup), next to the single process's one: quote a quiet run.

    python benchmarks/bench_ray_embed.py [--products 2000] [--model RUN_DIR] [--repeats 2] [--quick] [--no-results]

Without ``--model`` it trains the recipe's model (``--preset minilm``) for 20 steps on these products,
as bench_remote.py does: the compute of a real model, not its quality.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.85


def steady_rate(stats: dict, n: int) -> float:
    """Products/s once the pool is up (every actor started, its model loaded) to the last chunk back."""
    return n / max(stats["chunks"][-1][0] - stats["pool_ready"], 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_embed_options(ap)
    ap.add_argument("--no-results", action="store_true", help="print only; do not update RESULTS.md")
    a = ap.parse_args()
    if a.quick:
        a.products, a.repeats = min(a.products, 400), 1

    import ray

    from item_embed.cli import main as cli
    from item_embed.data.catalog import Catalog, CatalogReport
    from item_embed.embed_ray import embed_catalog_ray
    from item_embed.embeddings import embed_catalog
    from item_embed.encode import ItemEncoder

    load0, t_start = C.loadavg(), time.time()
    print(f"load average at start: {'/'.join(f'{x:.2f}' for x in load0)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        products = pd.read_parquet(C.SHARED_DATA / "hm-dev.parquet").head(a.products)
        catalog = tmp / "products.parquet"
        products.to_parquet(catalog, index=False)
        model = a.model
        if model is None:
            model = str(tmp / "model")
            rc = cli(["train", str(catalog), "--out", model, "--preset", "tiny" if a.quick else "minilm",
                      "--steps", "20", "--batch-size", "16", "--no-progress"])
            assert rc == 0, "training the benchmark model failed"
        encoder = ItemEncoder.from_pretrained(model)
        embed_catalog(Catalog(Catalog.open(catalog).frame.head(128), source="warm-up"), encoder, tmp / "warm",
                      a.batch_size, progress=False)

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024**2, logging_level=logging.ERROR)
        ray_start = time.perf_counter() - t0
        print(f"local Ray started in {ray_start:.1f}s", flush=True)

        def single(out: Path) -> dict:
            report = CatalogReport()
            with C.Interference() as it:
                n = embed_catalog(Catalog.open(catalog), encoder, out, a.batch_size, report=report, progress=False)
            assert n == len(products) and report.reported == 0, report.summary()
            return {"rate": n / it.seconds, "steady": n / it.seconds, "pool": 0.0, "others": it.cores}

        def on_ray(actors: int):
            def run(out: Path) -> dict:
                report, stats = CatalogReport(), {}
                with C.Interference() as it:
                    n = embed_catalog_ray(Catalog.open(catalog), model, out, a.batch_size, report=report,
                                          progress=False, precision=encoder.precision, actors=actors, stats=stats)
                assert n == len(products) and report.reported == 0, report.summary()
                assert len({w for _, _, w in stats["chunks"]}) == actors, "not every actor took chunks"
                return {"rate": n / it.seconds, "steady": steady_rate(stats, n), "pool": stats["pool_ready"],
                        "others": it.cores}
            return run

        systems = {"single process (2 threads)": single, "Ray, 2 actors x 1 thread": on_ray(2),
                   "Ray, 1 actor x 2 threads": on_ray(1)}
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        for r in range(a.repeats):
            for name, fn in systems.items():
                m = fn(tmp / f"out-{r}-{len(runs[name])}-{abs(hash(name))}")
                runs[name].append(m)
                print(f"  {name}: {m['rate']:.1f} products/s whole call, {m['steady']:.1f} steady "
                      f"(pool start-up {m['pool']:.1f}s; others used {m['others']:.2f} cores)", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = C.loadavg()
    print(f"load average at end: {'/'.join(f'{x:.2f}' for x in load1)}")
    base = max(m["steady"] for m in runs["single process (2 threads)"])
    base_whole = max(m["rate"] for m in runs["single process (2 threads)"])
    rows = []
    for name, ms in runs.items():
        steady, whole = max(m["steady"] for m in ms), max(m["rate"] for m in ms)
        pool = min(m["pool"] for m in ms)
        rows.append([name, f"{steady:.1f}", f"{steady / base:.2f}", f"{whole:.1f}", f"{whole / base_whole:.2f}",
                     f"{pool:.1f}", f"{max(m['others'] for m in ms):.2f}"])
    ratio = max(m["steady"] for m in runs["Ray, 2 actors x 1 thread"]) / base
    headers = ["engine", "products/s steady", "x single", "products/s whole call", "x single", "pool start-up s",
               "others' cores (Ray's own processes count here)"]
    print(C.text_table(headers, rows))
    print(f"Ray start-up (ray.init, local): {ray_start:.1f}s; Ray with 2 actors in steady state: {ratio:.2f}x the "
          f"single process (target >= {TARGET})")
    body = "\n".join([
        C.run_context(load0, load1, load0[0] < 1.5, time.time() - t_start),
        (f"- {len(products)} hm-dev products (local Parquet, JPEG bytes inline), batch {a.batch_size}, precision "
         f"{encoder.precision}, model: {a.model or ('20-step ' + ('tiny' if a.quick else 'minilm') + ' preset')}; "
         f"best of {a.repeats} interleaved runs each. Single process: `embeddings.embed_catalog`, model loaded "
         "beforehand. Ray: `embed_ray.embed_catalog_ray` on a local Ray started once "
         f"({ray_start:.1f}s, not in the rates); steady = products/s from the pool being up to the last chunk "
         "back; the whole call includes the pool start-up (actors started, the model loaded in each)"),
        "",
        C.markdown_table(headers, rows),
        "",
        (f"Ray with 2 actors in steady state: **{ratio:.2f}x** the single process (target >= {TARGET}): "
         f"{C.verdict(ratio >= TARGET)}"),
        "",
        ("On a machine other users load, wall-clock rates favour Ray: the kernel schedules its processes "
         "(started by the raylet, in sessions of their own) as groups of their own (autogroup), next to the "
         "single process's one group. Quote a run on a quiet machine."),
    ])
    if a.no_results:
        print("\n" + body)
        return 0
    print(f"updated {C.update_results('bench_ray_embed', 'Ray Data batch embedding (bench_ray_embed.py)', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
