"""The image warm start ("align before fuse"): the image stem learns alone, before ITEm's joint training.

A randomly initialised image side next to a pretrained text encoder never leaves chance in ITEm's
objectives on a CPU budget (docs/ablations.md). Here the stem alone (a small CNN: cheap enough to
see every photo of the catalog many times) learns to map each photo close to the frozen MiniLM
embedding of its own product's text, by in-batch InfoNCE over large batches. Listings whose texts
are (near) the same, such as the colour variants of one garment, are all positives for one another,
never negatives. ITEm then starts from that stem; the teacher embeddings are kept for the
view-alignment objective and for mining hard ITM negatives.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..data.arrays import ProductArrays
from ..model.encoder import minilm_bert
from ..model.losses import SAME_TEXT, contrastive_loss

# Two photos whose warm-start embeddings are this close are copies of one picture: never a negative.
SAME_PHOTO = 0.95
from ..model.stems import make_image_stem, stem_patches
from ..runtime import autocast, pick_device, setup_distributed
from .engine import Engine, Task, TrainResult, fingerprint, resolve, resume_point

TEACHER_FILE = "teacher.npy"
TITLE_TEACHER_FILE = "teacher_title.npy"
STATE_FILE = "image_alignment.safetensors"  # the stem (what ITEm keeps) and the warm start's head
HARD_FILE = "hard_negatives.npy"
DONE_FILE = "done.json"


@torch.inference_mode()
def teacher_embeddings(data: ProductArrays, title_only: bool = False, batch_size: int = 256,
                       device: str | None = None) -> np.ndarray:
    """float32 (n, 384): all-MiniLM-L6-v2's sentence embedding (mean-pooled, L2-normalised) of each
    product's text as the model reads it (or its title alone); rows without text are zero."""
    dev = pick_device(device)
    bert = minilm_bert().to(dev)
    out = np.zeros((len(data), bert.config.hidden_size), dtype=np.float32)
    rows = np.flatnonzero(data.has_text)
    order = rows[np.argsort(data.lengths[rows], kind="stable")]  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        b = data.batch(idx, title_only=title_only).to(dev)
        hidden = bert(input_ids=b.input_ids, attention_mask=b.text_mask.long()).last_hidden_state  # (B, T, H)
        m = b.text_mask.unsqueeze(-1).float()
        out[idx] = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).cpu().numpy()
    return out


@dataclass
class AlignedBatch:
    images: torch.Tensor  # (B, S, S, 3) uint8
    targets: torch.Tensor  # (B, D) the teacher embeddings of the products' texts

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, rows: slice) -> "AlignedBatch":
        return AlignedBatch(self.images[rows], self.targets[rows])

    def to(self, device: torch.device) -> "AlignedBatch":
        return AlignedBatch(self.images.to(device), self.targets.to(device))


