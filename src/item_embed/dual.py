"""A CLIP-style dual encoder: the standard peer ITEm is measured against.

Two towers of ITEm's shape, each pooled at its own [CLS] and projected to a shared space:

- text: a BERT over ``[CLS] title [SEP]`` (the minilm preset starts from all-MiniLM-L6-v2, as
  ITEm's text side does; the tiny preset is random);
- image: a BERT encoder of the same shape over linearly projected raw patches, a learned
  ``[CLS]`` token and learned positions (random init, as ITEm's image side effectively is).

Training is symmetric in-batch InfoNCE (image -> title and title -> image) with a learnable
temperature (CLIP: init 0.07, logit scale capped at 100). It reuses ITEm's engine pieces (batch
order, warm-up + cosine, AdamW groups, bf16 autocast, checkpoints, metrics.jsonl), so both can be
trained with the same budget: the same steps x batch x image size, or the same wall-clock
seconds (:class:`Budget`).

Embeddings: image mode = image tower, title mode = text tower, joint = normalize(image + title)
(the one available when a product lacks a modality). ``DualEncoder`` keeps ``ItemEncoder``'s
interface (``encode``, ``encode_products``, ``to_product``), so the evaluation harness loads it
with ``load_featurizer("dual:DIR")``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertEncoder

from .catalog import Product
from .checkpoint import (
    CheckpointError, latest_good_checkpoint, optimizer_from_tensors, optimizer_to_tensors, prune_checkpoints,
    save_folder_atomic, save_model, sha256_file,
)
from .config import DUAL_NEW_LR_SCALE, ModelConfig, TrainConfig
from .data import ProductArrays, load_tokenizer, make_batch
from .encode import ItemEncoder
from .model import ItemModel, bert_config, make_image_stem, stem_patches
from .train import (
    TrainResult, _param_groups, _step_seed, _truncate_metrics, batch_indices, data_fingerprint, lr_at,
    total_steps,
)

DUAL_FORMAT = "item-embed-dual/1"
MODES = ("joint", "image", "title")


@dataclass
class DualConfig:
    """What the dual encoder adds to ITEm's ``ModelConfig``: the shared space and its temperature."""

    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP's cap on 1 / temperature

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, not {self.embed_dim}")
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

    Named ``embeddings`` so the engine's ``_param_groups`` keeps these out of weight decay, as it
    does for BERT's own embeddings.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        self.position = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, h))
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
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
        self.encoder = BertEncoder(bc)
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
            text_bert = BertModel(bert_config(cfg), add_pooling_layer=False)
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


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric in-batch InfoNCE.

    image, text: (B, D) L2-normalised, row i of each from the same product; scale: 1 / temperature.
    Returns ``loss`` (mean of the image->text and text->image cross-entropies), ``i2t_acc`` and
    ``t2i_acc`` (share of rows whose own partner scores highest) and ``temperature``.
    """
    with torch.autocast(image.device.type, enabled=False):  # similarities in fp32 even under bf16
        logits = scale.float() * image.float() @ text.float().T  # (B, B): images as rows, titles as columns
    target = torch.arange(len(image), device=image.device)
    loss_i2t = F.cross_entropy(logits, target)
    loss_t2i = F.cross_entropy(logits.T, target)
    with torch.no_grad():
        i2t = (logits.argmax(1) == target).float().mean()
        t2i = (logits.argmax(0) == target).float().mean()
    return {"loss": (loss_i2t + loss_t2i) / 2, "i2t_acc": i2t, "t2i_acc": t2i, "temperature": 1.0 / scale.detach()}


# --------------------------------------------------------------------------------------------
# Budget: by steps, by wall-clock seconds, or whichever ends first
# --------------------------------------------------------------------------------------------

_LR_GRID = 1_000_000  # the step-based schedule evaluated at a fraction of the budget


@dataclass
class Budget:
    """When a run ends and how far along its learning-rate schedule it is.

    ``steps``: optimiser steps; ``seconds``: wall-clock seconds of the training loop (steps,
    logging and intermediate checkpoints: what ITEm's engine reports as its training time, so
    ``--max-seconds`` can be set to an ITEm run's seconds). With both, whichever runs out first
    ends the run. Progress is the larger
    of the two fractions, and warm-up + cosine follow progress, so a run by time still warms up
    and decays fully within its budget. Nothing here is specific to the dual encoder: ITEm's
    loop can use it the same way (``while not budget.done(step, elapsed)``).
    """

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("a budget needs steps, seconds, or both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"seconds must be positive, not {self.seconds}")

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the budget used after ``step`` steps and ``elapsed`` seconds (may pass 1)."""
        by_steps = step / self.steps if self.steps else 0.0
        by_time = elapsed / self.seconds if self.seconds else 0.0
        return max(by_steps, by_time)

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0

    def lr(self, step: int, elapsed: float, cfg: TrainConfig) -> float:
        """The engine's warm-up + cosine learning rate at this point of the budget."""
        if self.seconds is None:
            return lr_at(step, self.steps, cfg)  # exactly the engine's step schedule
        at = min(_LR_GRID - 1, int(self.progress(step, elapsed) * _LR_GRID))
        return lr_at(at, _LR_GRID, cfg)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

LOG_KEYS = ("loss", "i2t_acc", "t2i_acc", "temperature")


def _train_dict(cfg: TrainConfig) -> dict:
    # ITEm's objective weights mean nothing here; leave them out of what is saved.
    return {k: v for k, v in cfg.to_dict().items() if k != "objectives"}


def train_dual(
    data: ProductArrays,
    tokenizer,
    run_dir: str | Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    dual_cfg: DualConfig | None = None,
    max_seconds: float | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    log: Callable[[str], None] = print,
    extra: dict | None = None,
) -> TrainResult:
    """Train the dual encoder on the products of ``data`` that have both an image and a title.

    The budget is ``cfg.steps`` (or ``cfg.epochs``) steps of ``cfg.batch_size`` pairs, or
    ``max_seconds`` of training time, or whichever ends first when both are given (with
    ``max_seconds`` and ``cfg.steps`` None, time alone decides: epochs are ignored). Batch order
    and dropout derive from (seed, step) as in ITEm's engine; a time-budgeted run is not
    reproducible step for step (its schedule follows the clock). Writes ``metrics.jsonl``
    (per step: lr, losses, accuracies, temperature, ``elapsed`` seconds), checkpoints, and the
    final model (``model.safetensors`` + ``config.json`` + tokenizer) to ``run_dir``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dual_cfg = dual_cfg or DualConfig()
    model_cfg = replace(model_cfg, shape_dims=0)  # as DualModel has it (checkpoints compare configs)
    cfg = cfg.with_lr_scale_default(DUAL_NEW_LR_SCALE)
    if cfg.grad_accum != 1:
        raise ValueError("the dual encoder does not accumulate gradients: in-batch negatives need the whole batch")
    pairs = np.flatnonzero(data.has_image & data.has_text)  # rows usable as (image, title) pairs
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 products with both an image and a title, got {len(pairs)}")
    if len(pairs) < len(data):
        log(f"training on the {len(pairs)} of {len(data)} products that have both an image and a title")
    if max_seconds is not None and cfg.steps is None:
        budget = Budget(seconds=max_seconds)
    else:
        budget = Budget(total_steps(len(pairs), cfg), max_seconds)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    model = DualModel.build(model_cfg, dual_cfg, cfg.seed)
    opt_state = None
    start, elapsed = 0, 0.0
    ckpt = latest_good_checkpoint(run_dir, warn=log) if resume else None
    if ckpt is not None:
        folder, tensors, meta = ckpt
        saved = (ModelConfig.from_dict(meta["model"]), DualConfig(**meta["dual"]),
                 TrainConfig.from_saved(meta["train"]),
                 Budget(**meta["budget"]))
        if saved != (model_cfg, dual_cfg, cfg, budget):
            log(f"resuming with the configuration saved in {folder.name} (other options ignored)")
        model_cfg, dual_cfg, cfg, budget = saved
        if meta.get("data") != data_fingerprint(data):
            log("warning: the catalog differs from the one this run started on")
        model = DualModel(model_cfg, dual_cfg)
        model.load_state_dict(tensors["model"])
        opt_state = (tensors["optimizer"], meta["optimizer"])
        start, elapsed = int(meta["step"]), float(meta["elapsed"])
        log(f"resumed from {folder.name} at step {start} ({elapsed:.1f}s trained)")
    elif resume:
        log(f"no usable checkpoint in {run_dir}: starting from scratch")

    model.to(dev).train()
    opt = torch.optim.AdamW(_param_groups([model], cfg.weight_decay, cfg.new_lr_scale), lr=cfg.lr,
                            betas=(0.9, 0.98))
    if opt_state is not None:
        optimizer_from_tensors(opt, *opt_state)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)

    def checkpoint(step: int) -> None:
        opt_tensors, opt_meta = optimizer_to_tensors(opt)
        meta = {"step": step, "elapsed": elapsed, "budget": asdict(budget), "model": model_cfg.to_dict(),
                "dual": dual_cfg.to_dict(), "train": _train_dict(cfg), "optimizer": opt_meta,
                "data": data_fingerprint(data)}
        save_folder_atomic(run_dir / "checkpoints" / f"step-{step:08d}",
                           {"model": model.state_dict(), "optimizer": opt_tensors}, meta)
        prune_checkpoints(run_dir, cfg.keep_checkpoints)

    bar = tqdm(total=budget.steps, initial=start, disable=not progress, desc="train-dual", dynamic_ncols=True)
    last: dict[str, float] = {}
    step, samples = start, 0
    elapsed0, t0 = elapsed, time.perf_counter()  # elapsed0: seconds of the run before a resume
    with open(metrics_path, "a") as metrics:
        try:
            while not budget.done(step, elapsed):
                lr = budget.lr(step, elapsed, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                batch = data.batch(pairs[batch_indices(len(pairs), cfg.batch_size, cfg.seed, step)])
                torch.manual_seed(_step_seed(cfg.seed, step, 2))  # dropout
                opt.zero_grad(set_to_none=True)
                with autocast:
                    out = model(batch.input_ids.to(dev), batch.text_mask.to(dev), batch.images.to(dev))
                out["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                step += 1
                samples += len(batch)
                last = {k: float(out[k].detach()) for k in LOG_KEYS}
                elapsed = elapsed0 + time.perf_counter() - t0
                end = budget.done(step, elapsed)
                if step % cfg.log_every == 0 or end:
                    record = {"step": step, "lr": lr, "grad_norm": float(grad_norm), "elapsed": round(elapsed, 4),
                              **last}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()}, refresh=False)
                bar.update(1)
                if step % cfg.save_every == 0 or end:
                    checkpoint(step)
        finally:
            bar.close()
    model.cpu().eval()
    # ``extra`` overrides save_model's own "format": ITEm's loader then refuses this folder by name.
    save_model(run_dir, model, tokenizer, {"format": DUAL_FORMAT, "dual": dual_cfg.to_dict(), "train": _train_dict(cfg),
                                           "budget": asdict(budget), "trained_steps": step,
                                           "train_seconds": round(elapsed, 3), **(extra or {})})
    return TrainResult(run_dir, step, last, elapsed - elapsed0, samples / max(elapsed - elapsed0, 1e-9))


# --------------------------------------------------------------------------------------------
# Embedding products
# --------------------------------------------------------------------------------------------


def load_dual_model(run_dir: str | Path) -> tuple[DualModel, dict]:
    """Load an exported dual encoder and its config; refuses other folders and failed checksums."""
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{run_dir} is not a model folder (needs config.json and model.safetensors)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != DUAL_FORMAT:
        raise CheckpointError(f"{run_dir} holds format {config.get('format')!r}, not a dual encoder "
                              f"({DUAL_FORMAT}); an ITEm run loads with ItemEncoder")
    if sha256_file(weights) != config.get("weights_sha256"):
        raise CheckpointError(f"{weights} fails its checksum (truncated, corrupted or replaced)")
    model = DualModel(ModelConfig.from_dict(config["model"]), DualConfig(**config["dual"]))
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), config


class DualEncoder(ItemEncoder):
    """A trained dual encoder with ITEm's preprocessing and encoder interface.

    ``embed(products, mode)`` / ``encode_products(products, mode)``: float32 (n, D), rows
    L2-normalised; mode ``image`` uses the image tower, ``title`` the text tower, ``joint``
    normalize(image + title), falling back to whichever the product has. A product with nothing
    for the mode gets a zero row. ``encode(records)`` (inherited) embeds joint.
    """

    name = "dual"
    modalities = frozenset({"text", "image"})

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None, precision: str = "fp32") -> "DualEncoder":
        model, config = load_dual_model(run_dir)
        return cls(model, load_tokenizer(run_dir), config, device, precision)

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def model_id(self) -> str:
        blob = json.dumps({"model": self.cfg.identity_dict(), "dual": self.model.dual.to_dict()}, sort_keys=True)
        weights = str(self.config.get("weights_sha256", ""))[:16]
        return f"dual-{hashlib.sha256(blob.encode()).hexdigest()[:16]}-{weights}"

    @torch.inference_mode()
    def encode_products(self, products: Sequence[Product], mode: str = "joint") -> np.ndarray:
        """Embed validated products in one batch: float32 (n, D)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        out = np.zeros((len(products), self.dim), dtype=np.float32)
        if not products:
            return out
        batch = make_batch(products, self.tokenizer, self.cfg.max_text_len, self.cfg.image_size)
        dev = self.device
        use_image = batch.has_image.numpy() & (mode != "title")
        use_text = batch.has_text.numpy() & (mode != "image")
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        with ctx:
            if use_image.any():
                rows = np.flatnonzero(use_image)
                picked = batch.images[torch.from_numpy(rows)].to(dev)
                out[rows] += self.model.encode_image(picked).cpu().numpy()
            if use_text.any():
                rows = np.flatnonzero(use_text)
                idx = torch.from_numpy(rows)
                text = self.model.encode_text(batch.input_ids[idx].to(dev), batch.text_mask[idx].to(dev))
                out[rows] += text.cpu().numpy()
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm > 0, norm, 1.0)

    def embed(self, products: Sequence[Product], mode: str = "joint", batch_size: int = 64) -> np.ndarray:
        """float32 (n, D) embeddings of ``products`` in ``mode`` (joint, image or title)."""
        if not products:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([self.encode_products(products[i : i + batch_size], mode)
                               for i in range(0, len(products), batch_size)])
