"""A pretrained vision model as ITEm's image stem: its patch or grid features become the image tokens.

Any transformers vision model that ``AutoModel`` builds works: ViT, DINOv2, CLIP and SigLIP vision
towers (from a vision-only folder, or the vision half of a whole CLIP / SigLIP model), ConvNeXt,
ResNet. A ViT-like model's tokens are taken without its [CLS] / register tokens; a CNN's last
feature map is read cell by cell, row-major. Each token is projected linearly to ITEm's width.
The backbone's config travels in ITEm's ``config.json`` (``backbone_config``), so a saved model is
rebuilt without the backbone's own files; its weights are in ``model.safetensors`` with ITEm's.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Used when a backbone folder has no preprocessor_config.json: ImageNet statistics.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def describe_backbone(name_or_dir: str, image_size: int) -> dict[str, Any]:
    """What ModelConfig records of a backbone: its name, config (a dict), pixel statistics, and the
    patch size its token grid has at ``image_size`` (so ITEm's patch positions and MIM targets line up
    with the tokens). Reads the folder (or the local hub cache: nothing is downloaded when
    HF_HUB_OFFLINE=1)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_dir)
    except OSError as e:
        raise ValueError(f"image backbone {name_or_dir!r}: no transformers model there ({e})") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = Path(name_or_dir) / "preprocessor_config.json"
    if processor.is_file():
        p = json.loads(processor.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    settings = {"image_backbone": str(name_or_dir), "backbone_config": config.to_dict(),
                "image_mean": list(mean), "image_std": list(std)}
    grid = BackboneStem(settings["backbone_config"], mean, std, image_size, 8).grid
    if image_size % grid:
        raise ValueError(f"image backbone {name_or_dir!r}: a {grid}x{grid} token grid does not tile {image_size} px; "
                         "choose --image-size as a multiple of it")
    return {**settings, "patch_size": image_size // grid}


def _vision_part(model: nn.Module) -> nn.Module:
    """The vision tower of a two-tower model (CLIP, SigLIP), else the model itself."""
    return model.vision_model if hasattr(model, "vision_model") and hasattr(model, "text_model") else model


def build_backbone(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised backbone of this config (the weights are loaded afterwards)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(**config)
    return _vision_part(AutoModel.from_config(cfg))


def load_backbone_weights(backbone: nn.Module, name_or_dir: str) -> None:
    """Copy the pretrained weights of ``name_or_dir`` into ``backbone`` (built by :func:`build_backbone`)."""
    from transformers import AutoModel

    pretrained = _vision_part(AutoModel.from_pretrained(name_or_dir))
    missing, unexpected = backbone.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise ValueError(f"image backbone {name_or_dir!r}: weights missing for {missing[:5]}")


class BackboneStem(nn.Module):
    """uint8 (B, S, S, 3) -> the backbone's tokens (B, N, D) -> linear -> (B, N, H)."""

    def __init__(self, config: dict[str, Any], mean: list[float], std: list[float], image_size: int,
                 hidden: int) -> None:
        super().__init__()
        self.backbone = build_backbone(config)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        params = inspect.signature(self.backbone.forward).parameters
        self._kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}
        training, _ = self.backbone.training, self.backbone.eval()  # BatchNorm (ResNet) cannot train on one image
        with torch.no_grad():
            tokens, self.grid = self._tokens(torch.zeros(1, 3, image_size, image_size))
        self.backbone.train(training)
        self.proj = nn.Linear(tokens.shape[-1], hidden)

    def _tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, 3, S, S) normalised -> ((B, g*g, D) patch tokens, g)."""
        out = self.backbone(pixel_values=pixels, **self._kwargs).last_hidden_state
        if out.dim() == 4:  # a CNN's feature map (B, D, g, g)
            return out.flatten(2).transpose(1, 2), out.shape[-1]
        side = math.isqrt(out.shape[1])  # the patch grid; [CLS] and register tokens (a few) come first
        if out.shape[1] - side * side > 16:
            raise ValueError(f"cannot tell the patch grid of {out.shape[1]} backbone tokens")
        return out[:, out.shape[1] - side * side:], side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) pixel values in [0, 255] -> (B, N, H)."""
        x = images.permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, S, S) in [0, 1]
        x = ((x - self.mean) / self.std).to(next(self.proj.parameters()).dtype)
        return self.proj(self._tokens(x)[0])
