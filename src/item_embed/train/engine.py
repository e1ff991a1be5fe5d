"""The training engine every trainer shares: ITEm pre-training, the dual encoder, classifier fine-tuning.

A :class:`Task` says what is trained (its modules, how a step's rows become a batch, the losses of
a micro-batch); the engine does the rest the same way for all of them: AdamW with no weight decay on
biases, norms and embeddings and a faster lr for what starts from scratch, warm-up + cosine over a
step or time :class:`Budget`, gradient clipping, bf16 autocast, gradient accumulation,
DistributedDataParallel under torchrun, ``metrics.jsonl``, atomic checkpoints and exact resume.

Every step's randomness (batch order, the task's masks and swaps, dropout) derives from (seed,
step), so a run resumed from a checkpoint follows the same path as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import (
    CheckpointError,
    latest_good_checkpoint, optimizer_from_tensors, optimizer_to_tensors, prune_checkpoints, save_folder_atomic,
)
from ..atomic_files import write_text_atomic
from ..config import TrainConfig
from ..runtime import Ranks, autocast, resolve_precision


def step_seed(seed: int, step: int, salt: int) -> int:
    """The seed of one random stream of step ``step`` (salt 1: batch order, 2: dropout, 3: the task's draws)."""
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step ``step``: a fresh permutation per epoch, consecutive slices within it."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(step_seed(seed, epoch, 1))
    perm = torch.randperm(n, generator=g).numpy()
    return perm[i * batch_size : (i + 1) * batch_size]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warmup = max(1, int(round(cfg.warmup_ratio * total)))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def total_steps(n: int, cfg: TrainConfig) -> int:
    """``cfg.steps``, else ``cfg.epochs`` (default 1) over ``n`` rows in batches of ``cfg.batch_size``."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, int(math.ceil((cfg.epochs or 1.0) * max(1, n // cfg.batch_size))))


_LR_GRID = 1_000_000  # the step schedule evaluated at a fraction of a time budget


@dataclass
class Budget:
    """When a run ends and how far along its lr schedule it is: ``steps``, ``seconds`` of training
    (steps, logging and checkpoints), or whichever runs out first. Warm-up + cosine follow the larger
    of the two fractions, so a run by time still warms up and decays fully within its budget (it is
    not reproducible step for step: its schedule follows the clock)."""

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("a budget needs steps, seconds, or both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"seconds must be positive, not {self.seconds}")

    @classmethod
    def of(cls, n: int, cfg: TrainConfig) -> "Budget":
        """The budget ``cfg`` asks for over ``n`` rows: time alone when it gives seconds but neither
        steps nor epochs."""
        if cfg.max_seconds is not None and cfg.steps is None and cfg.epochs is None:
            return cls(seconds=cfg.max_seconds)
        return cls(total_steps(n, cfg), cfg.max_seconds)

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the budget used after ``step`` steps and ``elapsed`` seconds (may pass 1)."""
        by_steps = step / self.steps if self.steps else 0.0
        by_time = elapsed / self.seconds if self.seconds else 0.0
        return max(by_steps, by_time)

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0

    def lr(self, step: int, elapsed: float, cfg: TrainConfig) -> float:
        if self.seconds is None:
            return lr_at(step, self.steps, cfg)  # exactly the step schedule
        at = min(_LR_GRID - 1, int(self.progress(step, elapsed) * _LR_GRID))
        return lr_at(at, _LR_GRID, cfg)


class Piece(Protocol):
    """A batch the engine can cut into ranks' and micro-batches' shares and move to a device."""

    def __len__(self) -> int: ...
    def select(self, rows: slice) -> "Piece": ...
    def to(self, device: torch.device) -> "Piece": ...


class Task(nn.Module):
    """What the engine trains. ``forward(piece)`` returns fp32 scalar tensors, ``loss`` among them.

    Subclasses set ``log_keys`` (what ``metrics.jsonl`` averages over micro-batches and ranks) and
    implement ``parts`` (the checkpoint's tensor groups), ``__len__`` (rows to draw batches from)
    and ``batch``.
    """

    log_keys: tuple[str, ...] = ("loss",)
    # In-batch negatives: a step's whole batch must go through one forward (no accumulation, one process).
    whole_batch: bool = False

    def parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, rows: np.ndarray, g: torch.Generator) -> Piece:
        """The global batch of step rows ``rows``; the task's own random draws come from ``g``."""
        raise NotImplementedError

    def starts_from_scratch(self, name: str) -> bool:
        """Parameters outside a BERT encoder (MiniLM-initialised with the minilm preset) and a pretrained
        image backbone start from scratch."""
        parts = name.split(".")
        return "bert" not in parts and "backbone" not in parts

    def logged_loss(self, last: dict[str, float]) -> float:
        """The total written to the log, from the averaged parts."""
        return last["loss"]

    def diagnostics(self) -> dict[str, float]:
        """Measurements logged beside the losses at every checkpoint (e.g. on held-out products)."""
        return {}


