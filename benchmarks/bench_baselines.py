"""Reproduce the baseline numbers of ../shared/docs/BENCHMARKS.md on the real catalogs.

Runs the baselines (``item_embed.evaluate.baselines``) through the evaluation harness
(``item_embed.evaluate.harness.evaluate_all``), exactly as ``item-embed evaluate CATALOG --baselines ...``
does, and writes ``benchmarks/quality_baselines.md``: every reference number next to the one
reproduced (tolerance 0.01), the other protocols measured on the way (query modes, kNN,
macro-F1), the commands and the wall time. Skips with a message when ../shared/data is absent.

    python benchmarks/bench_baselines.py [--catalogs hm-dev,fashion-small] [--out PATH] [--json-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TOLERANCE = 0.01
OUT = C.BENCH_DIR / "quality_baselines.md"

# BENCHMARKS.md, "Baselines measured so far" (2026-11-24).
RETRIEVAL_REFERENCE = {  # hm-dev, (feature, query mode) -> (R@1, R@10, MAP@R)
    ("tfidf", "joint"): (0.997, 1.000, 0.993),
    ("minilm", "joint"): (0.996, 0.999, 0.991),
    ("minilm_title", "joint"): (0.981, 0.995, 0.963),
    ("pixels16", "joint"): (0.125, 0.297, 0.074),
    ("phash", "joint"): (0.094, 0.279, 0.065),
    ("fusion", "joint"): (0.879, 0.958, 0.788),
    ("minilm", "image"): (0.000, 0.003, 0.002),  # image-only queries, blank text
}
PROBE_REFERENCE = {  # (catalog, label) -> {feature: linear-probe accuracy}
    ("hm-dev", "product_type"): {"tfidf": 0.801, "minilm": 0.837, "minilm_title": 0.623, "pixels16": 0.563,
                                 "fusion": 0.841},
    ("hm-dev", "product_group"): {"tfidf": 0.944, "minilm": 0.927, "minilm_title": 0.738, "pixels16": 0.757,
                                  "fusion": 0.930},
    ("fashion-small", "article_type"): {"tfidf": 0.935, "minilm": 0.965, "minilm_title": 0.965, "pixels16": 0.736,
                                        "fusion": 0.967},
    ("fashion-small", "sub_category"): {"tfidf": 0.973, "minilm": 0.988, "minilm_title": 0.988, "pixels16": 0.872,
                                        "fusion": 0.987},
}
SETUP = {  # catalog -> (group column, label columns, baselines, retrieval modes)
    "hm-dev": ("group", ["product_type", "product_group"],
               ["tfidf", "minilm", "minilm_title", "pixels16", "phash", "fusion"],
               ["joint", "image", "title", "image2image"]),
    # No group: probes only. No description either, so minilm(title) is minilm itself.
    "fashion-small": (None, ["article_type", "sub_category"], ["tfidf", "minilm", "pixels16", "fusion"], []),
}
LABELS = {"minilm": "minilm(text)", "minilm_title": "minilm(title only)", "tfidf": "tfidf(text)",
          "fusion": "fusion minilm(text)+pixels16"}


@dataclass
class Row:
    catalog: str
    protocol: str
    feature: str
    metric: str
    reference: float
    got: float

    @property
    def ok(self) -> bool:
        return abs(self.got - self.reference) <= TOLERANCE

    def __str__(self) -> str:
        return f"{self.catalog} {self.protocol} {self.feature} {self.metric}: got {self.got:.3f}, ref {self.reference:.3f}"


def evaluate_catalog(catalog: str, log=print) -> tuple[dict, float]:
    """The harness's results document for one catalog, and its wall time in seconds."""
    from item_embed.data.catalog import Catalog
    from item_embed.evaluate.baselines import make_baselines
    from item_embed.evaluate.featurizers import RawProducts
    from item_embed.evaluate.harness import evaluate_all

    group, labels, baselines, modes = SETUP[catalog]
    path = C.SHARED_DATA / f"{catalog}.parquet"
    t0 = time.perf_counter()
    products = RawProducts.from_catalog(Catalog.open(path))
    results = evaluate_all(products, make_baselines(baselines), group, labels, modes, log=log)
    results["catalog"] = str(path)
    results["commands"] = [cli_command(catalog)]
    return results, time.perf_counter() - t0


def cli_command(catalog: str) -> str:
    group, labels, baselines, modes = SETUP[catalog]
    cmd = f"item-embed evaluate ../shared/data/{catalog}.parquet"
    if group:
        cmd += f" --group {group} --modes {','.join(modes)}"
    return cmd + f" --labels {','.join(labels)} --baselines {','.join(baselines)}"


def compare(catalog: str, results: dict) -> list[Row]:
    """Every reference number of BENCHMARKS.md for ``catalog`` next to the reproduced one."""
    feats = results["features"]
    rows = []
    if catalog == "hm-dev":
        for (feat, mode), ref in RETRIEVAL_REFERENCE.items():
            got = feats[feat]["retrieval"][mode]
            for metric, r in zip(("R@1", "R@10", "MAP@R"), ref):
                rows.append(Row(catalog, f"retrieval, {mode} queries", feat, metric, r, got[metric]))
    for (cat, label), refs in PROBE_REFERENCE.items():
        if cat != catalog:
            continue
        for feat, ref in refs.items():
            # fashion-small has no description: minilm(title) is the same features as minilm(text).
            source = feat if feat in feats else "minilm"
            rows.append(Row(catalog, f"linear probe, {label}", feat, "accuracy", ref,
                            feats[source]["probe"][label]["linear"]["accuracy"]))
    return rows


