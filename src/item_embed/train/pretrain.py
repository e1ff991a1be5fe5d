"""ITEm pre-training: the five objectives on a catalog's products, through the shared engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import save_model
from ..config import ITEM_NEW_LR_SCALE, ModelConfig, ObjectiveConfig, TrainConfig
from ..data.arrays import ProductArrays
from ..model.encoder import ItemModel, build_model
from ..model.objectives import ItemObjectives, MaskedBatch, mask_batch, special_token_ids
from ..runtime import setup_distributed
from .engine import Engine, Task, TrainResult, fingerprint, resolve, resume_point


class Pretraining(Task):
    """Encoder + objective heads as one module (DistributedDataParallel sees a single forward).

    A step's batch is swapped and masked as a whole (``mask_batch``), before it is cut into ranks'
    and micro-batches' shares, so a run's data and masking do not depend on the number of processes."""

    log_keys = ("loss", "itm", "mlm", "mim", "global_mlm", "global_mim", "itm_acc")

    def __init__(self, model: ItemModel, objectives: ItemObjectives, data: ProductArrays, tokenizer) -> None:
        super().__init__()
        self.model, self.objectives = model, objectives
        self.data = data
        self.specials, self.mask_id = special_token_ids(tokenizer), tokenizer.mask_token_id

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "heads": self.objectives}

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, rows: np.ndarray, g: torch.Generator) -> MaskedBatch:
        cfg = self.model.cfg
        return mask_batch(self.data.batch(rows), self.objectives.cfg, cfg.num_patches, self.specials, self.mask_id,
                          cfg.vocab_size, g)

    def forward(self, mb: MaskedBatch) -> dict[str, torch.Tensor]:
        out = self.model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
        return self.objectives(self.model, out, mb)

    def logged_loss(self, last: dict[str, float]) -> float:
        # The weighted sum of the averaged objectives (a micro-batch can lack one objective, so
        # averaging the micro-batch totals would understate it).
        return sum(w * last[k] for k, w in self.objectives.cfg.weights().items() if k in last)


def train(data: ProductArrays, tokenizer, run_dir: str | Path, model_cfg: ModelConfig, cfg: TrainConfig,
          objectives: ObjectiveConfig | None = None, resume: bool = False, progress: bool = True,
          device: str | None = None, log: Callable[[str], None] = print, extra: dict | None = None) -> TrainResult:
    """Pre-train ITEm on ``data`` and export the encoder (with its fitted shape slice) to ``run_dir``.

    Under torchrun each rank takes its share of every global batch (``cfg.batch_size`` rows in all);
    rank 0 alone logs and writes checkpoints. With ``resume`` the run goes on from its newest good
    checkpoint with the configuration saved there.
    """
    run_dir = Path(run_dir)
    ranks, dev = setup_distributed(device)
    log = log if ranks.main else (lambda _msg: None)
    if len(data) < 2:
        raise ValueError(f"need at least 2 usable products to train, got {len(data)}")
    cfg = resolve(cfg, dev, ITEM_NEW_LR_SCALE)
    objectives = objectives or ObjectiveConfig()
    ckpt = resume_point(run_dir, resume, log)
    if ckpt is not None:
        meta = ckpt.meta
        saved = (ModelConfig.from_dict(meta["model"]), TrainConfig.from_saved(meta["train"]),
                 ObjectiveConfig.from_saved(meta.get("objectives") or meta["train"]["objectives"]))
        if saved != (model_cfg, cfg, objectives):
            log(f"resuming with the configuration saved in {ckpt.folder.name} (other options ignored)")
        model_cfg, cfg, objectives = saved
    model = build_model(model_cfg, cfg.seed)
    task = Pretraining(model, ItemObjectives(model, objectives), data, tokenizer)
    engine = Engine(task, cfg, run_dir, ranks=ranks, device=dev, ckpt=ckpt, progress=progress, log=log,
                    meta={"model": model_cfg.to_dict(), "objectives": objectives.to_dict()},
                    data_id=fingerprint(data.ids))
    result = engine.run()
    model.cpu()
    if ranks.main:
        if model.shape is not None:
            _fit_shape_slice(model, data, log)
        save_model(run_dir, model, tokenizer, {"train": cfg.to_dict(), "objectives": objectives.to_dict(),
                                               "trained_steps": result.steps, **(extra or {})})
    if ranks.world > 1:
        torch.distributed.barrier()
    return result


def _fit_shape_slice(model: ItemModel, data: ProductArrays, log: Callable[[str], None]) -> None:
    """Fit the shape slice on the training photos, without labels (model.shape)."""
    photo_rows = np.flatnonzero(data.has_image)
    if len(photo_rows) >= 2:
        t0 = time.perf_counter()
        photos = model.shape.fit(data.images, photo_rows)
        if photos:
            log(f"shape slice fitted on {photos} photos in {time.perf_counter() - t0:.1f}s")
    if not model.shape.fitted:
        log(f"the shape slice is left unfitted ({len(photo_rows)} photo(s), 2 distinct ones needed): "
            "embeddings are [CLS] alone, padded with zeros")
