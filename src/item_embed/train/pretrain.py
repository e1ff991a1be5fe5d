"""ITEm pre-training through the shared engine: the five objectives with view alignment to the frozen
MiniLM teacher (the recipe), optionally after an image warm start that also mines hard ITM negatives."""

from __future__ import annotations

import hashlib
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
from .warmstart import cached_teacher, load_warm_stem, mine_hard_negatives, warm_start

HELDOUT_PAIRS = 2000  # held-out image-text matching: half matched, half swapped (BENCHMARKS.md's diagnostic)


class Pretraining(Task):
    """Encoder + objective heads as one module (DistributedDataParallel sees a single forward).

    A step's batch is swapped and masked as a whole (``mask_batch``), before it is cut into ranks'
    and micro-batches' shares, so a run's data and masking do not depend on the number of processes.
    ``teacher`` (n, D): the frozen text embeddings view alignment pulls towards (``teacher_title``: of the
    titles alone, for the title view); ``hard`` (n, k): each
    product's mined hard ITM negatives (-1: none); ``heldout``: rows kept out of training, on which
    image-text matching is measured at every checkpoint.
    """

    log_keys = ("loss", "itm", "mlm", "mim", "global_mlm", "global_mim", "align", "itm_acc", "align_joint",
                "align_title", "align_joint_acc", "align_title_acc")

    def __init__(self, model: ItemModel, objectives: ItemObjectives, data: ProductArrays, tokenizer,
                 teacher: np.ndarray | None = None, hard: np.ndarray | None = None,
                 heldout: np.ndarray | None = None, teacher_title: np.ndarray | None = None) -> None:
        super().__init__()
        self.model, self.objectives = model, objectives
        self.data = data
        self.specials, self.mask_id = special_token_ids(tokenizer), tokenizer.mask_token_id
        self.teacher = None if teacher is None else torch.from_numpy(teacher)
        self.teacher_title = None if teacher_title is None else torch.from_numpy(teacher_title)
        self.hard = hard
        self.heldout = np.zeros(0, dtype=np.int64) if heldout is None else heldout
        self.rows = np.setdiff1d(np.arange(len(data)), self.heldout)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "heads": self.objectives}

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: np.ndarray, g: torch.Generator) -> MaskedBatch:
        idx = self.rows[rows]
        cfg, b = self.model.cfg, self.data.batch(idx)
        mb = mask_batch(b, self.objectives.cfg, cfg.num_patches, self.specials, self.mask_id, cfg.vocab_size, g)
        if self.teacher is not None:
            title = self.data.batch(idx, title_only=True)
            mb.title_ids, mb.title_mask = title.input_ids, title.text_mask
            mb.teacher = self.teacher[torch.from_numpy(idx)]
            if self.teacher_title is not None:
                mb.teacher_title = self.teacher_title[torch.from_numpy(idx)]
        if self.hard is not None and self.objectives.cfg.itm_hard > 0:
            self._swap_in_hard_negatives(mb, idx, g)
        return mb

    def _swap_in_hard_negatives(self, mb: MaskedBatch, idx: np.ndarray, g: torch.Generator) -> None:
        """Give a share of the swapped rows the photo of one of their mined hard negatives instead."""
        negatives = torch.nonzero(mb.itm_labels == 0).squeeze(1)
        chosen = negatives[torch.rand(len(negatives), generator=g) < self.objectives.cfg.itm_hard]
        for r in chosen.tolist():
            pool = self.hard[idx[r]]
            pool = pool[pool >= 0]
            if len(pool):
                donor = int(pool[torch.randint(len(pool), (1,), generator=g)])
                mb.images[r] = torch.from_numpy(np.array(self.data.images[donor]))  # a copy: the cache is read-only

    def forward(self, mb: MaskedBatch) -> dict[str, torch.Tensor]:
        out = self.model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
        return self.objectives(self.model, out, mb)

    def logged_loss(self, last: dict[str, float]) -> float:
        # The weighted sum of the averaged objectives (a micro-batch can lack one objective, so
        # averaging the micro-batch totals would understate it).
        return sum(w * last[k] for k, w in self.objectives.cfg.weights().items() if k in last)

    def diagnostics(self) -> dict[str, float]:
        return {"heldout_itm_acc": heldout_itm_accuracy(self)} if "itm" in self.objectives.heads else {}


