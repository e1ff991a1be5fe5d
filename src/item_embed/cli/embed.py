"""Subcommand ``embed``: a catalog's product embeddings as Parquet, committed part by part so that a
rerun continues after a crash (one process, a torchrun job whose ranks each embed a share, or with
``--engine ray`` a pool of Ray actors)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..embed_parts import PART_ROWS
from .common import add_catalog_args, add_command, add_device_arg, add_precision_arg, finish_report, open_catalog


def cmd_embed(a: argparse.Namespace) -> int:
    if a.engine == "ray":
        return _embed_ray(a)
    if a.ray_address is not None or a.actors is not None:
        raise ValueError("--ray-address and --actors belong to --engine ray")
    from ..data.catalog import CatalogReport
    from ..embeddings import embed_catalog, embed_catalog_distributed, report_beside
    from ..encode import ItemEncoder
    from ..runtime import setup_distributed

    ranks, device = setup_distributed(a.device)
    encoder = ItemEncoder.from_pretrained(a.model, device=str(device), precision=a.precision)
    catalog = open_catalog(a)
    out = Path(a.out)
    t0 = time.perf_counter()
    options = dict(resume=a.resume, part_rows=a.part_rows)
    if ranks.world > 1:
        # Under torchrun: each rank embeds its share into committed parts of the folder OUT; rank 0
        # writes the manifest.
        report = embed_catalog_distributed(catalog, encoder, out, ranks.rank, ranks.world, a.batch_size, a.strict,
                                           progress=not a.no_progress, **options)
        if not ranks.main:
            return 0
        n, report_path = report.used, out / "report.json"
    else:
        report = CatalogReport()
        n = embed_catalog(catalog, encoder, out, batch_size=a.batch_size, strict=a.strict, report=report,
                          progress=not a.no_progress, **options)
        report_path = report_beside(out)
    dt = time.perf_counter() - t0
    print(f"embedded {n} products in {dt:.1f}s ({n / max(dt, 1e-9):.1f}/s, {encoder.precision}) -> {out}")
    finish_report(report, report_path.parent, report_path.name)
    return 0


def _embed_ray(a: argparse.Namespace) -> int:
    """``--engine ray``: a pool of Ray actors (local Ray, or the cluster at --ray-address) encodes."""
    import os

    from ..data.catalog import CatalogReport
    from ..embed_ray import embed_catalog_ray
    from ..embeddings import report_beside

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--engine ray is one driver process: run it without torchrun")
    catalog = open_catalog(a)
    out = Path(a.out)
    report, stats = CatalogReport(), {}
    t0 = time.perf_counter()
    n = embed_catalog_ray(catalog, a.model, out, batch_size=a.batch_size, strict=a.strict, report=report,
                          progress=not a.no_progress, resume=a.resume, part_rows=a.part_rows, precision=a.precision,
                          device=a.device, address=a.ray_address, actors=a.actors, stats=stats)
    dt = time.perf_counter() - t0
    worked = len({worker for *_, worker in stats.get("chunks", [])})  # the actors that took chunks
    pool = f", {stats['precision']}, {_count(worked, 'Ray actor')} x {_count(stats['threads'], 'thread')}" \
        if worked else ""
    print(f"embedded {n} products in {dt:.1f}s ({n / max(dt, 1e-9):.1f}/s{pool}) -> {out}")
    report_path = report_beside(out)
    finish_report(report, report_path.parent, report_path.name)
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def register(sub: argparse._SubParsersAction) -> None:
    e = add_command(sub, "embed", "write product embeddings for a catalog")
    add_catalog_args(e)
    e.add_argument("--model", required=True, help="run folder of a trained model")
    e.add_argument("--out", required=True,
                   help="output: NAME.parquet is one file (its committed parts wait in NAME.parquet.parts/ until the "
                        "end); any other name is a folder of committed parts + manifest.json (always under torchrun)")
    e.add_argument("--batch-size", type=int, default=64, help="products per forward pass")
    e.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (a rerun of the same command does too); refused when "
                        "there is none or it was made with other settings")
    e.add_argument("--part-rows", type=int, default=PART_ROWS,
                   help="catalog rows per committed part: the most work a crash can cost (rounded up to whole "
                        "chunks of 4 batches)")
    add_precision_arg(e)
    add_device_arg(e)
    r = e.add_argument_group("engine (pip install 'item-embed[ray]' for ray)")
    r.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (or each torchrun rank) encodes; ray: a pool of Ray actors, each "
                        "loading the model once, encodes the catalog's rows, read here; same output and row report")
    r.add_argument("--ray-address",
                   help="with --engine ray: the Ray cluster to join (auto, HOST:PORT, ray://HOST:PORT); the model "
                        "folder and relative image paths must be at the same paths on its nodes (default: start a "
                        "local Ray on this machine, stopped at the end)")
    r.add_argument("--actors", type=int,
                   help="with --engine ray: encoding actors, each with an even share of the cluster's CPUs as its "
                        "threads (default: one per GPU when encoding on GPUs, else one per 4 CPUs)")
    e.set_defaults(func=cmd_embed)
