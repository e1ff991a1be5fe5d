"""Pre-training engine: AdamW with warm-up and cosine decay, checkpoints, exact resume.

Every step's randomness (batch order, ITM swaps, masks, dropout) derives from (seed, step), so
a run resumed from a checkpoint follows the same path as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import (
    latest_good_checkpoint, optimizer_from_tensors, optimizer_to_tensors, prune_checkpoints,
    save_folder_atomic, save_model,
)
from .config import ITEM_NEW_LR_SCALE, ModelConfig, ObjectiveConfig, TrainConfig
from .data import ProductArrays
from .model import ItemModel
from .objectives import ItemObjectives, MaskedBatch, mask_batch, special_token_ids

LOSS_KEYS = ("loss", "itm", "mlm", "mim", "global_mlm", "global_mim", "contrastive", "image_contrastive", "itm_acc",
             "title_from_image", "image_from_image")


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


def _starts_from_scratch(name: str) -> bool:
    """Everything outside a BERT encoder (MiniLM-initialised with the minilm preset) starts from
    scratch: ITEm's patch projection, image positions and mask patch, the objective heads, the dual
    encoder's image tower and projections."""
    return "bert" not in name.split(".")


def _param_groups(modules: list[torch.nn.Module], weight_decay: float, new_lr_scale: float = 1.0) -> list[dict]:
    """No weight decay on biases, LayerNorms, embeddings and position/mask parameters. With
    ``new_lr_scale`` != 1 the parameters that start from scratch get their own groups, whose lr is
    scaled (``lr_scale``), so a from-scratch image side can move faster than the pretrained encoder."""
    groups: dict[tuple[bool, bool], list] = {}
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or "embeddings" in name or name in ("image_pos", "mask_patch")
            new = new_lr_scale != 1.0 and _starts_from_scratch(name)
            groups.setdefault((new, plain), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if plain else weight_decay,
             "lr_scale": new_lr_scale if new else 1.0}
            for (new, plain), ps in sorted(groups.items())]


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


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on GPU) and pick this rank's device."""
    want_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device(device or ("cuda" if want_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    return Dist(dist.get_rank(), dist.get_world_size()), dev


class Pretrainer(nn.Module):
    """Encoder + objective heads as one module, so DistributedDataParallel sees a single forward."""

    def __init__(self, model: ItemModel, objectives: ItemObjectives) -> None:
        super().__init__()
        self.model = model
        self.objectives = objectives

    def forward(self, mb: MaskedBatch) -> dict[str, torch.Tensor]:
        out = self.model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
        return self.objectives(self.model, out, mb)


def _shard(n: int, parts: int, index: int) -> slice:
    """Contiguous slice ``index`` of ``parts`` nearly equal slices of range(n)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return slice(int(bounds[index]), int(bounds[index + 1]))


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
    """Pre-train ITEm on ``data`` and export the encoder to ``run_dir``.

    Under torchrun each rank takes its share of every global batch (``cfg.batch_size`` rows in
    all); masks and ITM swaps are drawn for the global batch, so a run's data and masking do not
    depend on the number of processes. Rank 0 alone logs and writes checkpoints.
    """
    run_dir = Path(run_dir)
    ddp_info, dev = setup_distributed(device)
    log = log if ddp_info.main else (lambda _msg: None)
    if ddp_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if len(data) < 2:
        raise ValueError(f"need at least 2 usable products to train, got {len(data)}")
    cfg = cfg.with_lr_scale_default(ITEM_NEW_LR_SCALE)
    total = total_steps(len(data), cfg)
    start = 0
    model = build_model(model_cfg, cfg.seed)
    objectives = ItemObjectives(model, cfg.objectives)
    ckpt = latest_good_checkpoint(run_dir, warn=log) if resume else None
    if ckpt is not None:
        folder, tensors, meta = ckpt
        # The run goes on exactly as it started: its saved model and training configs win.
        saved_model = ModelConfig.from_dict(meta["model"])
        saved_train = TrainConfig.from_saved(meta["train"])
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
    per_rank = cfg.batch_size // ddp_info.world
    if per_rank < cfg.grad_accum or per_rank < 1:
        raise ValueError(f"batch size {cfg.batch_size} is too small for {ddp_info.world} processes x "
                         f"{cfg.grad_accum} accumulation steps")
    pretrainer = Pretrainer(model, objectives).to(dev).train()
    if cfg.compile:
        # Compile the encoder's forward only: the heads index masked positions (dynamic shapes).
        model.forward = torch.compile(model.forward, dynamic=True)
    opt = torch.optim.AdamW(_param_groups([model, objectives], cfg.weight_decay, cfg.new_lr_scale), lr=cfg.lr,
                            betas=(0.9, 0.98))
    if ckpt is not None:
        optimizer_from_tensors(opt, tensors["optimizer"], meta["optimizer"])
    step_module: nn.Module = pretrainer
    if ddp_info.world > 1:
        # Some heads get no masked position in a micro-batch now and then: let DDP allow that.
        step_module = DistributedDataParallel(pretrainer, find_unused_parameters=True)

    metrics_path = run_dir / "metrics.jsonl"
    if ddp_info.main:
        _truncate_metrics(metrics_path, start)
    specials = special_token_ids(tokenizer)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    bar = tqdm(total=total, initial=start, disable=not (progress and ddp_info.main), desc="train",
               dynamic_ncols=True)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    # The ITM-first phase swaps images and masks or drops nothing: ITM alone, on products as they are in
    # use (alone and unmasked, ITM left chance within ~400 steps with the linear stem; RESULTS.md).
    itm_phase = cfg.objectives
    if cfg.itm_first:
        itm_phase = dataclasses.replace(cfg.objectives, title_dropout=0.0, title_dropout_mim=False,
                                        **{k: 0.0 for k in ObjectiveConfig.WEIGHT_NAMES if k != "itm"})
    last: dict[str, float] = {}
    t0, samples = time.perf_counter(), 0
    metrics = open(metrics_path, "a") if ddp_info.main else None
    try:
        for step in range(start, total):
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 3))
            batch = data.batch(batch_indices(len(data), cfg.batch_size, cfg.seed, step))
            in_phase = step < cfg.itm_first
            mb = mask_batch(batch, itm_phase if in_phase else cfg.objectives, model_cfg.num_patches, specials,
                            tokenizer.mask_token_id, model_cfg.vocab_size, g)
            mine = mb.select(_shard(len(batch), ddp_info.world, ddp_info.rank))
            objectives.only = ("itm",) if in_phase else None
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
            counts = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
            for j in range(cfg.grad_accum):
                piece = mine.select(_shard(len(mine), cfg.grad_accum, j)).to(dev)
                micro = ddp_info.rank * cfg.grad_accum + j
                torch.manual_seed(_step_seed(cfg.seed, step, 2) + 104_729 * micro)  # dropout
                sync = j == cfg.grad_accum - 1 or ddp_info.world == 1
                with (nullcontext() if sync else step_module.no_sync()), autocast:
                    losses = step_module(piece)
                (losses["loss"] / cfg.grad_accum).backward()
                for i, key in enumerate(LOSS_KEYS):
                    if key in losses:
                        sums[i] += float(losses[key].detach())
                        counts[i] += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ddp_info.world > 1:
                dist.all_reduce(sums)
                dist.all_reduce(counts)
            samples += len(batch)
            last = {k: float(sums[i] / counts[i]) for i, k in enumerate(LOSS_KEYS) if counts[i] > 0}
            # The logged total is the weighted sum of the averaged objectives (a micro-batch can
            # lack one objective, so averaging the micro-batch totals would understate it).
            last["loss"] = sum(w * last[k] for k, w in objectives.summed_weights().items() if k in last)
            if metrics is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                record = {"step": step + 1, "lr": lr, "grad_norm": float(grad_norm), **last}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.set_postfix({k: f"{last[k]:.3f}" for k in LOSS_KEYS if k in last}, refresh=False)
            bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                if ddp_info.main:
                    _save_checkpoint(run_dir, model, objectives, opt, step + 1, total, model_cfg, cfg, data)
                if ddp_info.world > 1:
                    dist.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - t0
    if cfg.compile:
        del model.forward  # back to the plain method before export
    model.cpu().eval()
    if ddp_info.main and model.shape is not None:
        # The shape slice is fitted once on the training photos, without labels (item_embed.shape).
        photo_rows = np.flatnonzero(data.has_image)
        if len(photo_rows) >= 2:
            t1 = time.perf_counter()
            photos = model.shape.fit(data.images, photo_rows)
            if photos:
                log(f"shape slice fitted on {photos} photos in {time.perf_counter() - t1:.1f}s")
        if not model.shape.fitted:
            log(f"the shape slice is left unfitted ({len(photo_rows)} photo(s), 2 distinct ones needed): "
                "embeddings are [CLS] alone, padded with zeros")
    if ddp_info.main:
        save_model(run_dir, model, tokenizer, {"train": cfg.to_dict(), "trained_steps": total, **(extra or {})})
    if ddp_info.world > 1:
        dist.barrier()
    return TrainResult(run_dir, total, last, seconds, samples / max(seconds, 1e-9))


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
