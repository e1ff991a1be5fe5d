"""From validated products to model batches: tokenisation, fixed arrays, batch assembly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from .catalog import Product


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The uncased WordPiece tokenizer from ``path`` (a run dir) or the shipped MiniLM files."""
    if path is None:
        from .model import minilm_path

        path = minilm_path()
    return BertTokenizerFast.from_pretrained(str(path))


@dataclass
class Batch:
    """A model-ready batch. Shapes: B rows, T text positions, S image side."""

    input_ids: torch.Tensor  # (B, T) long, [CLS] text [SEP] then [PAD]
    text_mask: torch.Tensor  # (B, T) bool
    has_text: torch.Tensor  # (B,) bool: a real title, not just [CLS] [SEP]
    images: torch.Tensor | None  # (B, S, S, 3) uint8, None when no row has an image
    has_image: torch.Tensor  # (B,) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class ProductArrays:
    """Products held as fixed arrays: padded token ids and uint8 images (training memory)."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, images: np.ndarray, has_image: np.ndarray,
                 has_text: np.ndarray, ids: list[str]) -> None:
        self.tokens = tokens  # (n, max_len) int32
        self.lengths = lengths  # (n,) int32, including [CLS] and [SEP]
        self.images = images  # (n, S, S, 3) uint8 (white where absent)
        self.has_image = has_image  # (n,) bool
        self.has_text = has_text  # (n,) bool
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, products: Sequence[Product], tokenizer: PreTrainedTokenizerBase, max_text_len: int,
              image_size: int) -> "ProductArrays":
        n = len(products)
        enc = tokenize([p.text for p in products], tokenizer, max_text_len)
        tokens = np.full((n, max_text_len), tokenizer.pad_token_id, dtype=np.int32)
        lengths = np.zeros(n, dtype=np.int32)
        for i, ids in enumerate(enc):
            tokens[i, : len(ids)] = ids
            lengths[i] = len(ids)
        images = np.full((n, image_size, image_size, 3), 255, dtype=np.uint8)
        has_image = np.zeros(n, dtype=bool)
        for i, p in enumerate(products):
            if p.image is not None:
                images[i] = p.image
                has_image[i] = True
        has_text = np.array([p.text is not None for p in products], dtype=bool)
        return cls(tokens, lengths, images, has_image, has_text, [p.id for p in products])

    def batch(self, idx: np.ndarray | Sequence[int]) -> Batch:
        idx = np.asarray(idx)
        t = int(self.lengths[idx].max())
        ids = torch.from_numpy(self.tokens[idx, :t].astype(np.int64))
        mask = torch.arange(t)[None, :] < torch.from_numpy(self.lengths[idx])[:, None]
        has_image = torch.from_numpy(self.has_image[idx])
        images = torch.from_numpy(self.images[idx]) if bool(has_image.any()) else None
        return Batch(ids, mask, torch.from_numpy(self.has_text[idx]), images, has_image)


def tokenize(texts: Sequence[str | None], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[list[int]]:
    """``[CLS] text [SEP]`` ids per text, truncated to ``max_len``; None gives ``[CLS] [SEP]``."""
    # Very long titles are cut before tokenising: only the first max_len tokens survive anyway.
    clipped = [(t or "")[: max_len * 24] for t in texts]
    return tokenizer(clipped, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]


def make_batch(products: Sequence[Product], tokenizer: PreTrainedTokenizerBase, max_text_len: int,
               image_size: int) -> Batch:
    """Batch straight from products (encoding path)."""
    return ProductArrays.build(products, tokenizer, max_text_len, image_size).batch(np.arange(len(products)))


CACHE_FORMAT = "item-embed-cache/1"


def write_cache(chunks, out: str | Path, tokenizer: PreTrainedTokenizerBase, image_size: int, max_text_len: int,
                extra: dict | None = None) -> int:
    """Stream validated product chunks into a preprocessing cache folder; returns the product count.

    Images go, already decoded, padded and resized, into one raw uint8 file read back as a
    memory map, so training epochs never decode a JPEG and ranks/processes share the page cache.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    tokens, lengths, has_image, has_text = [], [], [], []
    with open(out / "images.u8", "wb") as f:
        for chunk in chunks:
            if not chunk:
                continue
            arrays = ProductArrays.build(chunk, tokenizer, max_text_len, image_size)
            f.write(np.ascontiguousarray(arrays.images).tobytes())
            tokens.append(arrays.tokens)
            lengths.append(arrays.lengths)
            has_image.append(arrays.has_image)
            has_text.append(arrays.has_text)
            ids.extend(arrays.ids)
    n = len(ids)
    if n == 0:
        raise ValueError("no usable products: nothing to cache")
    np.save(out / "tokens.npy", np.concatenate(tokens))
    np.save(out / "lengths.npy", np.concatenate(lengths))
    np.save(out / "has_image.npy", np.concatenate(has_image))
    np.save(out / "has_text.npy", np.concatenate(has_text))
    pq.write_table(pa.table({"id": ids}), out / "ids.parquet")
    meta = {"format": CACHE_FORMAT, "count": n, "image_size": image_size, "max_text_len": max_text_len,
            **(extra or {})}
    (out / "cache.json").write_text(json.dumps(meta, indent=2))
    return n


def is_cache(path: str | Path) -> bool:
    return (Path(path) / "cache.json").is_file()


def load_cache(path: str | Path) -> tuple[ProductArrays, dict]:
    """Open a preprocessing cache: images memory-mapped read-only, the rest in memory."""
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    meta = json.loads((path / "cache.json").read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an item-embed cache (format {meta.get('format')!r})")
    n, s = meta["count"], meta["image_size"]
    expected = n * s * s * 3
    actual = (path / "images.u8").stat().st_size
    if actual != expected:
        raise ValueError(f"{path}/images.u8 has {actual} bytes, expected {expected}: incomplete or corrupted cache")
    images = np.memmap(path / "images.u8", dtype=np.uint8, mode="r", shape=(n, s, s, 3))
    ids = pq.read_table(path / "ids.parquet").column("id").to_pylist()
    arrays = ProductArrays(np.load(path / "tokens.npy"), np.load(path / "lengths.npy"), images,
                           np.load(path / "has_image.npy"), np.load(path / "has_text.npy"), ids)
    return arrays, meta
