"""ITEm: one BERT encoder over ``[CLS] title [SEP] patch_1 ... patch_N``.

Text embeds exactly as in BERT (word + position + token type 0, then LayerNorm). Each image
patch becomes a vector through the image stem (``stems``: ITEm's linear projection of its raw
pixels, or the recipe's small conv stem) and gets a learned per-patch position and token type 1,
through the same LayerNorm. The encoder is transformers' ``BertEncoder`` with the attention and dropout of ``attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from ..config import ModelConfig
from ..data.arrays import minilm_path
from .attention import ATTENTION, use_cheap_dropout
from .shape import ShapeSlice
from .stems import make_image_stem, stem_patches

TEXT_TYPE, IMAGE_TYPE = 0, 1


def bert_config(cfg: ModelConfig) -> BertConfig:
    bc = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, layer_norm_eps=cfg.layer_norm_eps, type_vocab_size=2,
    )
    bc._attn_implementation = ATTENTION
    return bc


def make_bert(cfg: ModelConfig) -> BertModel:
    """A randomly initialised BertModel of ``cfg``'s shape (no pooler), with the CPU-cheap dropout."""
    return use_cheap_dropout(BertModel(bert_config(cfg), add_pooling_layer=False))


def minilm_model_config(**overrides) -> ModelConfig:
    """ModelConfig whose encoder shape is read from the shipped MiniLM config.json."""
    src = BertConfig.from_pretrained(minilm_path())
    shape = dict(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, num_layers=src.num_hidden_layers,
        num_heads=src.num_attention_heads, intermediate_size=src.intermediate_size,
        max_position_embeddings=src.max_position_embeddings, layer_norm_eps=src.layer_norm_eps,
    )
    shape.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**shape)


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, T + N, H) final hidden states
    text_len: int  # T: positions [0, T) are text, [T, T + N) are patches
    attention_mask: torch.Tensor  # (B, T + N) 1 for real tokens


class ItemModel(nn.Module):
    """The single-stream image-text transformer. Returns hidden states; heads live in objectives."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = make_bert(cfg)
        h = cfg.hidden_size
        name, stem = make_image_stem(cfg)
        setattr(self, name, stem)
        self.image_pos = nn.Parameter(torch.zeros(1, cfg.num_patches, h))
        self.mask_patch = nn.Parameter(torch.zeros(1, 1, h))
        nn.init.trunc_normal_(self.image_pos, std=0.02)
        nn.init.trunc_normal_(self.mask_patch, std=0.02)
        self.shape = ShapeSlice(cfg.image_size, cfg.patch_size, cfg.shape_dims) if cfg.shape_dims else None

    @classmethod
    def from_minilm(cls, cfg: ModelConfig) -> "ItemModel":
        """Text embeddings and encoder from all-MiniLM-L6-v2 (offline); image side random."""
        model = cls(cfg)
        load_minilm_weights(model.bert)
        return model

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @property
    def text_positions(self) -> nn.Embedding:
        return self.bert.embeddings.position_embeddings

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H), exactly BERT's embedding layer with token type 0."""
        types = torch.full_like(input_ids, TEXT_TYPE)
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=types)

    def project_patches(self, images: torch.Tensor, mim_mask: torch.Tensor | None) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, N, H), one vector per patch, before positions."""
        return stem_patches(self, self.cfg, images, mim_mask)

    def embed_patches(self, images: torch.Tensor, mim_mask: torch.Tensor | None) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, N, H); masked patches become the learned [MASK] patch."""
        emb = self.bert.embeddings
        x = self.project_patches(images, mim_mask)
        if mim_mask is not None:
            x = torch.where(mim_mask.unsqueeze(-1), self.mask_patch.to(x.dtype), x)
        x = x + self.image_pos + emb.token_type_embeddings.weight[IMAGE_TYPE]
        return emb.dropout(emb.LayerNorm(x))

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        mim_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode a batch.

        input_ids, text_mask: (B, T); images: uint8 (B, S, S, 3) or None for a text-only batch;
        has_image: (B,) bool, rows without an image have their patches masked out of attention;
        mim_mask: (B, N) bool, patches replaced by the [MASK] patch.
        """
        x = self.embed_text(input_ids)
        mask = text_mask.to(torch.long)
        if images is not None:
            xi = self.embed_patches(images, mim_mask)
            b, n = xi.shape[:2]
            img_mask = torch.ones(b, n, dtype=torch.long, device=xi.device)
            if has_image is not None:
                img_mask = img_mask * has_image.to(torch.long).unsqueeze(1)
            x = torch.cat([x, xi], dim=1)
            mask = torch.cat([mask, img_mask], dim=1)
        attn = create_bidirectional_mask(config=self.bert.config, inputs_embeds=x, attention_mask=mask)
        out = self.bert.encoder(x, attention_mask=attn)
        return EncoderOutput(out.last_hidden_state, input_ids.shape[1], mask)

    def pool(self, out: EncoderOutput) -> torch.Tensor:
        """(B, H) the final [CLS] state (ITEm's product embedding), L2-normalised."""
        return F.normalize(out.hidden[:, 0].float(), dim=-1)

    def product_embedding(self, out: EncoderOutput, images: torch.Tensor | None, has_text: torch.Tensor,
                          has_image: torch.Tensor) -> torch.Tensor:
        """(B, cfg.embedding_dim) L2-normalised: ``pool(out)`` and, with a shape slice, the photo's
        shape part at ``cfg.shape_weight`` (model.shape). Once the slice is fitted, a row without
        text drops its [CLS] part: a title-less [CLS] carries almost no product identity at the budgets
        measured (hm-dev photo-only R@1 0.003-0.006, even with view alignment), and any weight on it
        lowered photo queries (docs/ablations.md)."""
        v = self.pool(out)
        if self.shape is None:
            return v
        if images is None:
            s = v.new_zeros(v.shape[0], self.cfg.shape_dims)
        else:
            s = self.shape(images, has_image)
        if self.shape.fitted:
            v = v * has_text.to(v.dtype).unsqueeze(1)
        return F.normalize(torch.cat([v, self.cfg.shape_weight * s], dim=1), dim=-1)


def load_minilm_weights(bert: BertModel) -> BertModel:
    """Copy all-MiniLM-L6-v2's weights (offline) into ``bert``, a BertModel of its shape."""
    weights = load_file(str(minilm_path() / "model.safetensors"))
    # The export carries BERT's pooler (unused here) and an old position_ids buffer.
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")
    return bert


def minilm_bert() -> BertModel:
    """all-MiniLM-L6-v2 as a plain BertModel (no pooler), in eval mode: the frozen text teacher."""
    return load_minilm_weights(make_bert(minilm_model_config())).eval()


def build_model(cfg: ModelConfig, seed: int = 0) -> ItemModel:
    """A fresh model for ``cfg``: MiniLM text weights for the minilm preset (random otherwise), and the
    image backbone's pretrained weights when it has one."""
    torch.manual_seed(seed)
    model = ItemModel.from_minilm(cfg) if cfg.preset == "minilm" else ItemModel(cfg)
    if cfg.image_backbone:
        from .backbone import load_backbone_weights

        load_backbone_weights(model.backbone_stem.backbone, cfg.image_backbone)
    return model