def reproduce(catalog: str) -> list[Row]:
    results, _ = evaluate_catalog(catalog)
    return compare(catalog, results)


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def render(sections: list[tuple[str, dict, list[Row], float]], context: str) -> str:
    all_rows = [r for _, _, rows, _ in sections for r in rows]
    n_ok = sum(r.ok for r in all_rows)
    lines = [
        "# Baselines of BENCHMARKS.md, reproduced",
        "",
        "Results fragment written by `benchmarks/bench_baselines.py` (not RESULTS.md). Every number of",
        "BENCHMARKS.md's baseline tables next to the one the evaluation harness reproduces on the same",
        f"files; tolerance {TOLERANCE}. Definitions: `src/item_embed/evaluate/baselines.py`; protocols:",
        "`src/item_embed/evaluate/harness.py` and `metrics.py`.",
        "",
        context,
        "",
        f"**{n_ok} of {len(all_rows)} reference numbers reproduced within {TOLERANCE}.**",
        "",
        "Notes: pixels16 is a bilinear resize of the raw photo (aspect not kept) -- bicubic or nearest",
        "resizing, or per-image centring, move its R@1 by up to 0.02. phash has many exact Hamming ties;",
        "they are broken by catalog order (stable sort), which moves R@1 by a few thousandths. The tfidf",
        "linear probe depends on TruncatedSVD's random start (random_state=0 here) by about +-0.01.",
        "fashion-small has no description, so its minilm(title only) column is minilm(text) itself.",
    ]
    for catalog, results, rows, seconds in sections:
        lines += ["", f"## {catalog} ({results['n_products']} products, {seconds:.0f} s wall)", "",
                  f"Equivalent CLI: `{results['commands'][0]}`", ""]
        lines.append(C.markdown_table(
            ["protocol", "features", "metric", "reference", "reproduced", "diff", ""],
            [[r.protocol, LABELS.get(r.feature, r.feature), r.metric, _fmt(r.reference), _fmt(r.got),
              f"{(round(r.got - r.reference, 3) or 0.0):+.3f}", C.verdict(r.ok)] for r in rows]))
        extra = []
        for feat, f in results["features"].items():
            for mode, m in f["retrieval"].items():
                extra.append([LABELS.get(feat, feat), f"retrieval, {mode} queries", _fmt(m["R@1"]), _fmt(m["R@10"]),
                              _fmt(m["MAP@R"]), str(m["queries"])])
        if extra:
            lines += ["", "All retrieval protocols measured (no reference for most; baselines see a missing "
                      "modality as blank input):", ""]
            lines.append(C.markdown_table(["features", "protocol", "R@1", "R@10", "MAP@R", "queries"], extra))
        probes = [[LABELS.get(feat, feat), label, _fmt(p["linear"]["accuracy"]), _fmt(p["linear"]["macro_f1"]),
                   _fmt(p["knn"]["accuracy"]), _fmt(p["knn"]["macro_f1"]), str(p["linear"]["test"])]
                  for feat, f in results["features"].items() for label, p in f["probe"].items()]
        lines += ["", "Category prediction, all measured:", ""]
        lines.append(C.markdown_table(["features", "label", "linear acc", "linear macro-F1", "kNN acc",
                                       "kNN macro-F1", "test"], probes))
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items())
        lines += ["", f"Wall time per feature (fit + embedding + protocols): {secs}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalogs", default="hm-dev,fashion-small")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--json-dir", help="also write each catalog's results.json here")
    a = p.parse_args()
    from item_embed.evaluate.harness import results_json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    catalogs = [c for c in a.catalogs.split(",") if c]
    missing = [c for c in catalogs if not (C.SHARED_DATA / f"{c}.parquet").is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found under {C.SHARED_DATA} (the real catalogs are not here)")
        catalogs = [c for c in catalogs if c not in missing]
        if not catalogs:
            return 0
    load_start = C.loadavg()
    load1, quiet = C.wait_for_quiet()
    t0 = time.perf_counter()
    sections = []
    for catalog in catalogs:
        print(f"== {catalog}", flush=True)
        results, seconds = evaluate_catalog(catalog, log=lambda m: print(f"  {m}", flush=True))
        rows = compare(catalog, results)
        for r in rows:
            print(f"  {'ok  ' if r.ok else 'MISS'} {r}")
        sections.append((catalog, results, rows, seconds))
        if a.json_dir:
            Path(a.json_dir).mkdir(parents=True, exist_ok=True)
            (Path(a.json_dir) / f"{catalog}.results.json").write_text(results_json(results))
    context = C.run_context(load_start, C.loadavg(), quiet, time.perf_counter() - t0)
    Path(a.out).write_text(render(sections, context))
    print(f"wrote {a.out}")
    return 0 if all(r.ok for _, _, rows, _ in sections for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