def param_groups(task: Task, weight_decay: float, new_lr_scale: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings and position/mask parameters; with
    ``new_lr_scale`` != 1 what starts from scratch gets its own groups at ``lr_scale`` times the lr."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        plain = p.ndim < 2 or "embeddings" in name or leaf in ("image_pos", "mask_patch")
        new = new_lr_scale != 1.0 and task.starts_from_scratch(name)
        groups.setdefault((new, plain), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if plain else weight_decay, "lr_scale": new_lr_scale if new else 1.0}
            for (new, plain), ps in sorted(groups.items())]


def adamw(groups: list[dict], lr: float, device: torch.device | str) -> torch.optim.AdamW:
    """The engine's AdamW; fused (one kernel for every tensor) on the CPU and CUDA, where the default is a
    per-parameter loop (CPU) or several kernels per step (CUDA's for-each)."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=fused)


def fingerprint(ids: list[str]) -> str:
    """A short hash of the rows' ids: a resumed run warns when its catalog changed."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def resolve(cfg: TrainConfig, device: torch.device, new_lr_scale: float) -> TrainConfig:
    """``cfg`` with its precision resolved for ``device`` and ``new_lr_scale`` defaulted: what is saved."""
    scale = cfg.new_lr_scale if cfg.new_lr_scale is not None else new_lr_scale
    return dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device), new_lr_scale=scale)


@dataclass
class Checkpoint:
    folder: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]


def resume_point(run_dir: Path, resume: bool, log: Callable[[str], None]) -> Checkpoint | None:
    """The newest good checkpoint of ``run_dir`` when resuming (bad ones are reported and skipped)."""
    if not resume:
        return None
    found = latest_good_checkpoint(run_dir, warn=log)
    if found is None:
        log(f"no usable checkpoint in {run_dir}: starting from scratch")
        return None
    return Checkpoint(*found)


@dataclass
class TrainResult:
    run_dir: Path | None
    steps: int
    last: dict[str, float]
    seconds: float
    samples_per_second: float


