"""Subcommand ``fit-shape``: give a trained model a (new) shape slice without training it again.

``train`` fits the slice at its end; this does the same fit for a model trained without one
(``--shape-dims 0``, or before the slice existed) or refits it on another catalog's photos. The
transformer's weights are copied unchanged, so ``[CLS]`` is what it was; the result is a new
model folder (its id differs: embeddings and indexes of the old model do not mix with it).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _fit(a: argparse.Namespace, shape, size: int) -> tuple[int, object]:
    """Fit ``shape`` on the photos of ``a.catalog`` (a catalog file or a prepare cache): (photos used,
    catalog report or None). A catalog file is streamed chunk by chunk, keeping every k-th photo so at
    most ``FIT_MAX_PHOTOS`` are used, evenly spread as in ``ShapeSlice.fit``; only one batch of them is in
    memory at a time (every row is still read and checked, so the report accounts for all of them)."""
    from .catalog import CatalogError, CatalogReport
    from .cli import _open_catalog
    from .data import is_cache, load_cache
    from .shape import FIT_BATCH, FIT_MAX_PHOTOS

    report = None
    if is_cache(a.catalog):
        data, meta = load_cache(a.catalog)
        if meta["image_size"] != size:
            raise ValueError(f"the cache was prepared at {meta['image_size']} px, the model reads {size} px")
        fit = lambda: shape.fit(data.images, np.flatnonzero(data.has_image))  # noqa: E731
    else:
        report = CatalogReport()
        catalog = _open_catalog(a)
        step = max(1, math.ceil(len(catalog) / FIT_MAX_PHOTOS))

        def batches():
            pending, seen = [], 0
            for chunk in catalog.iter_chunks(size, strict=a.strict, report=report):
                for p in chunk:
                    if p.image is None:
                        continue
                    if seen % step == 0:
                        pending.append(p.image)
                    seen += 1
                    if len(pending) == FIT_BATCH:
                        yield np.stack(pending)
                        pending = []
            if pending:
                yield np.stack(pending)

        fit = lambda: shape.fit_batches(batches())  # noqa: E731
    try:
        return fit(), report
    except CatalogError:  # a bad row under --strict: its message names the row
        raise
    except ValueError as e:  # too few photos
        raise ValueError(f"{a.catalog}: {e}") from None


def cmd_fit_shape(a: argparse.Namespace) -> int:
    from .checkpoint import load_model, save_model
    from .cli import _finish_report
    from .config import RECIPE_SHAPE_DIMS
    from .data import load_tokenizer
    from .model import ItemModel

    src, out = Path(a.model), Path(a.out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must be a new folder: the model with a slice has another id than the one without")
    if (out / "model.safetensors").exists():
        raise ValueError(f"{out} already holds a model; choose a new folder")
    old, config = load_model(src)
    cfg = replace(old.cfg, shape_dims=a.shape_dims or old.cfg.shape_dims or RECIPE_SHAPE_DIMS,
                  shape_weight=a.shape_weight if a.shape_weight is not None else old.cfg.shape_weight)
    model = ItemModel(cfg)
    weights = {k: v for k, v in old.state_dict().items() if not k.startswith("shape.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("shape.") for k in missing):
        raise RuntimeError(f"{src}: weights do not fit (missing {missing}, unexpected {unexpected})")
    t0 = time.perf_counter()
    photos, report = _fit(a, model.shape, cfg.image_size)
    if not photos:
        raise ValueError(f"{a.catalog}: every photo has the same shape descriptor; nothing to fit")
    kept = {k: v for k, v in config.items() if k not in ("format", "model", "config_hash", "weights_sha256")}
    save_model(out, model.eval(), load_tokenizer(src),
               {**kept, "shape_slice": {"from_model": str(src), "catalog": str(a.catalog), "photos": photos}})
    print(f"shape slice of {cfg.shape_dims} dims (weight {cfg.shape_weight:g}) fitted on {photos} photos in "
          f"{time.perf_counter() - t0:.1f}s; embeddings have {cfg.embedding_dim} dims")
    print(f"model: {out}")
    if report is not None:
        _finish_report(report, out, "shape_catalog_report.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import _add_catalog_args

    f = sub.add_parser("fit-shape", help="fit a model's shape slice (photo queries) on a catalog's photos, "
                                         "without training it again")
    _add_catalog_args(f)  # CATALOG may also be a cache folder from `item-embed prepare`
    f.add_argument("--model", required=True, help="trained model folder (left unchanged)")
    f.add_argument("--out", required=True, help="new model folder: the same weights and a fitted slice")
    f.add_argument("--shape-dims", type=int, help="slice size (default: the model's own, else 256)")
    f.add_argument("--shape-weight", type=float, help="weight beside [CLS] (default: the model's own, 0.1)")
    f.set_defaults(func=cmd_fit_shape)
