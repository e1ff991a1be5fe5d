"""Subcommands ``evaluate`` (metrics of an embedding file, or the whole harness: ITEm and the baselines
side by side on one catalog) and ``report`` (one self-contained HTML page of the results)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..data.catalog import CatalogError
from .common import (add_catalog_args, add_command, add_device_arg, add_precision_arg, format_table,
                     open_catalog)


def cmd_evaluate(a: argparse.Namespace) -> int:
    """Two forms: metrics of an embedding file (``evaluate EMB.parquet``), or the full harness on a
    catalog (``evaluate CATALOG --model RUN`` and/or ``--baselines``/``--featurizer``)."""
    if a.model or a.baselines or a.featurizer:
        return _evaluate_catalog(a)
    if a.out_dir or a.modes:
        raise ValueError("--out-dir and --modes need the catalog form: evaluate CATALOG --model RUN_DIR "
                         "and/or --baselines")
    from ..embeddings import read_embeddings
    from ..evaluate.metrics import knn_classify, retrieval_metrics, split_test_mask

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
                        ("--probe-modes", a.probe_modes if a.probe_modes != "joint" else None),
                        ("--precision", a.precision if a.precision != "auto" else None),
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
    from ..data.catalog import CatalogReport
    from ..evaluate.baselines import make_baselines
    from ..evaluate.featurizers import MODES, EncoderFeaturizer, RawProducts, load_featurizer
    from ..evaluate.harness import evaluate_all, results_json, results_markdown, results_text

    t0 = time.perf_counter()
    catalog = open_catalog(a)
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
        featurizers.append(EncoderFeaturizer.from_pretrained(a.model, "item", a.device, a.batch_size, progress,
                                                             a.precision))
    featurizers += [load_featurizer(spec, a.device, a.batch_size, progress, a.precision) for spec in a.featurizer or []]
    featurizers += make_baselines(_csv(a.baselines), a.batch_size, a.device)
    names = [f.name for f in featurizers]
    if len(set(names)) != len(names):
        raise ValueError(f"two features share a name: {', '.join(names)}")
    report = CatalogReport()
    products = RawProducts.from_catalog(catalog, strict=a.strict, report=report)
    print(report.summary())
    results = evaluate_all(products, featurizers, a.group, labels, modes, a.k,
                           diagnostics_of="item" if a.model else None, log=print, probe_modes=_csv(a.probe_modes))
    results["catalog"] = str(a.catalog)
    results["model"] = str(a.model) if a.model else None
    results["commands"] = [_evaluate_command(a)]
    results["precision"] = {f.name: f.precision for f in featurizers if getattr(f, "precision", None)}
    print(results_text(results))
    if a.out_dir:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(results_json(results))
        (out / "results.md").write_text(results_markdown(results))
        print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    if a.out:
        Path(a.out).write_text(results_json(results))
    if a.model:
        _record_in_run(Path(a.model), results_json(results))
    print(f"evaluated {len(products)} products in {time.perf_counter() - t0:.1f}s")
    return 0


def _record_in_run(run: Path, results: str) -> None:
    """Keep the results in the run folder (evaluation.json) and write its model card again with them;
    a run folder that cannot be written (read-only) is left as it is."""
    from ..model_card import record_evaluation

    try:
        print(f"model card: {record_evaluation(run, json.loads(results))}")
    except Exception as e:  # noqa: BLE001 - the card is a by-product
        print(f"warning: the evaluation was not recorded in {run} ({type(e).__name__}: {e})")


def cmd_report(a: argparse.Namespace) -> int:
    from ..evaluate.report import build_report

    modes = [m for m in (a.query_modes or "").split(",") if m] or None
    t0 = time.perf_counter()
    path = build_report(a.results, a.embeddings, a.out, catalog=a.catalog, image_root=a.image_root,
                        color_by=a.color_by, group=a.group, examples=a.examples, top_k=a.top_k, model=a.model,
                        query_modes=modes, primary=a.primary, sample=a.sample, seed=a.seed,
                        id_column=a.id_column, image_column=a.image_column)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    v = add_command(
        sub, "evaluate", "same-product retrieval and category prediction, ITEm and baselines side by side",
        description="evaluate EMB.parquet [--group COL] [--labels a,b]: metrics of an embedding file. "
                    "evaluate CATALOG --model RUN_DIR [--baselines ...] [--out-dir DIR]: embed the catalog "
                    "in each query mode with ITEm and each baseline, run every protocol on the same split.")
    add_catalog_args(v, "the catalog, or in the first form an embedding .parquet")
    v.add_argument("--group", help="same-product group column (retrieval; also the split key)")
    v.add_argument("--labels", help="comma-separated label columns (category prediction)")
    v.add_argument("-k", type=int, default=10, help="neighbours for kNN")
    v.add_argument("--out", help="write the metrics as JSON")
    v.add_argument("--model", help="ITEm run folder: evaluate it on CATALOG")
    v.add_argument("--baselines", help="comma-separated: tfidf,minilm,minilm_title,pixels16,phash,fusion,hog,fusion_hog")
    v.add_argument("--featurizer", action="append", metavar="KIND:DIR",
                   help="another model to compare: item:RUN_DIR, item-cls:RUN_DIR (its [CLS] alone, without the "
                        "shape slice) or dual:DIR (repeatable)")
    v.add_argument("--modes", help="retrieval query modes (default joint,image,title,image2image,title2image; "
                                   "without --group only title2image, whose products are their own groups)")
    v.add_argument("--probe-modes", default="joint",
                   help="embeddings the category probes read: joint (the whole product), image (the photo "
                        "alone), or both, comma-separated")
    v.add_argument("--out-dir", help="write results.json and results.md here")
    v.add_argument("--batch-size", type=int, default=64, help="products per forward pass")
    add_precision_arg(v)
    add_device_arg(v)
    v.set_defaults(func=cmd_evaluate)

    r = add_command(sub, "report", "one self-contained HTML report: tables, baselines, map, examples")
    r.add_argument("results", help="results.json from `item-embed evaluate`")
    r.add_argument("--embeddings", required=True, help="embedding .parquet of the primary model (`item-embed embed`)")
    r.add_argument("--catalog", help="catalog file for the pictures (default: the one recorded in the embeddings)")
    r.add_argument("--image-root", help="folder that relative image paths start from (default: the catalog's)")
    r.add_argument("--id-column", default="id", help="column of the product id in the catalog")
    r.add_argument("--image-column", default="image", help="column of the image in the catalog")
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
    r.add_argument("--seed", type=int, default=0, help="seed of the example queries and the map sample")
    r.set_defaults(func=cmd_report)