class ImageAlignment(Task):
    """The image stem + a small pooling head, trained to meet the teacher embedding of the photo's text.

    (B, S, S, 3) uint8 -> stem -> (B, N, H) patch vectors -> LayerNorm -> all patches in place,
    flattened -> linear to the teacher's width. Only the stem is kept for ITEm; the head is the warm start's own.
    """

    log_keys = ("loss", "i2t_acc", "t2i_acc", "temperature")
    whole_batch = True  # in-batch negatives

    def __init__(self, cfg: ModelConfig, data: ProductArrays, teacher: np.ndarray,
                 rows: np.ndarray | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        name, stem = make_image_stem(cfg)
        setattr(self, name, stem)
        self.stem_name = name
        # The head reads every patch in place (not their mean): where an edge is tells garments apart.
        self.head = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Flatten(1),
                                  nn.Linear(cfg.num_patches * cfg.hidden_size, teacher.shape[1]))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.data, self.teacher = data, torch.from_numpy(teacher)
        usable = data.has_image & data.has_text
        self.rows = np.flatnonzero(usable) if rows is None else rows[usable[rows]]

    def parts(self) -> dict[str, nn.Module]:
        return {"model": self}

    def __len__(self) -> int:
        return len(self.rows)

    def starts_from_scratch(self, name: str) -> bool:
        return True

    def batch(self, rows: np.ndarray, g: torch.Generator) -> AlignedBatch:
        picked = self.rows[rows]
        images = torch.from_numpy(self.data.images[picked])  # (B, S, S, 3)
        flip = torch.rand(len(picked), generator=g) < 0.5  # a mirrored photo shows the same product
        images = torch.where(flip[:, None, None, None], images.flip(2), images)
        return AlignedBatch(images, self.teacher[torch.from_numpy(picked)])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, D) L2-normalised photo embeddings in the teacher's space."""
        patches = stem_patches(self, self.cfg, images)  # (B, N, H)
        return F.normalize(self.head(patches).float(), dim=-1)

    def forward(self, b: AlignedBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            same = (b.targets @ b.targets.T) >= SAME_TEXT  # (B, B): the same product's text
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return contrastive_loss(self.embed(b.images), b.targets, scale, positives=same)


BOOKKEEPING = ("save_every", "keep_checkpoints", "log_every")  # change no weight of the stage


def _same_stage(saved: dict | None, key: dict) -> bool:
    """Whether a saved warm-start key trains the same stem as ``key`` (checkpointing aside)."""
    if saved is None or saved.keys() != key.keys():
        return False
    strip = lambda k: {**k, "train": {f: v for f, v in k["train"].items() if f not in BOOKKEEPING}}
    return strip(saved) == strip(key)


def warm_start(data: ProductArrays, run_dir: str | Path, model_cfg: ModelConfig, cfg: TrainConfig, *,
               rows: np.ndarray | None = None, progress: bool = True, device: str | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Train the image stem of ``model_cfg`` on the photos and texts of ``data``'s ``rows`` (default all)
    into ``run_dir``; returns the folder, which then holds the trained state and ``teacher.npy``. A
    folder already done for the same catalog, rows and configs is reused as it is (the stage is
    cached); an interrupted one resumes from its last checkpoint."""
    run_dir = Path(run_dir)
    ranks, dev = setup_distributed(device)
    cfg = resolve(cfg, dev, 1.0)
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    # What the stem depends on: not how the final embedding weighs [CLS] or a shape slice.
    stem_cfg = dataclasses.replace(model_cfg, shape_dims=0, shape_weight=0.1)
    key = {"model": stem_cfg.to_dict(), "train": cfg.to_dict(), "data": fingerprint([data.ids[r] for r in rows])}
    done = run_dir / DONE_FILE
    if done.is_file() and _same_stage(json.loads(done.read_text()).get("key"), key):
        log(f"image warm start: reusing {run_dir}")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher = cached_teacher(data, run_dir, log)
    task = ImageAlignment(model_cfg, data, teacher, rows)
    if len(task) < 2:
        raise ValueError(f"the image warm start needs at least 2 products with a photo and a title, got {len(task)}")
    ckpt = resume_point(run_dir, (run_dir / "checkpoints").is_dir(), log)
    if ckpt is not None and not _same_stage({k: ckpt.meta.get(k) for k in ("model", "train")},
                                            {"model": key["model"], "train": cfg.to_dict()}):
        log(f"image warm start: {run_dir} holds another configuration: starting it again")
        ckpt = None
    log(f"image warm start: {len(task)} photos, {cfg.epochs or 1:g} epochs in batches of {cfg.batch_size}")
    engine = Engine(task, cfg, run_dir, ranks=ranks, device=dev, ckpt=ckpt, progress=progress, log=log,
                    meta={"model": key["model"]}, data_id=key["data"])
    result: TrainResult = engine.run()
    if ranks.main:
        save_file({k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()}, str(run_dir / STATE_FILE))
        done.write_text(json.dumps({"key": key, "steps": result.steps, "seconds": round(result.seconds, 1),
                                    "last": result.last}, indent=2))
        log(f"image warm start: {result.steps} steps in {result.seconds:.0f}s, last " +
            ", ".join(f"{k}={v:.3f}" for k, v in result.last.items()))
    return run_dir


def cached_teacher(data: ProductArrays, run_dir: Path, log: Callable[[str], None],
                   title_only: bool = False) -> np.ndarray:
    """The teacher embeddings of ``data``'s texts (or titles alone), computed once per catalog and kept
    in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data_id = fingerprint(data.ids)
    path = run_dir / (TITLE_TEACHER_FILE if title_only else TEACHER_FILE)
    stamp = path.with_name(path.name + ".json")
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("data") == data_id:
        return np.load(path)
    log(f"teacher: MiniLM embeddings of {int(data.has_text.sum())} product {'titles' if title_only else 'texts'}")
    teacher = teacher_embeddings(data, title_only=title_only)
    np.save(path, teacher)
    stamp.write_text(json.dumps({"data": data_id}))
    return teacher


def load_warm_stem(model: nn.Module, run_dir: str | Path) -> None:
    """Copy the warm-started stem into ``model`` (an ItemModel, or anything with the same stem)."""
    name, _ = make_image_stem(model.cfg)
    state = load_file(str(Path(run_dir) / STATE_FILE))
    getattr(model, name).load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def load_alignment(data: ProductArrays, run_dir: str | Path, model_cfg: ModelConfig,
                   teacher: np.ndarray) -> ImageAlignment:
    """The trained warm-start network (stem + head) of ``run_dir``, in eval mode."""
    task = ImageAlignment(model_cfg, data, teacher)
    task.load_state_dict(load_file(str(Path(run_dir) / STATE_FILE)))
    return task.eval()


def mine_hard_negatives(data: ProductArrays, run_dir: str | Path, model_cfg: ModelConfig, teacher: np.ndarray,
                        rows: np.ndarray, k: int = 16, log: Callable[[str], None] = print) -> np.ndarray:
    """(n, k) int64: for each of ``rows`` the ``k`` photos (among ``rows``) the warm start scores closest to
    its text, never one of the same product (text within ``SAME_TEXT`` of its own) nor a near copy of
    its own photo; -1 pads rows with fewer, and fills every row not in ``rows``. Cached in ``run_dir``."""
    run_dir = Path(run_dir)
    path, stamp = run_dir / HARD_FILE, run_dir / (HARD_FILE + ".json")
    key = {"data": fingerprint(data.ids), "rows": fingerprint([str(r) for r in rows]), "k": k,
           "state": json.loads((run_dir / DONE_FILE).read_text())["key"]}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        return np.load(path)
    usable = rows[data.has_image[rows] & data.has_text[rows]]
    photos = photo_embeddings(load_alignment(data, run_dir, model_cfg, teacher), usable)  # (m, D)
    texts = teacher[usable]
    hard = np.full((len(data), k), -1, dtype=np.int64)
    for start in range(0, len(usable), 1024):
        part = slice(start, start + 1024)
        scores = texts[part] @ photos.T  # (c, m): how well each photo matches each text
        same = (texts[part] @ texts.T >= SAME_TEXT) | (photos[part] @ photos.T >= SAME_PHOTO)
        scores[same] = -np.inf
        kk = min(k, scores.shape[1] - 1)
        top = np.argpartition(-scores, kk, axis=1)[:, :kk] if kk > 0 else np.zeros((len(scores), 0), dtype=np.int64)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
        found = np.take_along_axis(scores, top, axis=1) > -np.inf
        hard[usable[part], : top.shape[1]] = np.where(found, usable[top], -1)
    np.save(path, hard)
    stamp.write_text(json.dumps(key))
    log(f"mined {k} hard ITM negatives for each of {len(usable)} products")
    return hard


@torch.inference_mode()
def photo_embeddings(task: ImageAlignment, rows: np.ndarray, batch_size: int = 256,
                     precision: str = "fp32") -> np.ndarray:
    """(len(rows), D) warm-start embeddings of the photos of ``rows`` (for mining and diagnostics)."""
    task.eval()
    dev = next(task.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        images = torch.from_numpy(task.data.images[rows[start : start + batch_size]]).to(dev)
        with autocast(precision, dev):
            out.append(task.embed(images).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, task.teacher.shape[1]), dtype=np.float32)

