"""Subcommands ``synth`` (the built-in synthetic catalog) and ``demo`` (synth -> train -> embed ->
evaluate -> index on it, printing what the numbers mean)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import embed, evaluate, search, train
from .common import add_command


def cmd_synth(a: argparse.Namespace) -> int:
    from ..data.synthetic import write_catalog

    path = write_catalog(a.out, n_products=a.products, seed=a.seed, image_size=a.image_size, fmt=a.format)
    print(f"built-in catalog: {path}")
    return 0


MEANING = """
What the numbers mean on this synthetic catalog (drawn products: shapes, patterns, colours, 2-4 listings
each that differ by small photo changes and reworded titles; {products} products, {steps} training steps):
- retrieval R@1 / R@10: share of listings whose nearest (top 10) other listing is the same product; MAP@R
  also asks that all of its other listings rank first. Chance is about 1 / (number of products).
- knn:category / colour / pattern: share of held-out listings whose 10 nearest training listings vote for
  the right label. Category and colour are visible in both photo and title; pattern mostly in the photo.
A short demo run reaches R@1 around 0.5 and category accuracy around 0.9 on 2 CPU cores; the real
catalogs need `item-embed train` for longer (see the README's headline table)."""


def cmd_demo(a: argparse.Namespace) -> int:
    """Built-in catalog -> train -> embed -> evaluate -> index, printing the table and what it means."""
    out = Path(a.out)
    catalog, run, emb = out / "catalog", out / "run", out / "embeddings.parquet"
    common = ["--no-progress"] if a.no_progress else []
    steps = [
        ["synth", str(catalog), "--products", str(a.products)],
        ["train", str(catalog / "catalog.csv"), "--out", str(run), "--preset", a.preset, "--steps", str(a.steps),
         "--batch-size", "32", "--image-size", "64", "--patch-size", "16", *common],
        ["embed", str(catalog / "catalog.csv"), "--model", str(run), "--out", str(emb), *common],
        ["evaluate", str(emb), "--group", "group", "--labels", "category,colour,pattern",
         "--out", str(out / "metrics.json")],
        ["index", str(emb), "--out", str(out / "index")],
    ]
    parser = argparse.ArgumentParser(prog="item-embed")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("synth").set_defaults(func=cmd_synth)
    _synth_args(sub.choices["synth"])
    for module in (train, embed, evaluate, search):
        module.register(sub)
    for argv in steps:
        print("\n$ item-embed " + " ".join(argv), flush=True)
        args = parser.parse_args(argv)
        rc = args.func(args)
        if rc:
            return rc
    print(MEANING.format(products=a.products, steps=a.steps))
    print(f"\nsearch page: .venv/bin/item-embed serve --model {run} --index {out / 'index'}"
          "   (then open http://127.0.0.1:8000/)")
    return 0


def _synth_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("out", help="folder for catalog.csv (or .parquet / .jsonl) and its images")
    s.add_argument("--products", type=int, default=120, help="distinct products (each listed 2-4 times)")
    s.add_argument("--seed", type=int, default=0, help="seed of the drawing")
    s.add_argument("--image-size", type=int, default=64, help="side of the photos in pixels")
    s.add_argument("--format", choices=["csv", "parquet", "jsonl"], default="csv", help="catalog file format")


def register(sub: argparse._SubParsersAction) -> None:
    s = add_command(sub, "synth", "write the built-in synthetic catalog")
    _synth_args(s)
    s.set_defaults(func=cmd_synth)

    d = add_command(sub, "demo", "built-in catalog: train, embed, evaluate, index")
    d.add_argument("--out", default="demo-output", help="output folder")
    d.add_argument("--preset", default="minilm", choices=["minilm", "tiny"], help="model preset (as in train)")
    d.add_argument("--steps", type=int, default=150, help="training steps")
    d.add_argument("--products", type=int, default=160, help="distinct products in the catalog")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
