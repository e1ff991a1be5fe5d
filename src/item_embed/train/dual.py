"""Training the CLIP-style dual encoder (``model.dual``) through the shared engine, so it gets
exactly ITEm's budget: the same steps x batch x image size, or the same training seconds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import save_model
from ..config import DUAL_NEW_LR_SCALE, ModelConfig, TrainConfig
from ..data.arrays import Batch, ProductArrays
from ..model.dual import DUAL_FORMAT, DualConfig, DualModel
from ..runtime import setup_distributed
from .engine import Engine, Task, TrainResult, fingerprint, resolve, resume_point


class DualTraining(Task):
    """In-batch InfoNCE over the products that have both an image and a title."""

    log_keys = ("loss", "i2t_acc", "t2i_acc", "temperature")
    whole_batch = True  # every other pair of the batch is a negative

    def __init__(self, model: DualModel, data: ProductArrays) -> None:
        super().__init__()
        self.model, self.data = model, data
        self.pairs = np.flatnonzero(data.has_image & data.has_text)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, rows: np.ndarray, g: torch.Generator) -> Batch:
        return self.data.batch(self.pairs[rows])

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch.input_ids, batch.text_mask, batch.images)


def train_dual(data: ProductArrays, tokenizer, run_dir: str | Path, model_cfg: ModelConfig, cfg: TrainConfig,
               dual_cfg: DualConfig | None = None, resume: bool = False, progress: bool = True,
               device: str | None = None, log: Callable[[str], None] = print,
               extra: dict | None = None) -> TrainResult:
    """Train the dual encoder on the products of ``data`` that have both an image and a title.

    The budget is ``cfg.steps`` (or ``cfg.epochs``) steps of ``cfg.batch_size`` pairs, or
    ``cfg.max_seconds`` of training time, or whichever ends first. Writes ``metrics.jsonl``,
    checkpoints, and the final model (``model.safetensors`` + ``config.json`` + tokenizer) to ``run_dir``.
    """
    run_dir = Path(run_dir)
    ranks, dev = setup_distributed(device)
    dual_cfg = dual_cfg or DualConfig()
    model_cfg = dataclasses.replace(model_cfg, shape_dims=0)  # as DualModel has it (checkpoints compare configs)
    cfg = resolve(cfg, dev, DUAL_NEW_LR_SCALE)
    ckpt = resume_point(run_dir, resume, log)
    if ckpt is not None:
        meta = ckpt.meta
        saved = (ModelConfig.from_dict(meta["model"]), DualConfig(**meta["dual"]), TrainConfig.from_saved(meta["train"]))
        if saved != (model_cfg, dual_cfg, cfg):
            log(f"resuming with the configuration saved in {ckpt.folder.name} (other options ignored)")
        model_cfg, dual_cfg, cfg = saved
    model = DualModel.build(model_cfg, dual_cfg, cfg.seed)
    task = DualTraining(model, data)
    if len(task) < 2:
        raise ValueError(f"need at least 2 products with both an image and a title, got {len(task)}")
    if len(task) < len(data):
        log(f"training on the {len(task)} of {len(data)} products that have both an image and a title")
    engine = Engine(task, cfg, run_dir, ranks=ranks, device=dev, ckpt=ckpt, progress=progress, log=log,
                    meta={"model": model_cfg.to_dict(), "dual": dual_cfg.to_dict()}, data_id=fingerprint(data.ids))
    result = engine.run()
    model.cpu()
    # ``extra`` overrides save_model's own "format": ITEm's loader then refuses this folder by name.
    save_model(run_dir, model, tokenizer, {"format": DUAL_FORMAT, "dual": dual_cfg.to_dict(), "train": cfg.to_dict(),
                                           "budget": dataclasses.asdict(engine.budget), "trained_steps": result.steps,
                                           "train_seconds": round(engine.elapsed, 3), **(extra or {})})
    return result
