"""Command-line interface: a thin layer over the library (one function per subcommand)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .catalog import Catalog, CatalogError, CatalogReport, Columns
from .checkpoint import CheckpointError
from .config import (IMAGE_STEMS, PRESETS, RECIPE_IMAGE_STEM, ObjectiveConfig, TrainConfig, model_config_for,
                     parse_loss_weights)


def _add_catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("catalog", help="catalog file: .csv, .tsv, .jsonl or .parquet, one product per row")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the catalog's folder)")
    p.add_argument("--id-column", default="id")
    p.add_argument("--title-column", default="title")
    p.add_argument("--image-column", default="image")
    p.add_argument("--description-column", default="description")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision`` of the commands that encode products (ItemEncoder's precision)."""
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto (default): bf16 on AMX / AVX512-BF16 CPUs and bf16 GPUs, else fp32")


def _open_catalog(a: argparse.Namespace) -> Catalog:
    cols = Columns(id=a.id_column, title=a.title_column, image=a.image_column, description=a.description_column)
    return Catalog.open(a.catalog, cols, a.image_root)


def _finish_report(report: CatalogReport, out_dir: Path, name: str) -> None:
    report.check_accounting()
    path = report.write(out_dir / name)
    print(report.summary())
    print(f"row report: {path}")


def _model_config(a: argparse.Namespace, cache_meta: dict | None = None):
    """The model config from --preset and the shape options (a cache's preprocessing fills gaps)."""
    from .model import minilm_model_config

    shape_dims = getattr(a, "shape_dims", None)
    shape = dict(image_size=a.image_size, patch_size=getattr(a, "patch_size", None), max_text_len=a.max_text_len,
                 use_description=a.use_description or None, pooling=getattr(a, "pooling", None),
                 image_stem=getattr(a, "image_stem", None),
                 shape_dims=PRESETS[a.preset].get("shape_dims", 0) if shape_dims is None else shape_dims,
                 shape_weight=getattr(a, "shape_weight", None))
    if cache_meta:
        for key in ("image_size", "max_text_len", "use_description"):
            if shape[key] is not None and shape[key] != cache_meta[key]:
                raise ValueError(f"the cache was prepared with {key}={cache_meta[key]}, not {shape[key]}: "
                                 "run `item-embed prepare` again with that setting")
            shape[key] = cache_meta[key]
    if a.preset == "minilm":
        return minilm_model_config(**{k: v for k, v in shape.items() if v is not None})
    return model_config_for(a.preset, **shape)


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def load_training_data(a: argparse.Namespace, tokenizer):
    """(ProductArrays, ModelConfig, row report or None) from a preprocessing cache or a catalog file."""
    from .data import ProductArrays, is_cache, load_cache

    t0 = time.perf_counter()
    if is_cache(a.catalog):
        data, meta = load_cache(a.catalog)
        if _is_main_rank():
            print(f"using the preprocessing cache {a.catalog}: {len(data)} products "
                  f"(its row report: {Path(a.catalog) / 'catalog_report.json'})")
        return data, _model_config(a, meta), None
    cfg = _model_config(a)
    report = CatalogReport()
    products = _open_catalog(a).load_all(cfg.image_size, use_description=cfg.use_description,
                                         strict=a.strict, report=report)
    data = ProductArrays.build(products, tokenizer, cfg.max_text_len, cfg.image_size)
    if _is_main_rank():
        print(f"prepared {len(data)} products in {time.perf_counter() - t0:.1f}s")
    return data, cfg, report