def shard(n: int, parts: int, index: int) -> slice:
    """Contiguous slice ``index`` of ``parts`` nearly equal slices of range(n)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return slice(int(bounds[index]), int(bounds[index + 1]))


class Engine:
    """Runs ``task`` under ``cfg`` (resolved: see :func:`resolve`) until its budget is spent.

    ``run_dir`` receives ``metrics.jsonl`` and ``checkpoints/`` (None: neither, for short in-memory
    runs); ``meta`` (the task's configs) is saved in every checkpoint beside the engine's own state;
    ``data_id`` (:func:`fingerprint`) is checked on resume.
    """

    def __init__(self, task: Task, cfg: TrainConfig, run_dir: Path | None, *, ranks: Ranks, device: torch.device,
                 meta: dict[str, Any], data_id: str, ckpt: Checkpoint | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        per_rank = cfg.batch_size // ranks.world
        if task.whole_batch and (cfg.grad_accum != 1 or ranks.world != 1):
            raise ValueError("this model's loss uses in-batch negatives: train it in one process without "
                             "gradient accumulation")
        if per_rank < cfg.grad_accum or per_rank < 1:
            raise ValueError(f"batch size {cfg.batch_size} is too small for {ranks.world} processes x "
                             f"{cfg.grad_accum} accumulation steps")
        self.task, self.cfg, self.run_dir, self.ranks, self.device = task, cfg, run_dir, ranks, device
        self.meta, self.data_id, self.progress = meta, data_id, progress
        self.log = log if ranks.main else (lambda _msg: None)
        self.budget, self.step, self.elapsed = Budget.of(len(task), cfg), 0, 0.0
        task.to(device).train()
        self.opt = adamw(param_groups(task, cfg.weight_decay, cfg.new_lr_scale), cfg.lr, device)
        if ckpt is not None:
            self._restore(ckpt)
        # Some heads get no masked position in a micro-batch now and then: let DDP allow that.
        self.module = (DistributedDataParallel(task, find_unused_parameters=True) if ranks.world > 1 else task)

    def _restore(self, ckpt: Checkpoint) -> None:
        for name, part in self.task.parts().items():
            part.load_state_dict(ckpt.tensors[name])
        optimizer_from_tensors(self.opt, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
        meta = ckpt.meta
        self.step, self.elapsed = int(meta["step"]), float(meta.get("elapsed", 0.0))
        self.budget = Budget(**meta["budget"]) if "budget" in meta else Budget(int(meta["total_steps"]))
        if meta.get("data") != self.data_id:
            self.log("warning: the catalog differs from the one this run started on")
        self.log(f"resumed from {ckpt.folder.name} at step {self.step}/{self.budget.steps or '?'} "
                 f"({self.elapsed:.1f}s trained)")

    def run(self) -> TrainResult:
        """Train to the end of the budget; returns the last step's averaged losses and the throughput."""
        metrics = None
        if self.run_dir is not None and self.ranks.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            metrics = open(self.run_dir / "metrics.jsonl", "a")
        params = [p for grp in self.opt.param_groups for p in grp["params"]]
        bar = tqdm(total=self.budget.steps, initial=self.step, disable=not (self.progress and self.ranks.main),
                   desc="train", dynamic_ncols=True)
        elapsed0, t0, samples = self.elapsed, time.perf_counter(), 0
        last: dict[str, float] = {}
        # A step's values are read back once the next step is queued, so the host runs a step ahead of
        # the device (StepValues); at a checkpoint, and at the end, they are read at once.
        pending: tuple | None = None
        try:
            while not self.budget.done(self.step, self.elapsed):
                lr = self.budget.lr(self.step, self.elapsed, self.cfg)
                values, n = self._train_step(lr, params)
                self.step += 1
                samples += n
                self.elapsed = elapsed0 + time.perf_counter() - t0
                end = self.budget.done(self.step, self.elapsed)
                save = self.step % self.cfg.save_every == 0 or end
                bar.update(1)
                if pending is not None:
                    previous, pending = pending, None
                    last = self._report(*previous, metrics, bar)
                if save:
                    values.wait()  # the step's device work counts in the time saved and reported
                    self.elapsed = elapsed0 + time.perf_counter() - t0
                    last = self._report(self.step, lr, self.elapsed, values, save, metrics, bar)
                    self._checkpoint()
                else:
                    pending = (self.step, lr, self.elapsed, values, save)
        finally:
            if pending is not None and metrics is not None:  # a failed step: still log the one before it
                with suppress(Exception):
                    self._report(*pending, metrics, bar)
            bar.close()
            if metrics is not None:
                metrics.close()
        seconds = self.elapsed - elapsed0
        self.task.eval()
        return TrainResult(self.run_dir, self.step, last, seconds, samples / max(seconds, 1e-9))

    def _report(self, step: int, lr: float, elapsed: float, values: "StepValues", save: bool, metrics, bar
                ) -> dict[str, float]:
        """Write step ``step``'s line to ``metrics.jsonl`` (every ``log_every`` steps and at checkpoints, with
        the diagnostics there) and show its losses on the bar; returns its averaged values."""
        last, grad_norm = values.read()
        if "loss" in last:
            last["loss"] = self.task.logged_loss(last)
        if metrics is not None and (step % self.cfg.log_every == 0 or save):
            extra = self._diagnostics() if save else {}
            record = {"step": step, "lr": lr, "grad_norm": grad_norm, "elapsed": round(elapsed, 4), **last, **extra}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()}, refresh=False)
        return last

    def _train_step(self, lr: float, params: list[torch.Tensor]) -> tuple["StepValues", int]:
        """One optimiser step over the global batch: (its logged values, still on the device; its rows).
        The host draws the batch and its masks and moves each micro-batch to the device first."""
        cfg, ranks, task = self.cfg, self.ranks, self.task
        g = torch.Generator().manual_seed(step_seed(cfg.seed, self.step, 3))
        batch = task.batch(batch_indices(len(task), cfg.batch_size, cfg.seed, self.step), g)
        mine = batch.select(shard(len(batch), ranks.world, ranks.rank))
        pieces = [mine.select(shard(len(mine), cfg.grad_accum, j)).to(self.device) for j in range(cfg.grad_accum)]
        return self._device_step(pieces, lr, params), len(batch)

    def _device_step(self, pieces: list[Piece], lr: float, params: list[torch.Tensor]) -> "StepValues":
        """Forward, backward and AdamW over the micro-batches ``pieces``, already on the device. Nothing in
        here reads a value back from the device (tests/train/test_sync_free.py): which losses a micro-batch
        has is known on the host, and the logged values are summed where they are."""
        cfg, ranks, task = self.cfg, self.ranks, self.task
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        counts = [0.0] * len(task.log_keys)
        sum_dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        for j, piece in enumerate(pieces):
            micro = ranks.rank * cfg.grad_accum + j
            torch.manual_seed(step_seed(cfg.seed, self.step, 2) + 104_729 * micro)  # dropout
            sync = j == len(pieces) - 1 or ranks.world == 1
            with (nullcontext() if sync else self.module.no_sync()), autocast(cfg.precision, self.device):
                out = self.module(piece)
            (out["loss"] / cfg.grad_accum).backward()
            for i, key in enumerate(task.log_keys):
                if key in out:
                    value = out[key].detach().to(sum_dtype)
                    sums[key] = sums[key] + value if key in sums else value
                    counts[i] += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.opt.step()
        zero = torch.zeros((), dtype=sum_dtype, device=self.device)
        totals = torch.cat([torch.stack([sums.get(k, zero) for k in task.log_keys]),
                            torch.tensor(counts, dtype=sum_dtype).to(self.device, non_blocking=True)])
        if ranks.world > 1:
            dist.all_reduce(totals)
        return StepValues(torch.cat([totals, grad_norm.detach().to(sum_dtype).reshape(1)]), task.log_keys)

    def _diagnostics(self) -> dict[str, float]:
        """The task's diagnostics, measured in eval mode without gradients; training mode is restored."""
        self.task.eval()
        try:
            with torch.no_grad(), autocast(self.cfg.precision, self.device):
                return self.task.diagnostics()
        finally:
            self.task.train()

    def _checkpoint(self) -> None:
        if self.run_dir is not None and self.ranks.main:
            opt_tensors, opt_meta = optimizer_to_tensors(self.opt)
            meta = {"step": self.step, "total_steps": self.budget.steps, "elapsed": self.elapsed,
                    "budget": dataclasses.asdict(self.budget), "train": self.cfg.to_dict(), **self.meta,
                    "optimizer": opt_meta, "data": self.data_id}
            tensors = {name: part.state_dict() for name, part in self.task.parts().items()}
            save_folder_atomic(self.run_dir / "checkpoints" / f"step-{self.step:08d}",
                               {**tensors, "optimizer": opt_tensors}, meta)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        if self.ranks.world > 1:
            dist.barrier()


