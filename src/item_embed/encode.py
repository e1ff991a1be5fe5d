"""Product embeddings from a trained run: ``ItemEncoder.from_pretrained(run).encode(products)``."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_model
from .data.arrays import Batch, ProductArrays, load_tokenizer, make_batch
from .data.catalog import Product
from .data.images import ImageError, ImageLimits, load_image_array
from .model.encoder import ItemModel
from .runtime import autocast, pick_device, resolve_precision


def _bf16_copy(model: ItemModel) -> ItemModel:
    """A bfloat16 copy of ``model`` for inference; its shape slice (if any) is ``model``'s own float32
    one (the whitening needs fp32 and has no weights worth copying)."""
    if not hasattr(model, "shape"):  # the dual encoder has no slice
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    shape, model.shape = model.shape, None
    try:
        runner = copy.deepcopy(model).to(torch.bfloat16).eval()
    finally:
        model.shape = shape
    runner.shape = shape
    return runner


class ItemEncoder:
    """A trained ITEm encoder with its tokenizer and preprocessing.

    ``encode`` accepts records with an ``image`` (path, bytes, PIL image), a ``title`` (and an
    optional ``description``), or both, and returns L2-normalised float32 embeddings (n, d).

    ``precision="auto"`` (the default) picks bf16 where the device has native bf16 matrix units (on
    the 2-core AMX CPU of benchmarks/RESULTS.md 2.4x the fp32 speed, hm-dev joint R@1 0.9958 vs
    0.9963) and fp32 elsewhere; ``precision`` holds the choice made. bf16 encodes with a bfloat16 copy of
    ``model`` made here (``runner``; the shape slice stays float32) under autocast: autocast alone
    re-casts every fp32 weight on each batch, ~15% of the encode time on CPU
    (benchmarks/bench_encode.py). ``model`` itself stays as given (what ``save_model`` writes and
    fine-tuning copies); change its weights and the copy is stale, so build a new encoder.
    """

    def __init__(self, model: ItemModel, tokenizer, config: dict | None = None, device: str | None = None,
                 precision: str = "auto") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or {}
        self.cfg = model.cfg
        self.device = pick_device(device)
        self.model.to(self.device)
        self.precision = resolve_precision(precision, self.device)
        self.runner = self.model if self.precision == "fp32" else _bf16_copy(self.model)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None, precision: str = "auto",
                        shape_slice: bool = True) -> "ItemEncoder":
        """The model of ``run_dir``; ``shape_slice=False`` embeds with its [CLS] alone (the transformer's
        own embedding, without the hand-made HOG part; another model id)."""
        model, config = load_model(Path(run_dir))
        if not shape_slice and model.shape is not None:
            model.cfg, model.shape = dataclasses.replace(model.cfg, shape_dims=0), None
        return cls(model, load_tokenizer(run_dir), config, device, precision)

    @property
    def dim(self) -> int:
        return self.cfg.embedding_dim

    @property
    def model_id(self) -> str:
        """Identity of the weights: config hash + weights checksum prefix."""
        return f"{self.cfg.config_hash()}-{str(self.config.get('weights_sha256', ''))[:16]}"

    def to_product(self, record: Mapping[str, Any] | Product, index: int = 0, image_root: Path | None = None,
                   limits: ImageLimits | None = None) -> Product:
        """A record -> Product with a prepared image; raises ValueError naming the record."""
        if isinstance(record, Product):
            return record
        title = record.get("title")
        desc = record.get("description") if self.cfg.use_description else None
        text = ". ".join(" ".join(str(t).split()) for t in (title, desc) if t and str(t).strip()) or None
        image = None
        if record.get("image") is not None:
            try:
                image = load_image_array(record["image"], self.cfg.image_size, image_root, limits)
            except ImageError as e:
                raise ImageError(f"record {record.get('id', index)!r}: {e}") from None
        if image is None and text is None:
            raise ValueError(f"record {record.get('id', index)!r} has neither an image nor a title")
        return Product(index, str(record.get("id", index)), text, image)

    def encode_products(self, products: Sequence[Product]) -> np.ndarray:
        """Embed already validated products in one batch: float32 (n, d)."""
        if not products:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode_batch(make_batch(products, self.tokenizer, self.cfg.max_text_len, self.cfg.image_size))

    def encode_batched(self, products: Sequence[Product], batch_size: int = 64) -> np.ndarray:
        """Embed already validated products in batches of titles of similar length: float32 (n, d),
        rows in the order given.

        A batch is padded to its longest title; grouping by length trims that padding (hm-dev titles
        in batches of 64 in catalog order: 11.1 tokens padded vs 7 on average). A product's embedding
        does not depend on the rest of its batch (padding is masked)."""
        out = np.zeros((len(products), self.dim), dtype=np.float32)
        if not products:
            return out
        arrays = ProductArrays.build(products, self.tokenizer, self.cfg.max_text_len, self.cfg.image_size)
        order = np.argsort(arrays.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._encode_batch(arrays.batch(idx))
        return out

    @torch.inference_mode()
    def _encode_batch(self, batch: Batch) -> np.ndarray:
        dev = self.device
        images = None if batch.images is None else batch.images.to(dev)
        has_image = batch.has_image.to(dev)
        with autocast(self.precision, dev):
            out = self.runner(batch.input_ids.to(dev), batch.text_mask.to(dev), images, has_image)
            emb = self.runner.product_embedding(out, images, batch.has_text.to(dev), has_image)
        return emb.cpu().numpy().astype(np.float32)

    def encode(self, products: Iterable[Mapping[str, Any] | Product], batch_size: int = 64,
               show_progress: bool = False, image_root: str | Path | None = None) -> np.ndarray:
        """Embed records (dicts with image and/or title, or Products): float32 (n, d), L2-normalised."""
        root = Path(image_root) if image_root is not None else None
        items = list(products)
        chunks = []
        chunk = batch_size * 4  # sorted by title length within a chunk (encode_batched)
        with tqdm(total=len(items), disable=not show_progress, desc="embed") as bar:
            for start in range(0, len(items), chunk):
                part = [self.to_product(r, start + i, root) for i, r in enumerate(items[start : start + chunk])]
                chunks.append(self.encode_batched(part, batch_size))
                bar.update(len(part))
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)