def cmd_train(a: argparse.Namespace) -> int:
    from .data import load_tokenizer
    from .train import train

    weights = parse_loss_weights(a.loss_weights) if a.loss_weights else {}
    objectives = ObjectiveConfig(**weights, mlm_prob=a.mlm_prob, mim_ratio=a.mim_ratio, mim_target=a.mim_target,
                                 itm_negative_ratio=a.itm_negatives, title_dropout=a.title_dropout,
                                 title_dropout_mim=a.title_dropout_mim,
                                 image_contrastive_proj=a.image_contrastive_proj,
                                 contrastive_views=a.contrastive_views,
                                 contrastive_stop_grad=not a.contrastive_both_ways,
                                 contrastive_dims=a.contrastive_dims)
    tcfg = TrainConfig(steps=a.steps, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                       precision=a.precision, save_every=a.save_every, objectives=objectives,
                       warmup_ratio=a.warmup_ratio, grad_accum=a.grad_accum, compile=a.compile,
                       new_lr_scale=a.new_lr_scale, itm_first=a.itm_first)
    out = Path(a.out)
    tokenizer = load_tokenizer()
    data, cfg, report = load_training_data(a, tokenizer)
    result = train(data, tokenizer, out, cfg, tcfg, resume=a.resume, progress=not a.no_progress,
                   device=a.device, extra={"catalog": str(a.catalog)})
    if not _is_main_rank():
        return 0
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.samples_per_second:.1f} samples/s); "
          "last losses: " + ", ".join(f"{k}={v:.4f}" for k, v in result.last.items()))
    print(f"model: {out}")
    if report is not None:
        _finish_report(report, out, "catalog_report.json")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from .data import load_tokenizer, write_cache

    cfg = _model_config(a)
    report = CatalogReport()
    t0 = time.perf_counter()
    chunks = _open_catalog(a).iter_chunks(cfg.image_size, use_description=cfg.use_description, strict=a.strict,
                                          report=report)
    n = write_cache(chunks, a.out, load_tokenizer(), cfg.image_size, cfg.max_text_len,
                    extra={"use_description": cfg.use_description, "catalog": str(Path(a.catalog).resolve())})
    print(f"cached {n} products at {cfg.image_size}px, {cfg.max_text_len} tokens in "
          f"{time.perf_counter() - t0:.1f}s -> {a.out}")
    _finish_report(report, Path(a.out), "catalog_report.json")
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from .encode import ItemEncoder
    from .export import embed_catalog, embed_catalog_distributed

    from .train import setup_distributed

    ranks, device = setup_distributed(a.device)
    encoder = ItemEncoder.from_pretrained(a.model, device=str(device), precision=a.precision)
    catalog = _open_catalog(a)
    out = Path(a.out)
    t0 = time.perf_counter()
    if ranks.world > 1:
        # Under torchrun: each rank embeds its share into OUT/part-RANK.parquet; rank 0 writes the manifest.
        report = embed_catalog_distributed(catalog, encoder, out, ranks.rank, ranks.world, a.batch_size, a.strict,
                                           progress=not a.no_progress)
        if not ranks.main:
            return 0
        n, report_path = report.used, out / "report.json"
    else:
        report = CatalogReport()
        n = embed_catalog(catalog, encoder, out, batch_size=a.batch_size, strict=a.strict, report=report,
                          progress=not a.no_progress)
        report_path = out.parent / (out.stem + ".report.json")
    dt = time.perf_counter() - t0
    print(f"embedded {n} products in {dt:.1f}s ({n / max(dt, 1e-9):.1f}/s) -> {out}")
    _finish_report(report, report_path.parent, report_path.name)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    """Two forms: metrics of an embedding file (``evaluate EMB.parquet``), or the full harness on a
    catalog (``evaluate CATALOG --model RUN`` and/or ``--baselines``/``--featurizer``)."""
    if a.model or a.baselines or a.featurizer:
        return _evaluate_catalog(a)
    if a.out_dir or a.modes:
        raise ValueError("--out-dir and --modes need the catalog form: evaluate CATALOG --model RUN_DIR "
                         "and/or --baselines")
    from .evaluate import knn_classify, retrieval_metrics, split_test_mask
    from .export import read_embeddings

    path = a.catalog
    frame, emb = read_embeddings(path)
    results: dict[str, dict] = {}
    if a.group:
        if a.group not in frame:
            raise CatalogError(f"{path} has no column {a.group!r}")
        results["retrieval"] = retrieval_metrics(emb, emb, frame[a.group].to_numpy())
    labels = [c for c in (a.labels or "").split(",") if c]
    split_key = frame[a.group] if a.group else frame["id"]
    test = split_test_mask(split_key.to_numpy())
    for col in labels:
        if col not in frame:
            raise CatalogError(f"{path} has no label column {col!r}")
        results[f"knn:{col}"] = knn_classify(emb, frame[col].to_numpy(), test, k=a.k)
    print(format_table(results))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
        print(f"metrics: {a.out}")
    return 0


