"""``item-embed classify fit|predict``: category prediction, a thin layer over ``classify``.

Prediction files hold ``id``, then ``label_1 .. label_k`` (best first) and ``prob_1 .. prob_k``
(float32), then the catalog's other columns (the image excepted), one row per usable product.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from ..data.catalog import CatalogError, CatalogReport
from ..embeddings import ParquetStream
from .common import (add_catalog_args, add_command, add_device_arg, add_precision_arg, finish_report, format_table,
                     open_catalog)


def _encode(encoder, products, batch_size: int, progress: bool) -> np.ndarray:
    step = batch_size * 4  # encode_batched sorts titles by length within each step
    parts = [encoder.encode_batched(products[i : i + step], batch_size)
             for i in tqdm(range(0, len(products), step), disable=not progress, desc="embed")]
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype=np.float32)


def _split_keys(frame: pd.DataFrame, rows: list[int], ids: list[str], group: str | None) -> tuple[list, str]:
    """Group of each product (its id where the group is missing), and what the split is by."""
    if group is None:
        if "group" not in frame:
            return ids, "id"
        group = "group"
    elif group not in frame:
        raise CatalogError(f"catalog has no group column {group!r}")
    values = frame[group].iloc[rows].tolist()
    return [pid if pd.isna(v) else f"g:{v}" for v, pid in zip(values, ids)], f"group column {group!r}"


def _finetune_run(out: str) -> Path:
    """Where fine-tuning keeps its checkpoints and metrics.jsonl: beside the classifier folder, which is
    written (and replaced) atomically at the end."""
    path = Path(out)
    return path.with_name(path.name + ".run")


def cmd_fit(a: argparse.Namespace) -> int:
    from ..classify import fit_finetune, fit_linear
    from ..encode import ItemEncoder

    encoder = ItemEncoder.from_pretrained(a.model, device=a.device, precision=a.precision)
    catalog = open_catalog(a)
    if a.label not in catalog.frame:
        raise CatalogError(f"catalog {a.catalog} has no label column {a.label!r} "
                           f"(columns: {', '.join(map(str, catalog.frame.columns))})")
    report = CatalogReport()
    t0 = time.perf_counter()
    cfg = encoder.cfg
    products = catalog.load_all(cfg.image_size, use_description=cfg.use_description, strict=a.strict, report=report)
    if not products:
        raise ValueError(f"no usable products in {a.catalog}")
    rows = [p.row for p in products]
    labels = catalog.frame[a.label].iloc[rows].tolist()
    keys, split_by = _split_keys(catalog.frame, rows, [p.id for p in products], a.group)
    print(f"{len(products)} products; held-out split by {split_by}")
    if a.finetune:
        clf = fit_finetune(products, labels, keys, encoder, label_column=a.label, epochs=a.epochs,
                           batch_size=a.batch_size, lr=a.lr, head_lr=a.head_lr, precision=a.precision,
                           seed=a.seed, device=a.device, progress=not a.no_progress,
                           run_dir=_finetune_run(a.out), resume=a.resume)
    else:
        emb = _encode(encoder, products, a.batch_size, not a.no_progress)
        clf = fit_linear(emb, labels, keys, model_id=encoder.model_id, label_column=a.label, C=a.C,
                         refit_all=not a.no_refit)
    clf.options["split"] = split_by
    out = clf.save(a.out)
    h = clf.metrics["heldout"]
    print(f"trained in {time.perf_counter() - t0:.1f}s: {len(clf.labels)} classes, on {clf.metrics['trained_on']}")
    print(f"held-out accuracy {h['accuracy']:.3f}  macro-F1 {h['macro_f1']:.3f}  "
          f"({h['scored_rows']} test rows scored, {h['unscored_rows']} not scored, {h['train_rows']} train rows)")
    print(f"classifier: {out} (model {clf.model_id})")
    finish_report(report, out, "catalog_report.json")
    return 0


def _classifier_and_encoder(a: argparse.Namespace):
    """The classifier and the encoder its head reads: its own when fine-tuned, else --model (checked)."""
    from ..classify import Classifier
    from ..encode import ItemEncoder

    clf = Classifier.load(a.classifier, device=a.device, precision=a.precision)
    encoder = clf.encoder
    if a.model:
        given = ItemEncoder.from_pretrained(a.model, device=a.device, precision=a.precision)
        clf.check_model(given.model_id)
        encoder = encoder or given
    if encoder is None:
        raise ValueError(f"classifier {a.classifier} works on embeddings of model {clf.model_id}: "
                         "pass that model with --model RUN_DIR")
    return clf, encoder


def _prediction_table(ids: list[str], top: list[list[tuple[str, float]]], carried: pd.DataFrame, k: int) -> pa.Table:
    """id, label_1..label_k, prob_1..prob_k (float32), then the carried columns."""
    cols: dict = {"id": ids}
    for i in range(k):
        cols[f"label_{i + 1}"] = [t[i][0] for t in top]
    for i in range(k):
        cols[f"prob_{i + 1}"] = np.array([t[i][1] for t in top], dtype=np.float32)
    return pa.Table.from_pandas(pd.concat([pd.DataFrame(cols), carried], axis=1), preserve_index=False)


def _print_scores(tops, truth, clf, label_col: str) -> None:
    from ..classify import score_predictions

    s = score_predictions(tops, truth, clf.labels)
    print(format_table({f"labels {label_col!r}": {k: v for k, v in s.items() if k != "unseen_labels"}}))
    if s["unseen_rows"]:
        unseen = list(s["unseen_labels"])
        more = f" ... and {len(unseen) - 20} more" if len(unseen) > 20 else ""
        print(f"{s['unseen_rows']} rows carry {len(unseen)} labels the classifier never saw (counted as wrong): "
              + ", ".join(repr(x) for x in unseen[:20]) + more)


def cmd_predict(a: argparse.Namespace) -> int:
    if a.k < 1:
        raise ValueError(f"-k must be at least 1, not {a.k}")
    clf, encoder = _classifier_and_encoder(a)
    k = min(a.k, len(clf.labels))
    if k < a.k:
        print(f"-k {a.k} capped at the classifier's {k} classes")
    catalog = open_catalog(a)
    label_col = a.label or clf.label_column
    score = label_col is not None and label_col in catalog.column_names
    names = [f"label_{i}" for i in range(1, k + 1)] + [f"prob_{i}" for i in range(1, k + 1)]
    carried = [c for c in catalog.extra_columns if c not in names]
    if len(carried) < len(catalog.extra_columns):
        print(f"not carried (name taken by a prediction column): {sorted(set(catalog.extra_columns) - set(carried))}")
    out = Path(a.out)
    meta = {b"item_embed.model_id": clf.model_id.encode(),
            b"item_embed.classifier": str(Path(a.classifier).resolve()).encode(),
            b"item_embed.precision": encoder.precision.encode()}
    report, cfg, tops, truth, t0 = CatalogReport(), encoder.cfg, [], [], time.perf_counter()
    with (tqdm(total=len(catalog), disable=a.no_progress, desc="classify", dynamic_ncols=True) as bar,
          ParquetStream(out, meta) as stream):
        for raw, chunk in catalog.iter_rows_and_products(cfg.image_size, cfg.use_description, a.strict, report,
                                                         chunk_size=a.batch_size * 4):
            bar.update(len(raw))  # rows read, bad ones included
            if not chunk:
                continue
            top = clf.top_k(encoder.encode_batched(chunk, a.batch_size), k)
            rows = raw.loc[[p.row for p in chunk]].reset_index(drop=True)
            stream.write(_prediction_table([p.id for p in chunk], top, rows[carried], k))
            if score:
                tops.extend(top)
                truth.extend(rows[label_col].tolist())
        if not stream.commit():
            raise ValueError(f"no usable products in {a.catalog}: nothing to classify")
    print(f"classified {report.used} products in {time.perf_counter() - t0:.1f}s -> {out} (columns "
          f"label_1..label_{k}, prob_1..prob_{k})")
    if score:
        _print_scores(tops, truth, clf, label_col)
    elif label_col is not None:
        print(f"no label column {label_col!r} in the catalog: accuracy not reported")
    finish_report(report, out.parent, out.stem + ".report.json")
    return 0


def register(sub) -> None:
    c = sub.add_parser("classify", help="category prediction: fit a classifier, predict labels")
    cs = c.add_subparsers(dest="action", required=True)

    f = add_command(cs, "fit", "train a classifier on a labelled catalog (held-out accuracy and macro-F1)")
    add_catalog_args(f)
    f.add_argument("--model", required=True, help="run folder of a trained model")
    f.add_argument("--label", required=True, help="label column (e.g. category)")
    f.add_argument("--out", required=True, help="classifier folder to write")
    f.add_argument("--group", help="column for the held-out split (default: 'group' if present, else the id)")
    f.add_argument("--batch-size", type=int, default=32, help="products per forward pass (and fine-tuning step)")
    add_precision_arg(f)
    add_device_arg(f)
    lin = f.add_argument_group("linear head on frozen embeddings (the default)")
    lin.add_argument("--C", type=float, default=1.0, help="inverse regularisation of the logistic regression")
    lin.add_argument("--no-refit", action="store_true",
                     help="keep the train-fold fit instead of refitting on all labelled rows")
    ft = f.add_argument_group("fine-tuning")
    ft.add_argument("--finetune", action="store_true",
                    help="fine-tune the whole model with a linear head on [CLS] (checkpoints and metrics.jsonl in "
                         "OUT.run/)")
    ft.add_argument("--epochs", type=float, default=3.0, help="passes over the train fold")
    ft.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the encoder")
    ft.add_argument("--head-lr", type=float, default=1e-3, help="peak learning rate of the head")
    ft.add_argument("--seed", type=int, default=0, help="seed of the head, batch order and dropout")
    ft.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning from OUT.run/")
    f.set_defaults(func=cmd_fit)

    p = add_command(cs, "predict", "top-k labels for every product of a catalog")
    add_catalog_args(p)
    p.add_argument("--classifier", required=True, help="classifier folder from `classify fit`")
    p.add_argument("--model", help="run folder of the model the classifier was trained on (not needed when fine-tuned)")
    p.add_argument("--out", required=True, help="output .parquet: id, label_1..label_k, prob_1..prob_k, carried columns")
    p.add_argument("-k", type=int, default=5, help="labels per product")
    p.add_argument("--label", help="label column to score against (default: the one the classifier was fitted on)")
    p.add_argument("--batch-size", type=int, default=64, help="products per forward pass")
    add_precision_arg(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_predict)