class StepValues:
    """A step's logged sums, their counts (micro-batches and ranks that had each key) and the gradient
    norm, (2K + 1,), on their way to the host: from a GPU, copied into pinned memory behind the
    step's work and read after the next step is queued, so reading does not stall the device's queue."""

    def __init__(self, values: torch.Tensor, keys: tuple[str, ...]) -> None:
        self.keys, self._ready = keys, None
        if values.device.type == "cuda":
            with torch.cuda.device(values.device):  # the event on the stream that does the copy
                self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                self._host.copy_(values, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record()
        else:
            self._host = values

    def wait(self) -> None:
        """Until the device has finished the step (and the copy)."""
        if self._ready is not None:
            self._ready.synchronize()

    def read(self) -> tuple[dict[str, float], float]:
        """(each key's mean over what had it, the gradient norm)."""
        self.wait()
        v, k = self._host.tolist(), len(self.keys)
        return {key: v[i] / v[k + i] for i, key in enumerate(self.keys) if v[k + i] > 0}, v[2 * k]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log has each step once. A torn last line
    (killed mid-write) is dropped; a damaged line before it is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    keep = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == last:
                continue
            raise CheckpointError(f"{path} line {i + 1} is not a JSON record ({e}): repair or remove that line, "
                                  "then resume") from None
        if rec.get("step", 0) <= step:
            keep.append(ln)
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))
