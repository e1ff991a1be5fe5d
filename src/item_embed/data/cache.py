"""The preprocessing cache (``item-embed prepare``): every photo decoded, padded and resized once.

Images go into one raw uint8 file read back as a memory map, so training epochs never decode a
JPEG and ranks/processes share the page cache; tokens and flags go to small .npy files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from .arrays import ProductArrays

CACHE_FORMAT = "item-embed-cache/1"


def write_cache(chunks, out: str | Path, tokenizer: PreTrainedTokenizerBase, image_size: int, max_text_len: int,
                extra: dict | None = None) -> int:
    """Stream validated product chunks into a preprocessing cache folder; returns the product count."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    tokens, lengths, has_image, has_text, title_tokens, title_lengths = [], [], [], [], [], []
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
            title_tokens.append(arrays.title_tokens)
            title_lengths.append(arrays.title_lengths)
            ids.extend(arrays.ids)
    n = len(ids)
    if n == 0:
        raise ValueError("no usable products: nothing to cache")
    np.save(out / "tokens.npy", np.concatenate(tokens))
    np.save(out / "lengths.npy", np.concatenate(lengths))
    np.save(out / "has_image.npy", np.concatenate(has_image))
    np.save(out / "has_text.npy", np.concatenate(has_text))
    np.save(out / "title_tokens.npy", np.concatenate(title_tokens))
    np.save(out / "title_lengths.npy", np.concatenate(title_lengths))
    pq.write_table(pa.table({"id": ids}), out / "ids.parquet")
    meta = {"format": CACHE_FORMAT, "count": n, "image_size": image_size, "max_text_len": max_text_len,
            **(extra or {})}
    (out / "cache.json").write_text(json.dumps(meta, indent=2))
    return n


def is_cache(path: str | Path) -> bool:
    return (Path(path) / "cache.json").is_file()


def load_cache(path: str | Path) -> tuple[ProductArrays, dict]:
    """Open a preprocessing cache: images memory-mapped read-only, the rest in memory."""
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
    # Caches written before title-only views hold no separate titles: their titles are the texts.
    titles = [np.load(path / f) if (path / f).is_file() else None for f in ("title_tokens.npy", "title_lengths.npy")]
    arrays = ProductArrays(np.load(path / "tokens.npy"), np.load(path / "lengths.npy"), images,
                           np.load(path / "has_image.npy"), np.load(path / "has_text.npy"), ids, *titles)
    return arrays, meta
