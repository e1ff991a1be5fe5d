"""Random views of product photos for the image-view contrastive term (SimCLR-style).

Everything runs batched on uint8 (B, S, S, 3) tensors and draws from one ``torch.Generator``, so a
training step's views are reproducible like its masking. Geometry: a random resized crop (area and
aspect drawn per image) and a horizontal flip, both as one affine resampling. Colour: brightness,
contrast and saturation jitter, a hue rotation and, for some images, greyscale.

Why the hue rotates over the whole circle (SimCLR jitters it by at most +-36 degrees): in a
catalog, colour is a variant attribute, not identity. The same garment is listed in red and in
blue, so a view that keeps the identity of a product must be free to change its colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import LUMA, luminance

# ITU-R BT.601 RGB <-> YIQ. Hue rotates the (I, Q) chroma plane around the luminance axis Y.
_RGB_TO_YIQ = torch.tensor([list(LUMA),
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class ViewPolicy:
    """How far each augmentation may go. Defaults: SimCLR's jitter at strength 0.5 (its CIFAR setting),
    crops of at least 35% of the area (SimCLR: 8%; a 96-px product photo has little to spare) and any hue."""

    crop_area: tuple[float, float] = (0.35, 1.0)  # share of the image a crop keeps
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.8  # chance an image gets brightness/contrast/saturation/hue jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.5  # rotation of at most hue * 360 degrees each way (0.5: any hue)
    grey: float = 0.2


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luminance (BT.601)."""
    return luminance(x.movedim(1, -1)).unsqueeze(1)


def _crop_flip(x: torch.Tensor, policy: ViewPolicy, g: torch.Generator) -> torch.Tensor:
    """x: float (B, 3, S, S). One bilinear resampling per image of a random crop, maybe mirrored."""
    b = x.shape[0]
    area = _uniform(b, *policy.crop_area, g)
    log_aspect = _uniform(b, math.log(policy.crop_aspect[0]), math.log(policy.crop_aspect[1]), g)
    aspect = log_aspect.exp()
    # Crop width and height as shares of the side, clipped to the picture.
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, generator=g) < policy.flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _colour(x: torch.Tensor, policy: ViewPolicy, g: torch.Generator) -> torch.Tensor:
    """x: float (B, 3, S, S) in [0, 1]. Jitter (for a ``policy.jitter`` share) then greyscale (``policy.grey``)."""
    b = x.shape[0]
    on = (torch.rand(b, generator=g) < policy.jitter).float().view(b, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(b, 1 - strength, 1 + strength, g).view(b, 1, 1, 1)
        return on * f + (1 - on)  # images without jitter keep factor 1

    x = (x * factor(policy.brightness)).clamp(0, 1)
    mean = _luma(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * factor(policy.contrast) + mean).clamp(0, 1)
    y = _luma(x)
    x = ((x - y) * factor(policy.saturation) + y).clamp(0, 1)
    angle = _uniform(b, -policy.hue, policy.hue, g) * 2 * math.pi * on.view(b)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ  # (B, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)
    grey = (torch.rand(b, generator=g) < policy.grey).view(b, 1, 1, 1)
    return torch.where(grey, _luma(x).expand_as(x), x)


def random_views(images: torch.Tensor, g: torch.Generator, policy: ViewPolicy = ViewPolicy()) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> uint8 (B, S, S, 3): one random view of each image."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, S, S, 3) images, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = _colour(_crop_flip(x, policy, g), policy, g)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
