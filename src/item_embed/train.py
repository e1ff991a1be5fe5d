"""Pre-training engine: AdamW with warm-up and cosine decay, checkpoints, exact resume.

Every step's randomness (batch order, ITM swaps, masks, dropout) derives from (seed, step), so
a run resumed from a checkpoint follows the same path as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    latest_good_checkpoint, optimizer_from_tensors, optimizer_to_tensors, prune_checkpoints,
    save_folder_atomic, save_model,
)
from .config import ModelConfig, TrainConfig
from .data import Batch, ProductArrays
from .model import ItemModel
from .objectives import ItemObjectives, mask_batch, special_token_ids

LOSS_KEYS = ("loss", "itm", "mlm", "mim", "global_mlm", "global_mim", "itm_acc")


def build_model(cfg: ModelConfig, seed: int = 0) -> ItemModel:
    """A fresh model for ``cfg``: MiniLM text weights for the minilm preset, random otherwise."""
    torch.manual_seed(seed)
    if cfg.preset == "minilm":
        return ItemModel.from_minilm(cfg)
    return ItemModel(cfg)


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step ``step``: a fresh permutation per epoch, consecutive slices within it."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(_step_seed(seed, epoch, 1))
    perm = torch.randperm(n, generator=g).numpy()
    return perm[i * batch_size : (i + 1) * batch_size]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(round(cfg.warmup_ratio * total)))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorms, embeddings and position/mask parameters."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or "embeddings" in name or name in ("image_pos", "mask_patch")
            (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to(batch: Batch, device: torch.device) -> Batch:
    mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return Batch(mv(batch.input_ids), mv(batch.text_mask), mv(batch.has_text), mv(batch.images), mv(batch.has_image))


def data_fingerprint(data: ProductArrays) -> str:
    return hashlib.sha256("\n".join(data.ids).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    last: dict[str, float]
    seconds: float
    samples_per_second: float


def total_steps(n: int, cfg: TrainConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, int(math.ceil(cfg.epochs * max(1, n // cfg.batch_size))))


def train(
    data: ProductArrays,
    tokenizer,
    run_dir: str | Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    log: Callable[[str], None] = print,
    extra: dict | None = None,
) -> TrainResult:
    """Pre-train ITEm on ``data`` and export the encoder to ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if len(data) < 2:
        raise ValueError(f"need at least 2 usable products to train, got {len(data)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = total_steps(len(data), cfg)
    start = 0
    model = build_model(model_cfg, cfg.seed)
    objectives = ItemObjectives(model, cfg.objectives)
    ckpt = latest_good_checkpoint(run_dir, warn=log) if resume else None
    if ckpt is not None:
        folder, tensors, meta = ckpt
        # The run goes on exactly as it started: its saved model and training configs win.
        saved_model, saved_train = ModelConfig.from_dict(meta["model"]), TrainConfig(**meta["train"])
        if saved_model != model_cfg or saved_train != cfg:
            log(f"resuming with the configuration saved in {folder.name} (other options ignored)")
        if saved_model != model_cfg or saved_train.objectives != cfg.objectives:
            model = ItemModel(saved_model)
            objectives = ItemObjectives(model, saved_train.objectives)
        model_cfg, cfg = saved_model, saved_train
        if meta.get("data") != data_fingerprint(data):
            log("warning: the catalog differs from the one this run started on")
        model.load_state_dict(tensors["model"])
        objectives.load_state_dict(tensors["heads"])
        start = int(meta["step"])
        total = int(meta["total_steps"])
        log(f"resumed from {folder.name} at step {start}/{total}")
    elif resume:
        log(f"no usable checkpoint in {run_dir}: starting from scratch")
    model.to(dev).train()
    objectives.to(dev).train()
    opt = torch.optim.AdamW(_param_groups([model, objectives], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    if ckpt is not None:
        optimizer_from_tensors(opt, tensors["optimizer"], meta["optimizer"])

    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    specials = special_token_ids(tokenizer)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    bar = tqdm(total=total, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    last: dict[str, float] = {}
    t0, samples = time.perf_counter(), 0
    with open(metrics_path, "a") as metrics:
        for step in range(start, total):
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            torch.manual_seed(_step_seed(cfg.seed, step, 2))  # dropout
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 3))
            batch = data.batch(batch_indices(len(data), cfg.batch_size, cfg.seed, step))
            mb = mask_batch(batch, cfg.objectives, model_cfg.num_patches, specials, tokenizer.mask_token_id,
                            model_cfg.vocab_size, g)
            mb = _masked_to(mb, dev)
            with autocast:
                out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
                losses = objectives(model, out, mb)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for grp in opt.param_groups for p in grp["params"]], cfg.grad_clip
            )
            opt.step()
            samples += len(batch)
            last = {k: float(v.detach()) for k, v in losses.items()}
            record = {"step": step + 1, "lr": lr, "grad_norm": float(grad_norm), **last}
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.set_postfix({k: f"{last[k]:.3f}" for k in LOSS_KEYS if k in last}, refresh=False)
            bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                _save_checkpoint(run_dir, model, objectives, opt, step + 1, total, model_cfg, cfg, data)
    bar.close()
    seconds = time.perf_counter() - t0
    model.cpu().eval()
    save_model(run_dir, model, tokenizer, {"train": cfg.to_dict(), "trained_steps": total, **(extra or {})})
    return TrainResult(run_dir, total, last, seconds, samples / max(seconds, 1e-9))


def _masked_to(mb, dev: torch.device):
    if dev.type == "cpu":
        return mb
    fields = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in vars(mb).items()}
    return type(mb)(**fields)


def _save_checkpoint(run_dir: Path, model, objectives, opt, step: int, total: int, model_cfg: ModelConfig,
                     cfg: TrainConfig, data: ProductArrays) -> None:
    opt_tensors, opt_meta = optimizer_to_tensors(opt)
    meta = {"step": step, "total_steps": total, "model": model_cfg.to_dict(), "train": cfg.to_dict(),
            "optimizer": opt_meta, "data": data_fingerprint(data)}
    folder = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    save_folder_atomic(folder, {"model": model.state_dict(), "heads": objectives.state_dict(),
                                "optimizer": opt_tensors}, meta)
    prune_checkpoints(run_dir, cfg.keep_checkpoints)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log has each step once."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
