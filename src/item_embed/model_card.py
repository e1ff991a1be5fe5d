"""The model card of a run folder: ``README.md`` in the Hugging Face layout (YAML front matter, then
Markdown), built from the files the run folder already holds.

``train`` writes it when the model is saved; ``evaluate CATALOG --model RUN`` records its results in
``RUN/evaluation.json`` (:func:`record_evaluation`) and writes the card again with the evaluation
tables. The card is rebuilt from the folder each time (never edited in place), so it always matches
the model beside it: evaluations of other weights (the run trained further since) are left out.

Read: ``config.json`` (model, recipe, budget, the catalog and its hash), ``metrics.jsonl`` (the final
losses), ``catalog_report.json`` (row counts; for a run trained from a preprocessing cache, the
cache's own report), ``evaluation.json``. Neither ``README.md`` nor ``evaluation.json`` is part of the
checksummed model (weights and tokenizer files in ``config.json``, checkpoint manifests), so writing
them changes no model id and fails no check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic

CARD = "README.md"
EVALUATION = "evaluation.json"
EVALUATION_FORMAT = "item-embed-evaluation/1"
# metrics.jsonl bookkeeping, not losses
_NOT_LOSSES = ("step", "lr", "grad_norm", "elapsed")
# results.json tables that describe the model (the wall time describes the machine)
_CARD_TABLES = ("Same-product retrieval", "Category prediction (test fold)", "Modality diagnostics")


# ------------------------------------------------------------------ reading the run folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """(the last line of ``metrics.jsonl``, the last value of each key over all lines) — a torn last
    line (a killed run) is skipped."""
    last: dict[str, float] = {}
    latest: dict[str, float] = {}
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return last, latest
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            last = row
            latest.update(row)
    return last, latest


def final_losses(run_dir: str | Path) -> dict[str, float]:
    """The losses and accuracies of the last logged step (``metrics.jsonl``'s last line, without its
    bookkeeping: step, lr, grad_norm, elapsed)."""
    last, _ = read_metrics(run_dir)
    return {k: v for k, v in last.items() if k not in _NOT_LOSSES and isinstance(v, (int, float))}


def training_rows(run_dir: str | Path, config: dict) -> dict | None:
    """The row report of the training data: the run's ``catalog_report.json``, else (a run trained from
    a preprocessing cache) the cache's, with the cache's product count."""
    report = _read_json(Path(run_dir) / "catalog_report.json")
    if isinstance(report, dict):
        return report
    source = config.get("catalog")
    if isinstance(source, str) and (Path(source) / "cache.json").is_file():
        report = _read_json(Path(source) / "catalog_report.json") or {}
        cache = _read_json(Path(source) / "cache.json") or {}
        if "count" in cache:
            report.setdefault("rows_used", cache["count"])
        report.setdefault("source", cache.get("catalog", source))
        return report
    return None


def read_evaluations(run_dir: str | Path) -> list[dict]:
    doc = _read_json(Path(run_dir) / EVALUATION)
    if not isinstance(doc, dict) or not isinstance(doc.get("evaluations"), list):
        return []
    return [e for e in doc["evaluations"] if isinstance(e, dict)]


# ------------------------------------------------------------------ writing


def write_model_card(run_dir: str | Path) -> Path:
    """Build the card from the files in ``run_dir`` and write it to ``run_dir/README.md``."""
    run_dir = Path(run_dir)
    return write_text_atomic(run_dir / CARD, render_model_card(run_dir))


def record_evaluation(run_dir: str | Path, results: dict) -> Path:
    """Keep ``results`` (the ``results.json`` document of ``evaluate --model run_dir``) in
    ``run_dir/evaluation.json`` — one entry per catalog, the newest replacing an older one of the
    same catalog and weights — and write the card again. Returns the card's path."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json") or {}
    entry = {**results, "weights_sha256": config.get("weights_sha256")}
    kept = [e for e in read_evaluations(run_dir)
            if (e.get("catalog"), e.get("weights_sha256")) != (entry.get("catalog"), entry["weights_sha256"])]
    doc = {"format": EVALUATION_FORMAT, "evaluations": kept + [entry]}
    write_text_atomic(run_dir / EVALUATION, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return write_model_card(run_dir)


# ------------------------------------------------------------------ rendering


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows)]


