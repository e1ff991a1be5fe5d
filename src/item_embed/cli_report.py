"""Subcommands ``train-dual`` (the CLIP-style peer, same budget as ITEm) and ``report`` (HTML)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import _add_catalog_args, _finish_report, load_training_data
from .config import IMAGE_STEMS, TrainConfig


def cmd_train_dual(a: argparse.Namespace) -> int:
    from .data import load_tokenizer
    from .dual import DualConfig, train_dual
    from .train import total_steps

    tokenizer = load_tokenizer()
    data, cfg, report = load_training_data(a, tokenizer)
    steps = a.steps
    if steps is None and a.epochs is not None and a.max_seconds is not None:
        # Both a time and an epoch budget: the epochs' step count caps the run.
        pairs = int((data.has_image & data.has_text).sum())
        steps = total_steps(pairs, TrainConfig(epochs=a.epochs, batch_size=a.batch_size))
    tcfg = TrainConfig(steps=steps, epochs=a.epochs if a.epochs is not None else 1.0, batch_size=a.batch_size,
                       lr=a.lr, seed=a.seed, precision=a.precision, save_every=a.save_every,
                       warmup_ratio=a.warmup_ratio, new_lr_scale=a.new_lr_scale)
    out = Path(a.out)
    result = train_dual(data, tokenizer, out, cfg, tcfg, DualConfig(embed_dim=a.embed_dim), max_seconds=a.max_seconds,
                        resume=a.resume, progress=not a.no_progress, device=a.device,
                        extra={"catalog": str(a.catalog)})
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.samples_per_second:.1f} pairs/s); "
          "last: " + ", ".join(f"{k}={v:.4f}" for k, v in result.last.items()))
    print(f"dual encoder: {out}")
    if report is not None:
        _finish_report(report, out, "catalog_report.json")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import build_report

    modes = [m for m in (a.query_modes or "").split(",") if m] or None
    t0 = time.perf_counter()
    path = build_report(a.results, a.embeddings, a.out, catalog=a.catalog, image_root=a.image_root,
                        color_by=a.color_by, group=a.group, examples=a.examples, top_k=a.top_k, model=a.model,
                        query_modes=modes, primary=a.primary, sample=a.sample, seed=a.seed,
                        id_column=a.id_column, image_column=a.image_column)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-dual", help="train the CLIP-style dual encoder (the peer baseline) on a catalog")
    _add_catalog_args(t)  # CATALOG may also be a cache folder from `item-embed prepare`
    t.add_argument("--out", required=True, help="run folder (model, checkpoints, metrics.jsonl)")
    t.add_argument("--preset", default="minilm", choices=["minilm", "tiny"], help="tower shape, as ITEm's")
    t.add_argument("--steps", type=int, help="optimiser steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, help="epochs over the image+title pairs (default 1)")
    t.add_argument("--max-seconds", type=float,
                   help="training-time budget; the LR schedule follows the clock (with --steps/--epochs: "
                        "whichever ends first)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--image-size", type=int)
    t.add_argument("--patch-size", type=int)
    t.add_argument("--max-text-len", type=int)
    t.add_argument("--use-description", action="store_true", help="append the description to the title")
    t.add_argument("--image-stem", choices=list(IMAGE_STEMS), help="as `item-embed train --image-stem`")
    t.add_argument("--embed-dim", type=int, default=256, help="size of the shared embedding space")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-ratio", type=float, default=0.05)
    t.add_argument("--new-lr-scale", type=float,
                   help="lr multiplier for what starts from scratch (image tower, projections, temperature); "
                        "the MiniLM text tower keeps --lr. Default 1: at 10 (ITEm's default, where only the "
                        "patch projection is new) the 6-layer image tower diverged in our runs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in --out")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.set_defaults(func=cmd_train_dual)

    r = sub.add_parser("report", help="one self-contained HTML report: tables, baselines, map, examples")
    r.add_argument("results", help="results.json from `item-embed evaluate`")
    r.add_argument("--embeddings", required=True, help="embedding .parquet of the primary model (`item-embed embed`)")
    r.add_argument("--catalog", help="catalog file for the pictures (default: the one recorded in the embeddings)")
    r.add_argument("--image-root", help="folder that relative image paths start from (default: the catalog's)")
    r.add_argument("--id-column", default="id")
    r.add_argument("--image-column", default="image")
    r.add_argument("--out", required=True, help="output .html")
    r.add_argument("--color-by", help="label column that colours the map (default: the first probed label)")
    r.add_argument("--group", default="group", help="same-product group column (hit or miss)")
    r.add_argument("--examples", type=int, default=6, help="example queries per mode")
    r.add_argument("--top-k", type=int, default=5, help="results shown per query")
    r.add_argument("--model", help="run that wrote the embeddings (ITEm or dual): adds image-only and "
                                   "title-only example queries")
    r.add_argument("--query-modes", help="comma-separated: joint,image,title (default: all with --model, else joint)")
    r.add_argument("--primary", help="feature the others are compared with (default: the first item* one)")
    r.add_argument("--sample", type=int, default=3000, help="products on the map (t-SNE sample)")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_report)
