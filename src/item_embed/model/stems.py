"""How photo pixels become one vector per patch: ITEm's linear projection, or a small conv stem.

Both take uint8 (B, S, S, 3) images and give (B, N, H) patch vectors, before positions. The
checkpoint key prefixes (``patch_embed.``, ``conv_stem.``) are shared by ITEm and the dual encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..data.images import patchify


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map (as in ConvNeXt): unlike
    GroupNorm it mixes no statistics across the image, so a patch's vector depends on its own pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al., 2021): stride-2 3x3 convolutions, each halving the image and
    followed by :class:`ChannelNorm` and GELU, until one cell per patch, then a 1x1 projection to the
    hidden size. (B, 3, S, S) in [-1, 1] -> (B, N, H). No BatchNorm: an embedding must not depend on
    its batch."""

    def __init__(self, patch_size: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c_out = 3, max(hidden // 8, 8)
        for _ in range(patch_size.bit_length() - 1):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), ChannelNorm(c_out), nn.GELU()]
            c_in, c_out = c_out, min(2 * c_out, hidden)
        layers.append(nn.Conv2d(c_in, hidden, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # (B, H, g, g) -> (B, N, H)


def make_image_stem(cfg: ModelConfig) -> tuple[str, nn.Module]:
    """(attribute name, module) of the stem ``cfg`` asks for: a pretrained backbone, else ``image_stem``."""
    if cfg.image_backbone:
        from .backbone import BackboneStem

        return "backbone_stem", BackboneStem(cfg.backbone_config, cfg.image_mean, cfg.image_std, cfg.image_size,
                                             cfg.hidden_size)
    if cfg.image_stem == "linear":
        return "patch_embed", nn.Linear(cfg.patch_dim, cfg.hidden_size)
    return "conv_stem", ConvStem(cfg.patch_size, cfg.hidden_size)


def stem_patches(model: nn.Module, cfg: ModelConfig, images: torch.Tensor,
                 mim_mask: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> (B, N, H) through the stem ``make_image_stem`` put on ``model``.

    A masked patch's pixels are blanked (mid grey) before a conv stem or a backbone, which see across
    patch borders: otherwise its visible neighbours would carry the pixels MIM asks to rebuild."""
    if cfg.image_stem == "linear" and not cfg.image_backbone:
        return model.patch_embed(patchify(images.float().div(127.5).sub(1.0), cfg.patch_size))
    x = images.float()  # (B, S, S, 3) in [0, 255]
    if mim_mask is not None:
        g, p = cfg.image_size // cfg.patch_size, cfg.patch_size
        keep = (~mim_mask).reshape(-1, g, 1, g, 1, 1).expand(-1, g, p, g, p, 1).reshape(-1, g * p, g * p, 1)
        x = torch.where(keep, x, torch.full_like(x, 127.5))
    if cfg.image_backbone:
        return model.backbone_stem(x)
    return model.conv_stem(x.div(127.5).sub(1.0).permute(0, 3, 1, 2))