def _front_matter(meta: dict) -> str:
    try:
        import yaml

        body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    except ImportError:  # JSON is YAML too
        body = json.dumps(meta, indent=2) + "\n"
    return f"---\n{body}---\n"


def _current(evaluations: list[dict], config: dict) -> tuple[list[dict], int]:
    """(evaluations of the weights in the folder now, how many of other weights were left out)."""
    weights = config.get("weights_sha256")
    now = [e for e in evaluations if e.get("weights_sha256") == weights]
    return now, len(evaluations) - len(now)


def _own_feature(evaluation: dict) -> tuple[str, dict] | None:
    """The evaluated run's own features in a results document (``item``, the name evaluate --model
    gives them)."""
    feats = evaluation.get("features") or {}
    if "item" in feats:
        return "item", feats["item"]
    return None


def _model_index(name: str, evaluations: list[dict]) -> list[dict] | None:
    """Hugging Face ``model-index``: the run's own retrieval and probe results on each catalog."""
    results = []
    for ev in evaluations:
        own = _own_feature(ev)
        if own is None:
            continue
        _, feats = own
        dataset = {"name": Path(str(ev.get("catalog"))).name, "type": "product-catalog"}
        for mode, m in (feats.get("retrieval") or {}).items():
            metrics = [{"type": t, "value": float(m[k]), "name": f"{mode} {k}"}
                       for k, t in (("R@1", "recall_at_1"), ("R@10", "recall_at_10"), ("MAP@R", "map_at_r"),
                                    ("MRR", "mrr")) if isinstance(m.get(k), (int, float))]
            if metrics:
                results.append({"task": {"type": "feature-extraction", "name": f"Same-product retrieval ({mode})"},
                                "dataset": dict(dataset), "metrics": metrics})
        for label, p in (feats.get("probe") or {}).items():
            metrics = [{"type": t, "value": float(p[probe][k]), "name": f"{probe} {k}"}
                       for probe in ("linear", "knn") if isinstance(p.get(probe), dict)
                       for k, t in (("accuracy", "accuracy"), ("macro_f1", "f1"))
                       if isinstance(p[probe].get(k), (int, float))]
            if metrics:
                results.append({"task": {"type": "text-classification", "name": f"Category prediction ({label})"},
                                "dataset": dict(dataset), "metrics": metrics})
    return [{"name": name, "results": results}] if results else None


def _evaluation_section(evaluations: list[dict], stale: int, dual: bool = False) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluations and dual:
        lines += ["`item-embed evaluate CATALOG --featurizer dual:RUN --group GROUP_COLUMN` measures it beside "
                  "ITEm (`--model`); its tables go to `--out-dir`, not into this card.", ""]
    elif not evaluations:
        lines += ["Not evaluated yet. `item-embed evaluate CATALOG --model RUN --group GROUP_COLUMN --labels "
                  "LABEL_COLUMN --baselines tfidf,minilm` measures it (same-product retrieval, category probes, "
                  "beside baselines) and adds the tables here.", ""]
    from .evaluate.harness import results_tables

    for ev in evaluations:
        lines += [f"### {Path(str(ev.get('catalog'))).name}", "",
                  f"- Catalog: `{ev.get('catalog')}` ({ev.get('n_products')} products)"]
        lines += [f"- Command: `{c}`" for c in ev.get("commands") or []]
        if ev.get("precision"):
            lines.append("- Precision: " + ", ".join(f"{k} {v}" for k, v in ev["precision"].items()))
        for title, headers, rows in results_tables(ev):
            if title in _CARD_TABLES:
                lines += ["", f"#### {title}", "", *_table(headers, rows)]
        lines.append("")
    if stale:
        lines += [f"({stale} evaluation(s) of earlier weights of this run are kept in `{EVALUATION}` and not shown.)",
                  ""]
    return lines


