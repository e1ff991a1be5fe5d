"""Subcommand ``fit-shape``: give a trained model a (new) shape slice without training it again.

``train`` fits the slice at its end; this does the same fit for a model trained without one
(``--shape-dims 0``, or before the slice existed) or refits it on another catalog's photos. The
transformer's weights are copied unchanged, so ``[CLS]`` is what it was; the result is a new
model folder (its id differs: embeddings and indexes of the old model do not mix with it).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _photos(a: argparse.Namespace, image_size: int):
    """(indexable of uint8 (S, S, 3) photos, rows with a photo, catalog report or None)."""
    from .catalog import CatalogReport
    from .cli import _open_catalog
    from .data import is_cache, load_cache

    if is_cache(a.catalog):
        data, meta = load_cache(a.catalog)
        if meta["image_size"] != image_size:
            raise ValueError(f"the cache was prepared at {meta['image_size']} px, the model reads {image_size} px")
        return data.images, np.flatnonzero(data.has_image), None
    report = CatalogReport()
    images = [p.image for chunk in _open_catalog(a).iter_chunks(image_size, strict=a.strict, report=report)
              for p in chunk if p.image is not None]
    return images, np.arange(len(images)), report


class _Rows:
    """``images[rows]`` for a list of arrays, as ShapeSlice.fit indexes a memory-mapped cache."""

    def __init__(self, images: list) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> np.ndarray:
        return np.stack([self.images[i] for i in rows])


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
    images, rows, report = _photos(a, cfg.image_size)
    if len(rows) < 2:
        raise ValueError(f"{a.catalog}: {len(rows)} usable photo(s); the shape slice needs at least 2")
    photos = model.shape.fit(images if not isinstance(images, list) else _Rows(images), rows)
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
