"""The dual-encoder peer as a featurizer: ``DualEncoder`` keeps ``ItemEncoder``'s interface
(``encode``, ``encode_products``, ``to_product``), so the harness loads it with
``load_featurizer("dual:DIR")`` and the report shows its example queries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..checkpoint import CheckpointError, files_digest, load_model_tokenizer, read_model_folder
from ..config import ModelConfig
from ..data.arrays import make_batch
from ..data.catalog import Product
from ..encode import ItemEncoder
from ..model.dual import DUAL_FORMAT, MODES, DualConfig, DualModel
from ..runtime import autocast


def load_dual_model(run_dir: str | Path) -> tuple[DualModel, dict]:
    """Load an exported dual encoder and its config; refuses other folders and failed checksums."""
    config, weights = read_model_folder(run_dir, DUAL_FORMAT)
    try:
        dual = DualConfig(**config["dual"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: bad dual config ({type(e).__name__}: {e}); "
                              "copy the whole run folder or re-export the model") from None
    model = DualModel(ModelConfig.from_dict(config["model"]), dual)
    model.load_state_dict(weights)
    return model.eval(), config


class DualEncoder(ItemEncoder):
    """A trained dual encoder with ITEm's preprocessing and encoder interface.

    ``embed(products, mode)`` / ``encode_products(products, mode)``: float32 (n, D), rows
    L2-normalised; mode ``image`` uses the image tower, ``title`` the text tower, ``joint``
    normalize(image + title), falling back to whichever the product has. A product with nothing
    for the mode gets a zero row. ``encode(records)`` (inherited) embeds joint.
    """

    name = "dual"
    modalities = frozenset({"text", "image"})

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None, precision: str = "auto") -> "DualEncoder":
        model, config = load_dual_model(run_dir)
        return cls(model, load_model_tokenizer(run_dir, config, model.cfg.vocab_size), config, device, precision)

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def model_id(self) -> str:
        blob = json.dumps({"model": self.cfg.identity_dict(), "dual": self.model.dual.to_dict()}, sort_keys=True)
        weights = str(self.config.get("weights_sha256", ""))[:16]
        base = f"dual-{hashlib.sha256(blob.encode()).hexdigest()[:16]}-{weights}"
        tokenizer = files_digest(self.config)  # as ItemEncoder.model_id: folders that record their tokenizer
        return f"{base}-{tokenizer}" if tokenizer else base

    @torch.inference_mode()
    def encode_products(self, products: Sequence[Product], mode: str = "joint") -> np.ndarray:
        """Embed validated products in one batch: float32 (n, D)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        out = np.zeros((len(products), self.dim), dtype=np.float32)
        if not products:
            return out
        batch = make_batch(products, self.tokenizer, self.cfg.max_text_len, self.cfg.image_size)
        dev = self.device
        use_image = batch.has_image.numpy() & (mode != "title")
        use_text = batch.has_text.numpy() & (mode != "image")
        with autocast(self.precision, dev):
            if use_image.any():
                rows = np.flatnonzero(use_image)
                picked = batch.images[torch.from_numpy(rows)].to(dev)
                out[rows] += self.model.encode_image(picked).cpu().numpy()
            if use_text.any():
                rows = np.flatnonzero(use_text)
                idx = torch.from_numpy(rows)
                text = self.model.encode_text(batch.input_ids[idx].to(dev), batch.text_mask[idx].to(dev))
                out[rows] += text.cpu().numpy()
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm > 0, norm, 1.0)

    def encode_batched(self, products: Sequence[Product], batch_size: int = 64) -> np.ndarray:
        """Joint embeddings in batches (what the inherited ``encode`` calls)."""
        return self.embed(products, "joint", batch_size)

    def embed(self, products: Sequence[Product], mode: str = "joint", batch_size: int = 64) -> np.ndarray:
        """float32 (n, D) embeddings of ``products`` in ``mode`` (joint, image or title)."""
        if not products:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([self.encode_products(products[i : i + batch_size], mode)
                               for i in range(0, len(products), batch_size)])
