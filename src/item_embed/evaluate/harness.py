"""The evaluation harness: every protocol for ITEm and the baselines side by side, on the same
products and the same split, as one ``results.json`` document (schema in :func:`evaluate_all`).

Query modes: ``joint`` (everything the product has), ``image`` (image only), ``title`` (title
only), each against the gallery embedded with everything; ``image2image`` embeds both sides from
the image alone. Category prediction: linear probe and kNN on the reference 80/20 split.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .featurizers import MODES, PROBE_MODES, Featurizer, RawProducts, missing
from .metrics import (cross_modal_metrics, group_codes, knn_classify, linear_probe, retrieval_metrics,
                      split_test_mask)

def group_keys(products: RawProducts, group: str) -> np.ndarray:
    """Group per product; a product without one is its own singleton (a distractor)."""
    values = products.frame[group].tolist()
    return np.array([f"\x00{pid}" if missing(v) else str(v) for v, pid in zip(values, products.ids)], dtype=object)


def split_keys(products: RawProducts, group: str | None) -> np.ndarray:
    """Keys of the reference split: the group, or the id where there is no group."""
    if group is None:
        return np.asarray(products.ids, dtype=object)
    values = products.frame[group].tolist()
    return np.array([pid if missing(v) else str(v) for v, pid in zip(values, products.ids)], dtype=object)


def _floats(metrics: dict) -> dict:
    return {k: (int(v) if k in ("queries", "test") else float(v)) for k, v in metrics.items()}


def evaluate_featurizer(featurizer: Featurizer, products: RawProducts, group: str | None = None,
                        labels: Sequence[str] = (), modes: Sequence[str] = MODES, k: int = 10,
                        test_mask: np.ndarray | None = None, probe_modes: Sequence[str] = ("joint",)) -> dict:
    """Every protocol for one featurizer: ``{"retrieval": {MODE: metrics}, "probe": {LABEL:
    {"linear": .., "knn": ..}}}``; a probe on photo-only embeddings is ``"LABEL (image)"``.

    Same-product retrieval needs ``group``; queries are the products of groups with >= 2 members that
    have the mode's input (an image for image/image2image, a title for title). The gallery is the
    joint embedding of every product (image2image: the image embedding). ``title2image`` asks with each
    product's title alone for photos alone (every product with a photo; relevant: the same group, or
    without groups the product itself) and needs no group. A mode the featurizer cannot embed, or an
    image mode for one that reads no images, is left out.
    """
    unknown = (set(modes) - set(MODES)) | (set(probe_modes) - set(PROBE_MODES))
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(sorted(unknown))} (retrieval: {', '.join(MODES)}; "
                         f"probes: {', '.join(PROBE_MODES)})")
    joint = featurizer.embed(products, "joint")
    if joint is None:
        raise ValueError(f"featurizer {featurizer.name} cannot embed products in joint mode")
    result: dict[str, dict] = {"retrieval": {}, "probe": {}}
    groups = group_keys(products, group) if group is not None else None
    for mode in modes:
        if mode == "title2image":
            metrics = _title2image(featurizer, products, groups)
            if metrics is not None:
                result["retrieval"][mode] = metrics
        elif groups is not None:
            metrics = _same_product(featurizer, products, groups, joint, mode)
            if metrics is not None:
                result["retrieval"][mode] = metrics
    if labels:
        test = split_test_mask(split_keys(products, group)) if test_mask is None else test_mask
        for probe_mode in probe_modes:
            emb, rows = joint, np.arange(len(products))
            if probe_mode == "image":
                if "image" not in featurizer.modalities or (emb := featurizer.embed(products, "image")) is None:
                    continue
                rows = np.flatnonzero(products.has_image)
            for col in labels:
                if col not in products.frame:
                    raise KeyError(f"no label column {col!r}")
                values = products.frame[col].to_numpy()[rows]
                key = col if probe_mode == "joint" else f"{col} ({probe_mode})"
                result["probe"][key] = {"linear": _floats(linear_probe(emb[rows], values, test[rows])),
                                        "knn": _floats(knn_classify(emb[rows], values, test[rows], k=k))}
    return result


def _same_product(featurizer: Featurizer, products: RawProducts, groups: np.ndarray, joint: np.ndarray,
                  mode: str) -> dict | None:
    """Same-product retrieval in ``mode`` (joint, image, title, image2image), or None when not embeddable."""
    if mode == "image2image" and "image" not in featurizer.modalities:
        return None
    queries = joint if mode == "joint" else featurizer.embed(products, "image" if mode == "image2image" else mode)
    if queries is None:
        return None
    codes = group_codes(groups)
    candidates = np.bincount(codes)[codes] >= 2
    has = {"joint": np.ones(len(products), bool), "image": products.has_image, "title": products.has_title,
           "image2image": products.has_image}
    gallery = queries if mode == "image2image" else joint
    rows = np.flatnonzero(candidates & has[mode])
    return _floats(retrieval_metrics(queries[rows], gallery, groups, query_rows=rows))


def _title2image(featurizer: Featurizer, products: RawProducts, groups: np.ndarray | None) -> dict | None:
    """Title-only queries against the photo-only embeddings of every product with a photo."""
    if "image" not in featurizer.modalities or "text" not in featurizer.modalities:
        return None
    titles, photos = featurizer.embed(products, "title"), featurizer.embed(products, "image")
    if titles is None or photos is None:
        return None
    keys = groups if groups is not None else np.asarray(products.ids, dtype=object)
    queries = np.flatnonzero(products.has_title & products.has_image)
    gallery = np.flatnonzero(products.has_image)
    return _floats(cross_modal_metrics(titles[queries], photos[gallery], keys[queries], keys[gallery]))


def evaluate_all(products: RawProducts, featurizers: Iterable[Featurizer], group: str | None = None,
                 labels: Sequence[str] = (), modes: Sequence[str] = MODES, k: int = 10,
                 diagnostics_of: str | None = None, log: Callable[[str], None] | None = None,
                 probe_modes: Sequence[str] = ("joint",)) -> dict:
    """Run every protocol for each featurizer on the same products and the same split.

    Returns the ``results.json`` document (the HTML report reads it; keep it stable)::

        {"catalog": str, "model": str | None,            # filled in by the caller
         "n_products": int,
         "features": {NAME: {"retrieval": {MODE: {"R@1", "R@10", "MAP@R" (title2image: "MRR"), "queries"}},
                             "probe": {LABEL: {"linear": {"accuracy", "macro_f1", "test"},
                                               "knn": {"accuracy", "macro_f1", "test"}}}}},
         "diagnostics": {"cls_attention_image", "cls_attention_text",
                         "cos_joint_image", "cos_joint_title"} | None,
         "commands": [str], "seconds": {NAME: float},
         "precision": {NAME: "bf16" | "fp32"}}            # learned models' precision, filled in by the caller

    ``diagnostics`` come from the featurizer named ``diagnostics_of`` (ITEm), None without one;
    every ITEm featurizer also gets ``features[NAME]["diagnostics"]``.
    ``seconds`` per feature include its fit and embedding passes (fusion reuses minilm's and
    pixels16's cached passes, so its time is only the rest).
    """
    log = log or (lambda _msg: None)
    test = split_test_mask(split_keys(products, group)) if labels else None
    out: dict[str, Any] = {"catalog": None, "model": None, "n_products": len(products), "features": {},
                           "diagnostics": None, "commands": [], "seconds": {}}
    for f in featurizers:
        t0 = time.perf_counter()
        log(f"{f.name}: embedding and evaluating")
        if hasattr(f, "fit"):
            f.fit(products)
        out["features"][f.name] = evaluate_featurizer(f, products, group, labels, modes, k, test, probe_modes)
        if getattr(f, "_item_model", None) is not None:  # every ITEm model gets its own
            out["features"][f.name]["diagnostics"] = f.diagnostics(products)
        if f.name == diagnostics_of and hasattr(f, "diagnostics"):
            out["diagnostics"] = out["features"][f.name].get("diagnostics") or f.diagnostics(products)
        out["seconds"][f.name] = round(time.perf_counter() - t0, 2)
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def results_json(results: dict) -> str:
    """The results document as strict JSON: NaN (a metric that could not be computed) -> null."""
    import json

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and not np.isfinite(x):
            return None
        return x

    return json.dumps(clean(results), indent=2, allow_nan=False)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def results_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The results document as (title, headers, rows) tables: retrieval, probes, diagnostics."""
    feats = results.get("features", {})
    tables = []
    rows = [[name, mode, _fmt(m.get("R@1")), _fmt(m.get("R@10")), _fmt(m.get("MAP@R", m.get("MRR"))),
             _fmt(m.get("queries"))]
            for name, f in feats.items() for mode, m in f.get("retrieval", {}).items()]
    if rows:
        tables.append(("Same-product retrieval", ["features", "query mode", "R@1", "R@10", "MAP@R (MRR)", "queries"],
                       rows))
    rows = [[name, label, _fmt(p["linear"]["accuracy"]), _fmt(p["linear"]["macro_f1"]),
             _fmt(p["knn"]["accuracy"]), _fmt(p["knn"]["macro_f1"])]
            for name, f in feats.items() for label, p in f.get("probe", {}).items()]
    if rows:
        tables.append(("Category prediction (test fold)", ["features", "label", "linear acc", "linear macro-F1",
                                                           "kNN acc", "kNN macro-F1"], rows))
    diag = {name: f["diagnostics"] for name, f in feats.items() if f.get("diagnostics")}
    if not diag and results.get("diagnostics"):
        diag = {"item": results["diagnostics"]}
    if diag:
        keys = list(dict.fromkeys(k for d in diag.values() for k in d))
        tables.append(("Modality diagnostics", ["features", *keys],
                       [[name, *(_fmt(d.get(k, float("nan"))) for k in keys)] for name, d in diag.items()]))
    if results.get("seconds"):
        tables.append(("Wall time (s)", ["features", "seconds"],
                       [[k, f"{v:.1f}"] for k, v in results["seconds"].items()]))
    return tables


def results_text(results: dict) -> str:
    """Plain-text tables for the terminal."""
    parts = []
    for title, headers, rows in results_tables(results):
        cells = [headers] + rows
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        parts.append("\n".join([title, line(headers), line(["-" * w for w in widths]), *map(line, rows)]))
    return "\n\n".join(parts)


def results_markdown(results: dict) -> str:
    """The results document as Markdown (results.md)."""
    lines = ["# Evaluation results", "",
             f"- Catalog: `{results.get('catalog')}` ({results.get('n_products')} products)",
             f"- Model: `{results.get('model')}`" if results.get("model")
             else f"- Features: {', '.join(f'`{n}`' for n in results.get('features', {}))}"]
    for cmd in results.get("commands", []):
        lines.append(f"- Command: `{cmd}`")
    for title, headers, rows in results_tables(results):
        lines += ["", f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