def render_model_card(run_dir: str | Path) -> str:
    """The card of ``run_dir`` as text (front matter + Markdown)."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{run_dir} has no readable config.json: not a model folder")
    name = run_dir.resolve().name
    where = f"runs/{name}"  # how the snippets name the folder
    model = config.get("model") or {}
    train = config.get("train") or {}
    objectives = config.get("objectives") or {}
    dual = config.get("dual")
    rows = training_rows(run_dir, config)
    last, latest = read_metrics(run_dir)
    losses = final_losses(run_dir)
    evaluations, stale = _current(read_evaluations(run_dir), config)
    dim = (dual or {}).get("embed_dim") or (model.get("hidden_size", 0) + (model.get("shape_dims") or 0))

    meta: dict[str, Any] = {
        "library_name": "item-embed",
        "pipeline_tag": "feature-extraction",
        "tags": ["item-embed", "product-embeddings", "multimodal", "image-text", "feature-extraction",
                 "sentence-similarity", *(["dual-encoder"] if dual else [])],
    }
    if evaluations:
        meta["metrics"] = ["recall", "map", "accuracy", "f1"]
        index = _model_index(name, evaluations)
        if index:
            meta["model-index"] = index

    kind = ("a CLIP-style dual encoder (separate image and text towers, contrastive loss): the peer ITEm is "
            "measured against" if dual else
            "an ITEm model: one transformer reads a product's title tokens and photo patches together, "
            "pre-trained without labels (masked tokens and patches, image-text matching, view alignment)")
    backbone = model.get("image_backbone") or None
    lines = [f"# {name}", "", "## Model description", "",
             f"Product embeddings from {kind}. A product (title, photo or both) becomes one "
             f"L2-normalised float32 vector of {dim} dimensions; same-product listings land close together.",
             "",
             *_table(["", ""], [
                 ["preset", model.get("preset")],
                 ["transformer", f"{model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
                                 f"{model.get('num_heads')} heads"],
                 ["image side", f"pretrained backbone `{backbone}`" if backbone else
                  f"{model.get('image_stem')} stem, {model.get('patch_size')} px patches"],
                 ["photo", f"padded and resized to {model.get('image_size')} px"],
                 ["title", f"at most {model.get('max_text_len')} tokens"
                           + (", description appended" if model.get("use_description") else "")],
                 ["shape slice", f"{model.get('shape_dims')} whitened HOG dims at weight {model.get('shape_weight')}"
                  if model.get("shape_dims") else "none"],
                 ["embedding", f"{dim} float32, L2-normalised"],
                 ["config hash", f"`{config.get('config_hash')}`"],
                 ["weights sha256", f"`{config.get('weights_sha256')}`"],
             ]), ""]

    lines += ["## Training data", ""]
    data_rows = [["catalog", f"`{config.get('catalog', '-')}`"]]
    if config.get("catalog_sha256"):
        data_rows.append(["catalog sha256", f"`{config['catalog_sha256']}`"])
    if config.get("data_id"):
        data_rows.append(["rows fingerprint", f"`{config['data_id']}` (hash of the used rows' ids)"])
    if rows:
        if rows.get("source") and rows.get("source") != config.get("catalog"):
            data_rows.append(["source", f"`{rows['source']}`"])
        for key, label in (("rows_in", "rows read"), ("rows_used", "rows used"), ("text_only", "title only"),
                           ("image_only", "photo only"), ("rows_reported", "rows skipped (reported)")):
            if key in rows:
                data_rows.append([label, rows[key]])
        for reason, n in (rows.get("reported_by_reason") or {}).items():
            data_rows.append([f"skipped: {reason}", n])
    heldout = config.get("heldout")
    if heldout is not None and not dual:
        data_rows.append(["held out", "2% of the products with photo and title (at most 1,000)" if heldout == -1
                          else f"{heldout} products" if heldout else "none"])
    lines += _table(["", ""], data_rows) + [""]

    lines += ["## Training procedure", "", "### Recipe", ""]
    recipe = [[k, v] for k, v in objectives.items()]
    if dual:
        recipe += [[f"dual {k}", v] for k, v in dual.items()]
    if config.get("warm_start"):
        recipe.append(["warm start", ", ".join(f"{k}={v}" for k, v in config["warm_start"].items()
                                               if k in ("epochs", "batch_size", "lr"))])
    recipe += [[k, train[k]] for k in ("lr", "new_lr_scale", "weight_decay", "warmup_ratio", "grad_clip",
                                       "batch_size", "grad_accum", "precision", "seed") if k in train]
    lines += _table(["setting", "value"], recipe) + [""]
    lines += ["### Budget", ""]
    steps = config.get("trained_steps", last.get("step"))
    budget = [["asked", ", ".join(f"{k}={train[k]}" for k in ("steps", "epochs", "max_seconds")
                                  if train.get(k) is not None) or "1 epoch"],
              ["trained steps", steps]]
    if steps is not None and train.get("batch_size"):
        budget.append(["products seen", int(steps) * int(train["batch_size"])])
    if isinstance(last.get("elapsed"), (int, float)):
        budget.append(["training time (s)", round(float(last["elapsed"]), 1)])
    lines += _table(["", ""], budget) + [""]

    lines += ["## Results", "", "### Final training losses", ""]
    if losses:
        lines += [f"At step {last.get('step')} (the last line of `metrics.jsonl`):", "",
                  *_table(["metric", "value"], [[k, v] for k, v in losses.items()])]
        if "heldout_itm_acc" not in losses and "heldout_itm_acc" in latest:
            lines += ["", f"Held-out image-text matching accuracy at the last checkpoint: "
                          f"{_fmt(latest['heldout_itm_acc'])}"]
    else:
        lines.append("No `metrics.jsonl` in the folder.")
    lines += [""] + _evaluation_section(evaluations, stale, bool(dual))

    if dual:
        use = ["```python", "from item_embed.evaluate.dual import DualEncoder", "",
               f'encoder = DualEncoder.from_pretrained("{where}")',
               'vectors = encoder.encode(["pink striped pillow", {"image": "photos/mug.jpg"}])', "```", "",
               "```bash", f"item-embed evaluate catalog.csv --featurizer dual:{where} --group group", "```"]
    else:
        use = ["```python", "from pathlib import Path", "from item_embed import ItemEncoder", "",
               f'encoder = ItemEncoder.from_pretrained("{where}")',
               'title = encoder.encode("pink striped pillow")              # (d,) float32, unit length',
               'photo = encoder.encode(Path("photos/mug.jpg"))             # a photo-only product',
               'both = encoder.encode([{"title": "red mug", "image": "photos/mug.jpg"}])  # (1, d)',
               "```", "", "```bash",
               f"item-embed embed catalog.csv --model {where} --out emb.parquet",
               "item-embed index emb.parquet --out my-index",
               f"item-embed serve --model {where} --index my-index",
               f"item-embed evaluate catalog.csv --model {where} --group group --labels category", "```"]
    lines += ["## How to use", "", *use, ""]

    lines += ["## Limitations", "",
              "- Trained without labels on one catalog: expect it to work on products like those, and measure "
              "it (`item-embed evaluate`) before trusting it elsewhere.",
              f"- Titles are cut to {model.get('max_text_len')} tokens and photos shrunk to "
              f"{model.get('image_size')} px: fine details of either are lost.",
              "- Photo-only queries rank mostly by the shape slice (outline and layout), not by what the "
              "transformer learned from titles." if model.get("shape_dims") and not dual else
              "- Photo-only and title-only queries are weaker than whole products.",
              "- Embeddings of different models (another run, another shape slice) are not comparable: "
              "indexes and embedding files record the model id and refuse others.", ""]
    return _front_matter(meta) + "\n" + "\n".join(lines)