def heldout_itm_accuracy(task: Pretraining, batch_size: int = 64) -> float:
    """ITM accuracy on up to ``HELDOUT_PAIRS`` pairs of held-out products: each matched with its own photo
    and with the photo of another held-out product whose text differs (a fixed derangement)."""
    rows = task.heldout[task.data.has_image[task.heldout] & task.data.has_text[task.heldout]][: HELDOUT_PAIRS // 2]
    if len(rows) < 2:
        return float("nan")
    donors = np.roll(rows, 1)  # product i with the photo of product i-1 (a different product)
    model, head = task.model, task.objectives.heads["itm"]
    dev = next(model.parameters()).device
    hits = total = 0
    for swapped, photos in ((False, rows), (True, donors)):
        for start in range(0, len(rows), batch_size):
            b = task.data.batch(rows[start : start + batch_size]).to(dev)
            images = torch.from_numpy(np.asarray(task.data.images[photos[start : start + batch_size]])).to(dev)
            out = model(b.input_ids, b.text_mask, images, torch.ones_like(b.has_image))
            predicted_match = head(out.hidden[:, 0]).argmax(-1) == 1
            hits += int((predicted_match != swapped).sum())
            total += len(predicted_match)
    return hits / total


AUTO_HELDOUT = -1  # hold out 2% of the products with a photo and a title, at most HELDOUT_PAIRS / 2


def heldout_rows(data: ProductArrays, n: int) -> np.ndarray:
    """``n`` products with a photo and a title (``AUTO_HELDOUT``: 2% of them, at most 1,000), chosen by a
    hash of their ids (stable across runs and machines), kept out of training for the held-out ITM
    measurement; none when the catalog has fewer than 4n such products."""
    both = np.flatnonzero(data.has_image & data.has_text)
    if n == AUTO_HELDOUT:
        n = min(HELDOUT_PAIRS // 2, len(both) // 50)
    if n <= 0 or len(both) < 4 * n:
        return np.zeros(0, dtype=np.int64)
    order = sorted(both, key=lambda r: hashlib.sha256(data.ids[r].encode()).hexdigest())
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def train(data: ProductArrays, tokenizer, run_dir: str | Path, model_cfg: ModelConfig, cfg: TrainConfig,
          objectives: ObjectiveConfig | None = None, warm: TrainConfig | None = None, heldout: int = 0,
          resume: bool = False, progress: bool = True, device: str | None = None,
          log: Callable[[str], None] = print, extra: dict | None = None) -> TrainResult:
    """Pre-train ITEm on ``data`` and export the encoder (with its fitted shape slice) to ``run_dir``.

    With ``warm`` (``config.warm_start_config``) the image stem is first trained alone (``warmstart``, in
    ``run_dir/warmstart``, reused when done; hard negatives need it). View
    alignment and hard ITM negatives (``objectives.align``, ``objectives.itm_hard``) use the teacher
    embeddings and the warm start's photo embeddings kept there. ``heldout`` products are
    kept out of training and ITM is measured on them at every checkpoint. Under torchrun each rank takes
    its share of every global batch (``cfg.batch_size`` rows in all); rank 0 alone logs and writes
    checkpoints. With ``resume`` the run goes on from its newest good checkpoint with the
    configuration saved there.
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
        heldout = int(meta.get("heldout", 0))
    held = heldout_rows(data, heldout)
    model = build_model(model_cfg, cfg.seed)
    teacher, hard = _prepare(data, run_dir, model, objectives, warm, held, progress, device, log)
    titles = cached_teacher(data, run_dir / "warmstart", log, title_only=True) if objectives.align > 0 else None
    heads = ItemObjectives(model, objectives, teacher.shape[1] if teacher is not None else None)
    task = Pretraining(model, heads, data, tokenizer, teacher, hard, held, titles)
    engine = Engine(task, cfg, run_dir, ranks=ranks, device=dev, ckpt=ckpt, progress=progress, log=log,
                    meta={"model": model_cfg.to_dict(), "objectives": objectives.to_dict(), "heldout": heldout},
                    data_id=fingerprint(data.ids))
    result = engine.run()
    model.cpu()
    if ranks.main:
        if model.shape is not None:
            _fit_shape_slice(model, data, log)
        save_model(run_dir, model, tokenizer, {"train": cfg.to_dict(), "objectives": objectives.to_dict(),
                                               "warm_start": warm.to_dict() if warm else None, "heldout": heldout,
                                               "trained_steps": result.steps, **(extra or {})})
    if ranks.world > 1:
        torch.distributed.barrier()
    return result


def _prepare(data: ProductArrays, run_dir: Path, model: ItemModel, objectives: ObjectiveConfig,
             warm: TrainConfig | None, held: np.ndarray, progress: bool, device: str | None,
             log: Callable[[str], None]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The stages before ITEm: the image warm start (its stem copied into ``model``), the teacher
    embeddings, the mined hard negatives. All cached in ``run_dir/warmstart``."""
    folder = run_dir / "warmstart"
    train_rows = np.setdiff1d(np.arange(len(data)), held)
    if warm is not None:
        warm_start(data, folder, model.cfg, warm, rows=train_rows, progress=progress, device=device, log=log)
        load_warm_stem(model, folder)
    teacher = cached_teacher(data, folder, log) if (objectives.align > 0 or objectives.itm_hard > 0) else None
    hard = None
    if objectives.itm_hard > 0:
        if warm is None:
            raise ValueError("hard ITM negatives are mined from the image warm start: give it epochs")
        hard = mine_hard_negatives(data, folder, model.cfg, teacher, train_rows, log=log)
    return teacher, hard


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

