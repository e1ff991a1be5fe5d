"""Fine-tuning a trained ITEm model with a linear head on its [CLS] embedding (the paper's leaf-category
setting), through the shared engine; ``classify.fit_finetune`` turns the result into a classifier."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.arrays import Batch, ProductArrays
from ..model.encoder import ItemModel
from ..runtime import setup_distributed
from .engine import Engine, Task, TrainResult, fingerprint, resolve, resume_point


@dataclass
class LabelledBatch:
    batch: Batch
    labels: torch.Tensor  # (B,) class index

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, rows: slice) -> "LabelledBatch":
        return LabelledBatch(self.batch.select(rows), self.labels[rows])

    def to(self, device: torch.device) -> "LabelledBatch":
        return LabelledBatch(self.batch.to(device), self.labels.to(device))


class FineTuning(Task):
    """Cross-entropy of a linear head on the pooled [CLS] of ``model``, over the ``rows`` of ``data``.

    The head sees the L2-normalised embedding times sqrt(d): unit-variance inputs, like standardised
    features (``classify`` folds that scale into the exported weight)."""

    log_keys = ("loss", "accuracy")

    def __init__(self, model: ItemModel, classes: int, data: ProductArrays, rows: np.ndarray,
                 labels: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.cfg.hidden_size, classes)
        self.scale = math.sqrt(model.cfg.hidden_size)
        self.data, self.rows, self.labels = data, rows, torch.tensor(np.asarray(labels), dtype=torch.long)

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self.model, "head": self.head}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: np.ndarray, g: torch.Generator) -> LabelledBatch:
        picked = self.rows[rows]
        return LabelledBatch(self.data.batch(picked), self.labels[torch.from_numpy(picked)])

    def starts_from_scratch(self, name: str) -> bool:
        return name.startswith("head.")  # the encoder is trained already: only the head is new

    def logits(self, b: Batch) -> torch.Tensor:
        """(B, classes) from a batch of products."""
        out = self.model(b.input_ids, b.text_mask, b.images, b.has_image)
        return self.head(self.model.pool(out) * self.scale)

    def forward(self, piece: LabelledBatch) -> dict[str, torch.Tensor]:
        logits = self.logits(piece.batch).float()
        return {"loss": F.cross_entropy(logits, piece.labels),
                "accuracy": (logits.argmax(-1) == piece.labels).float().mean().detach()}


def finetune(task: FineTuning, cfg: TrainConfig, run_dir: Path | None = None, *, resume: bool = False,
             meta: dict[str, Any] | None = None, device: str | None = None, progress: bool = False,
             log: Callable[[str], None] = print) -> TrainResult:
    """Train ``task`` under ``cfg`` (its ``new_lr_scale`` is the head's lr over the encoder's); with a
    ``run_dir`` it logs ``metrics.jsonl`` and checkpoints there, and ``resume`` goes on from the newest
    one, refused when ``meta`` (what is fine-tuned: labels, base model) differs from the saved one."""
    ranks, dev = setup_distributed(device)
    cfg = resolve(cfg, dev, 1.0)
    meta = meta or {}
    ckpt = resume_point(run_dir, resume, log) if run_dir is not None else None
    if ckpt is not None:
        saved = {k: ckpt.meta.get(k) for k in meta}
        if saved != meta:
            raise ValueError(f"{ckpt.folder} fine-tunes something else ({saved}), not {meta}: use a new --out")
        cfg = TrainConfig.from_saved(ckpt.meta["train"])
    data_id = fingerprint([task.data.ids[i] for i in task.rows])
    engine = Engine(task, cfg, run_dir, ranks=ranks, device=dev, ckpt=ckpt, progress=progress, log=log,
                    meta=meta, data_id=data_id)
    return engine.run()