def _csv(value: str | None) -> list[str]:
    return [c.strip() for c in (value or "").split(",") if c.strip()]


def _evaluate_command(a: argparse.Namespace) -> str:
    """The full-form command line that reproduces this evaluation (recorded in results.json)."""
    import shlex

    argv = ["item-embed", "evaluate", str(a.catalog)]
    for flag, value in (("--model", a.model), ("--group", a.group), ("--labels", a.labels),
                        ("--baselines", a.baselines), ("--modes", a.modes), ("-k", a.k if a.k != 10 else None),
                        ("--image-root", a.image_root), ("--out-dir", a.out_dir)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, value, default in (("--id-column", a.id_column, "id"), ("--title-column", a.title_column, "title"),
                                 ("--image-column", a.image_column, "image"),
                                 ("--description-column", a.description_column, "description")):
        if value != default:
            argv += [flag, value]
    for spec in a.featurizer or []:
        argv += ["--featurizer", spec]
    return " ".join(shlex.quote(x) for x in argv)


def _evaluate_catalog(a: argparse.Namespace) -> int:
    """Embed the catalog once per mode with ITEm and each baseline; every protocol; JSON + Markdown."""
    from .baselines import make_baselines
    from .evaluate import MODES, EncoderFeaturizer, RawProducts, evaluate_all, load_featurizer
    from .evaluate import results_json, results_markdown, results_text

    t0 = time.perf_counter()
    catalog = _open_catalog(a)
    labels = _csv(a.labels)
    modes = _csv(a.modes) or list(MODES)
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad_modes)} (use {', '.join(MODES)})")
    for col in ([a.group] if a.group else []) + labels:
        if col not in catalog.frame:
            raise CatalogError(f"{a.catalog} has no column {col!r}")
    progress = not a.no_progress
    featurizers = []
    if a.model:
        featurizers.append(EncoderFeaturizer.from_pretrained(a.model, "item", a.device, a.batch_size, progress))
    featurizers += [load_featurizer(spec, a.device, a.batch_size, progress) for spec in a.featurizer or []]
    featurizers += make_baselines(_csv(a.baselines), a.batch_size, a.device)
    names = [f.name for f in featurizers]
    if len(set(names)) != len(names):
        raise ValueError(f"two features share a name: {', '.join(names)}")
    report = CatalogReport()
    products = RawProducts.from_catalog(catalog, strict=a.strict, report=report)
    print(report.summary())
    results = evaluate_all(products, featurizers, a.group, labels, modes, a.k,
                           diagnostics_of="item" if a.model else None, log=print)
    results["catalog"] = str(a.catalog)
    results["model"] = str(a.model) if a.model else None
    results["commands"] = [_evaluate_command(a)]
    print(results_text(results))
    if a.out_dir:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(results_json(results))
        (out / "results.md").write_text(results_markdown(results))
        print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    if a.out:
        Path(a.out).write_text(results_json(results))
    print(f"evaluated {len(products)} products in {time.perf_counter() - t0:.1f}s")
    return 0


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluation, one column per metric."""
    lines = []
    for name, metrics in results.items():
        cells = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        lines.append(f"{name:<24} " + "  ".join(cells))
    return "\n".join(lines)


def cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import write_catalog

    path = write_catalog(a.out, n_products=a.products, seed=a.seed, image_size=a.image_size, fmt=a.format)
    print(f"built-in catalog: {path}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Built-in catalog -> train -> embed -> evaluate, printing the table."""
    out = Path(a.out)
    catalog = Path(out) / "catalog"
    run = out / "run"
    emb = out / "embeddings.parquet"
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
    for argv in steps:
        print("\n$ item-embed " + " ".join(argv), flush=True)
        rc = main(argv)
        if rc:
            return rc
    print(f"\nsearch page: .venv/bin/item-embed serve --model {run} --index {out / 'index'}"
          "   (then open http://127.0.0.1:8000/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="item-embed", description="ITEm product embeddings from images and titles.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pre-train ITEm on a catalog")
    _add_catalog_args(t)
    t.add_argument("--out", required=True, help="run folder (model, checkpoints, logs)")
    # (CATALOG may also be a cache folder written by `item-embed prepare`.)
    t.add_argument("--preset", default="minilm", choices=["minilm", "tiny"])
    t.add_argument("--steps", type=int, help="optimiser steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--image-size", type=int)
    t.add_argument("--patch-size", type=int)
    t.add_argument("--max-text-len", type=int)
    t.add_argument("--use-description", action="store_true", help="append the description to the title")
    t.add_argument("--pooling", choices=["cls", "mean"])
    t.add_argument("--image-stem", choices=list(IMAGE_STEMS), default=RECIPE_IMAGE_STEM,
                   help="patch pixels -> embeddings: early convolutions with per-pixel channel norm "
                        "(conv_channelnorm, default; conv4_channelnorm starts with a lighter 4x4 stride-4 layer: "
                        "faster to encode, slower to learn at small budgets) or GroupNorm (conv), ITEm's linear "
                        "projection (linear), or "
                        "each patch's HOG through an MLP (hog: colour-free; hog_colour: with its mean colour)")
    t.add_argument("--shape-dims", type=int,
                   help="whitened HOG coordinates of the photo appended to [CLS], fitted on the catalog's photos "
                        "after training: what answers photo-only queries (default 256; tiny preset 32; 0 = none)")
    t.add_argument("--shape-weight", type=float,
                   help="weight of the shape coordinates beside [CLS] (default 0.1: products and title queries "
                        "rank by [CLS]; photo queries rank by shape at any weight)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-ratio", type=float, default=0.05)
    t.add_argument("--itm-first", type=int, default=0, metavar="STEPS",
                   help="optimise image-text matching alone for the first STEPS steps, then every objective "
                        "(a curriculum; default 0)")
    t.add_argument("--new-lr-scale", type=float,
                   help="lr multiplier for what starts from scratch: patch projection, image positions, "
                        "heads (default 10; the MiniLM encoder keeps --lr)")
    t.add_argument("--mlm-prob", type=float, default=0.15)
    t.add_argument("--mim-ratio", type=float, default=0.5)
    t.add_argument("--mim-target", choices=list(ObjectiveConfig.MIM_TARGETS), default=ObjectiveConfig.mim_target,
                   help="what MIM rebuilds: each patch's normalised pixels (pixels, ITEm) or its histograms of "
                        "oriented gradients (hog, as in MaskFeat: shapes and edges, not colour)")
    t.add_argument("--itm-negatives", type=float, default=0.5, help="share of the batch with a swapped image")
    t.add_argument("--loss-weights", help="e.g. itm=1,mlm=1,mim=1,global_mlm=1,global_mim=1,contrastive=1,"
                                          "image_contrastive=1 (0 turns one off; unnamed ones keep their default)")
    t.add_argument("--title-dropout", type=float, default=ObjectiveConfig.title_dropout,
                   help="share of products shown as image only; global MLM rebuilds their titles from [CLS]")
    t.add_argument("--title-dropout-mim", action="store_true",
                   help="title-dropped products also rebuild every patch's MIM target from [CLS] (global MIM)")
    t.add_argument("--image-contrastive-proj", type=int, default=ObjectiveConfig.image_contrastive_proj,
                   help="width of a SimCLR projection MLP for the image_contrastive term (0: none, the term "
                        "works on the product embeddings themselves)")
    t.add_argument("--contrastive-views", default="image",
                   help="reduced views the contrastive term pulls towards the full product: image, title or "
                        "image,title (each costs one extra forward pass)")
    t.add_argument("--contrastive-dims", type=int, default=ObjectiveConfig.contrastive_dims,
                   help="the contrastive term compares only the last N coordinates of the embeddings (0: all), "
                        "meant to give the picture its own part of the full embedding (measured: it does not keep "
                        "joint precision; benchmarks/RESULTS.md)")
    t.add_argument("--contrastive-both-ways", action="store_true",
                   help="let the contrastive term move the full product's embedding too (default: it is the "
                        "fixed target; both ways made [CLS] copy the image in our runs)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in --out")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (per process)")
    t.add_argument("--compile", action="store_true", help="torch.compile the encoder (measure before relying on it)")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("prepare", help="decode, pad and resize every image once into a training cache")
    _add_catalog_args(c)
    c.add_argument("--out", required=True, help="cache folder (give it to `train` in place of the catalog)")
    c.add_argument("--preset", default="minilm", choices=["minilm", "tiny"], help="for default sizes")
    c.add_argument("--image-size", type=int)
    c.add_argument("--max-text-len", type=int)
    c.add_argument("--use-description", action="store_true")
    c.set_defaults(func=cmd_prepare)

    e = sub.add_parser("embed", help="write product embeddings for a catalog")
    _add_catalog_args(e)
    e.add_argument("--model", required=True, help="run folder of a trained model")
    e.add_argument("--out", required=True, help="output .parquet (under torchrun: a folder of parts + manifest.json)")
    e.add_argument("--batch-size", type=int, default=64)
    add_precision_arg(e)
    e.add_argument("--device")
    e.set_defaults(func=cmd_embed)

    v = sub.add_parser(
        "evaluate", help="same-product retrieval and category prediction, ITEm and baselines side by side",
        description="evaluate EMB.parquet [--group COL] [--labels a,b]: metrics of an embedding file. "
                    "evaluate CATALOG --model RUN_DIR [--baselines ...] [--out-dir DIR]: embed the catalog "
                    "in each query mode with ITEm and each baseline, run every protocol on the same split.")
    _add_catalog_args(v)  # CATALOG: the catalog, or in the first form an embedding .parquet
    v.add_argument("--group", help="same-product group column (retrieval; also the split key)")
    v.add_argument("--labels", help="comma-separated label columns (category prediction)")
    v.add_argument("-k", type=int, default=10, help="neighbours for kNN")
    v.add_argument("--out", help="write the metrics as JSON (first form)")
    v.add_argument("--model", help="ITEm run folder: evaluate it on CATALOG")
    v.add_argument("--baselines", help="comma-separated: tfidf,minilm,minilm_title,pixels16,phash,fusion,hog,fusion_hog")
    v.add_argument("--featurizer", action="append", metavar="KIND:DIR",
                   help="another model to compare, item:RUN_DIR or dual:DIR (repeatable)")
    v.add_argument("--modes", help="retrieval query modes (default joint,image,title,image2image)")
    v.add_argument("--out-dir", help="write results.json and results.md here")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    v.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("synth", help="write the built-in synthetic catalog")
    s.add_argument("out")
    s.add_argument("--products", type=int, default=120)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--format", choices=["csv", "parquet", "jsonl"], default="csv")
    s.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="built-in catalog: train, embed, evaluate")
    d.add_argument("--out", default="demo-output")
    d.add_argument("--preset", default="minilm", choices=["minilm", "tiny"])
    d.add_argument("--steps", type=int, default=150)
    d.add_argument("--products", type=int, default=160)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    # Acting on embeddings: each module registers its own subcommands.
    from . import cli_act

    cli_act.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .index import IndexLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CatalogError, CheckpointError, IndexLoadError, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"item-embed {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
