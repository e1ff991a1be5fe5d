"""A CLIP-style dual encoder: the standard peer ITEm is measured against.

Two towers of ITEm's shape, each pooled at its own [CLS] and projected to a shared space:

- text: a BERT over ``[CLS] title [SEP]`` (the minilm preset starts from all-MiniLM-L6-v2, as
  ITEm's text side does; the tiny preset is random);
- image: a BERT encoder of the same shape over the patches of ITEm's image stem, a learned
  ``[CLS]`` token and learned positions (random init, as ITEm's image side).

Training (``train.dual``) is symmetric in-batch InfoNCE (image -> title and title -> image) with a
learnable temperature (CLIP: init 0.07, logit scale capped at 100), through ITEm's engine, so both
train with the same budget. Embeddings (``evaluate.dual.DualEncoder``): image mode = image tower,
title mode = text tower, joint = normalize(image + title).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertEncoder

from ..config import ModelConfig
from .attention import Dropout, use_cheap_dropout
from .encoder import ItemModel, bert_config, make_bert
from .losses import contrastive_loss
from .stems import make_image_stem, stem_patches

DUAL_FORMAT = "item-embed-dual/1"
MODES = ("joint", "image", "title")


@dataclass
class DualConfig:
    """What the dual encoder adds to ITEm's ``ModelConfig``: the shared space and its temperature."""

    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP's cap on 1 / temperature

    def __post_init__(self) -> None:
        if not isinstance(self.embed_dim, int) or isinstance(self.embed_dim, bool) or not 1 <= self.embed_dim <= 65_536:
            raise ValueError(f"embed_dim must be an integer in [1, 65536], not {self.embed_dim!r}")
        for name in ("init_temperature", "max_logit_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{name} must be a number, not {v!r}")
        if not (self.init_temperature > 0 and 1 / self.init_temperature <= self.max_logit_scale):
            raise ValueError("init_temperature must be positive with 1 / init_temperature <= max_logit_scale")

    def to_dict(self) -> dict:
        return asdict(self)


def _init_bert_style(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorms)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ImageEmbeddings(nn.Module):
    """Learned [CLS] + learned positions + LayerNorm over projected patches (BertEmbeddings' role).

    Named ``embeddings`` so the engine's ``param_groups`` keeps these out of weight decay, as it
    does for BERT's own embeddings.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        self.position = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, h))
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H) projected patches -> (B, 1 + N, H) with [CLS] first."""
        cls = self.cls.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, 1, H)
        x = torch.cat([cls, x], dim=1) + self.position
        return self.dropout(self.LayerNorm(x))


class ImageTower(nn.Module):
    """Raw patches -> BERT encoder of ITEm's shape -> final [CLS] (B, H)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bc = bert_config(cfg)
        name, stem = make_image_stem(cfg)  # the same stems ITEm can have, so the peers stay comparable
        setattr(self, name, stem)
        self.embeddings = ImageEmbeddings(cfg)
        self.encoder = use_cheap_dropout(BertEncoder(bc))
        self.apply(lambda m: _init_bert_style(m, bc.initializer_range))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, H) final [CLS] state; patches through the stem as in ITEm."""
        x = self.embeddings(stem_patches(self, self.cfg, images))  # (B, 1 + N, H)
        return self.encoder(x).last_hidden_state[:, 0]


class TextTower(nn.Module):
    """``[CLS] title [SEP]`` -> BERT -> final [CLS] (B, H)."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, H)."""
        out = self.bert(input_ids=input_ids, attention_mask=text_mask.to(torch.long),
                        token_type_ids=torch.zeros_like(input_ids))
        return out.last_hidden_state[:, 0]


class DualModel(nn.Module):
    """Text and image towers with linear projections into one space and a learnable temperature."""

    def __init__(self, cfg: ModelConfig, dual: DualConfig | None = None, text_bert: BertModel | None = None) -> None:
        super().__init__()
        self.cfg = replace(cfg, shape_dims=0)  # ITEm's shape slice is no part of the peer
        self.dual = dual or DualConfig()
        if text_bert is None:
            text_bert = make_bert(cfg)
        self.text = TextTower(text_bert)
        self.image = ImageTower(cfg)
        d, std = self.dual.embed_dim, bert_config(cfg).initializer_range
        self.text_proj = nn.Linear(cfg.hidden_size, d, bias=False)
        self.image_proj = nn.Linear(cfg.hidden_size, d, bias=False)
        nn.init.normal_(self.text_proj.weight, std=std)
        nn.init.normal_(self.image_proj.weight, std=std)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.dual.init_temperature)))

    @classmethod
    def build(cls, cfg: ModelConfig, dual: DualConfig | None = None, seed: int = 0) -> "DualModel":
        """A fresh model: text tower from MiniLM for the minilm preset (as ITEm), random otherwise."""
        torch.manual_seed(seed)
        # ITEm's own loader puts MiniLM into a BertModel of exactly ITEm's shape; take that BERT.
        text_bert = ItemModel.from_minilm(cfg).bert if cfg.preset == "minilm" else None
        return cls(cfg, dual, text_bert)

    @property
    def dim(self) -> int:
        return self.dual.embed_dim

    def scale(self) -> torch.Tensor:
        """1 / temperature, capped at ``max_logit_scale`` (the cap stops its gradient, as in CLIP)."""
        return self.logit_scale.clamp(max=math.log(self.dual.max_logit_scale)).exp()

    def encode_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, D) L2-normalised float32."""
        return F.normalize(self.text_proj(self.text(input_ids, text_mask)).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, D) L2-normalised float32."""
        return F.normalize(self.image_proj(self.image(images)).float(), dim=-1)

    def forward(self, input_ids: torch.Tensor, text_mask: torch.Tensor,
                images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Contrastive losses of a batch of matched (image, title) pairs."""
        return contrastive_loss(self.encode_image(images), self.encode_text(input_ids, text_mask), self.scale())
