"""The five ITEm objectives: masking and swapping in one place, each head next to its loss.

One shared forward pass serves all five: ITM negatives are swapped in and text/patches masked
for every row (so masking cannot tell ITM which rows are negatives); the masked-prediction
losses are then computed on matched rows only. The global heads read nothing but the final
``[CLS]`` state and the masked position's position embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .augment import random_views
from .config import ObjectiveConfig
from .data import Batch
from .images import HOG_BINS, HOG_CELLS, patch_hog, patchify
from .model import EncoderOutput, ItemModel

IGNORE = -100


@dataclass
class MaskedBatch:
    """A batch after ITM swapping and MLM/MIM masking."""

    input_ids: torch.Tensor  # (B, T) with [MASK] / random / kept tokens at MLM positions
    text_mask: torch.Tensor  # (B, T) bool
    images: torch.Tensor | None  # (B, S, S, 3) uint8 with ITM negatives' images swapped in
    has_image: torch.Tensor  # (B,) bool
    mlm_labels: torch.Tensor  # (B, T) original ids at chosen positions, IGNORE elsewhere
    mim_mask: torch.Tensor | None  # (B, N) bool: patch replaced by [MASK]
    itm_labels: torch.Tensor  # (B,) 1 matched, 0 swapped, IGNORE when the row lacks a modality
    matched: torch.Tensor  # (B,) bool: rows whose image is their own (masked losses use these)
    has_text: torch.Tensor  # (B,) bool
    title_dropped: torch.Tensor  # (B,) bool: shown as image only; every title word is a global MLM label
    views: torch.Tensor | None = None  # (B, 2, S, S, 3) uint8: two random views of each row's own photo

    def original_ids(self) -> torch.Tensor:
        """Token ids before MLM masking (the labels hold the originals of every chosen position).
        Not for title-dropped rows, whose input was rebuilt as ``[CLS] [SEP]``."""
        return torch.where(self.mlm_labels != IGNORE, self.mlm_labels, self.input_ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> "MaskedBatch":
        """The rows ``rows`` of every field (a rank's or a micro-batch's share)."""
        return MaskedBatch(**{k: None if v is None else v[rows] for k, v in vars(self).items()})

    def to(self, device: torch.device) -> "MaskedBatch":
        return MaskedBatch(**{k: None if v is None else v.to(device, non_blocking=True)
                              for k, v in vars(self).items()})


def _choose_donors(n: int, negatives: torch.Tensor, with_image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each negative row, another row (with an image) to take the image from."""
    pool = torch.nonzero(with_image).squeeze(1)
    donors = pool[torch.randint(len(pool), (len(negatives),), generator=g)]
    # Never "swap" a row with itself: shift such picks to the next row of the pool.
    same = donors == negatives
    if same.any():
        pos = torch.searchsorted(pool, donors[same])
        donors[same] = pool[(pos + 1) % len(pool)]
    return donors


def mask_batch(
    batch: Batch, cfg: ObjectiveConfig, num_patches: int, special_ids: list[int], mask_id: int,
    vocab_size: int, g: torch.Generator,
) -> MaskedBatch:
    """Swap ITM negatives and mask text and patches, all from generator ``g`` (reproducible)."""
    b = len(batch)
    w = cfg.weights()
    images = batch.images
    itm_labels = torch.full((b,), IGNORE, dtype=torch.long)
    matched = torch.ones(b, dtype=torch.bool)
    both = batch.has_text & batch.has_image
    dropped = torch.zeros(b, dtype=torch.bool)
    if cfg.title_dropout > 0 and images is not None:
        # Drawn only when on, so runs without it keep their exact random stream.
        dropped = both & (torch.rand(b, generator=g) < cfg.title_dropout)
    if w["itm"] > 0 and images is not None and int((both & ~dropped).sum()) >= 2:
        itm_labels[both & ~dropped] = 1
        eligible = torch.nonzero(both & ~dropped).squeeze(1)
        n_neg = int(round(cfg.itm_negative_ratio * len(eligible)))
        negatives = eligible[torch.randperm(len(eligible), generator=g)[:n_neg]].sort().values
        if n_neg:
            donors = _choose_donors(b, negatives, both, g)
            images = images.clone()
            images[negatives] = batch.images[donors]
            itm_labels[negatives] = 0
            matched[negatives] = False

    input_ids = batch.input_ids.clone()
    mlm_labels = torch.full_like(input_ids, IGNORE)
    if (w["mlm"] > 0 or w["global_mlm"] > 0) and cfg.mlm_prob > 0:
        special = torch.isin(input_ids, torch.tensor(special_ids))
        candidates = batch.text_mask & ~special & batch.has_text.unsqueeze(1)
        chosen = candidates & (torch.rand(input_ids.shape, generator=g) < cfg.mlm_prob)
        mlm_labels[chosen] = input_ids[chosen]
        action = torch.rand(input_ids.shape, generator=g)
        to_mask = chosen & (action < 0.8)
        to_random = chosen & (action >= 0.8) & (action < 0.9)
        input_ids[to_mask] = mask_id
        random_ids = torch.randint(vocab_size, input_ids.shape, generator=g)
        input_ids[to_random] = random_ids[to_random]

    text_mask = batch.text_mask
    if bool(dropped.any()):
        # The row becomes what an image-only query is, [CLS] [SEP] + patches; its title words (at their
        # own positions) are all labels. The hidden positions hold [MASK] so nothing can leak.
        text_mask = text_mask.clone()
        lengths = batch.text_mask.sum(1)
        for r in torch.nonzero(dropped).squeeze(1).tolist():
            n = int(lengths[r])
            mlm_labels[r] = IGNORE
            mlm_labels[r, 1:n - 1] = batch.input_ids[r, 1:n - 1]
            input_ids[r, 1] = batch.input_ids[r, n - 1]
            input_ids[r, 2:] = mask_id
            text_mask[r, 2:] = False

    mim_mask = None
    if images is not None and (w["mim"] > 0 or w["global_mim"] > 0) and cfg.mim_ratio > 0:
        # Exactly round(ratio * N) patches per image row, as in MAE's random_masking.
        k = max(1, int(round(cfg.mim_ratio * num_patches)))
        noise = torch.rand(b, num_patches, generator=g)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        mim_mask = (ranks < k) & (batch.has_image & ~dropped).unsqueeze(1)

    views = None
    if w["image_contrastive"] > 0 and images is not None:
        # Drawn last, so runs without the term keep their exact random stream. The row's own photo,
        # not an ITM donor's: the two views only need to share a product.
        views = torch.stack([random_views(batch.images, g), random_views(batch.images, g)], dim=1)

    return MaskedBatch(input_ids, text_mask, images, batch.has_image, mlm_labels, mim_mask,
                       itm_labels, matched, batch.has_text, dropped, views)


def patch_targets(images: torch.Tensor, patch_size: int, kind: str = "pixels") -> torch.Tensor:
    """MIM targets, (B, N, D): each patch's pixels normalised by its own mean and variance (as in MAE),
    or with ``kind="hog"`` its histograms of oriented gradients (:func:`patch_hog`)."""
    if kind == "hog":
        return patch_hog(images, patch_size)
    x = patchify(images.float() / 255.0, patch_size)  # (B, N, p*p*3)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


def target_dim(kind: str, patch_size: int) -> int:
    """Width of one patch's MIM target."""
    return HOG_CELLS * HOG_CELLS * HOG_BINS if kind == "hog" else patch_size * patch_size * 3


class _Transform(nn.Sequential):
    """Dense -> GELU -> LayerNorm, as in BERT's prediction heads."""

    def __init__(self, d_in: int, hidden: int, eps: float) -> None:
        super().__init__(nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))


class ITMHead(nn.Module):
    """Matched / not matched from the final [CLS] state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.net(cls)  # (B, 2)


class WordHead(nn.Module):
    """Predicts a word; the output matrix is tied to the input word embeddings.

    ``d_in`` is H for MLM (own output) and 2H for global MLM ([CLS] ++ position embedding).
    """

    def __init__(self, d_in: int, hidden: int, vocab: int, eps: float) -> None:
        super().__init__()
        self.transform = _Transform(d_in, hidden, eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), word_weight, self.bias)  # (K, vocab)


class PatchHead(nn.Module):
    """Regresses a patch's MIM target (d_in: H for MIM, 2H for global MIM)."""

    def __init__(self, d_in: int, hidden: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.transform = _Transform(d_in, hidden, eps)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(x))  # (K, target_dim)


class ContrastiveHead(nn.Module):
    """Symmetric in-batch InfoNCE between two L2-normalised views, with a learned temperature (CLIP).
    With ``proj`` > 0 both views first go through one MLP projection to ``proj`` dims (SimCLR)."""

    def __init__(self, hidden: int = 0, proj: int = 0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.proj = (nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, proj))
                     if proj > 0 else None)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            a, b = (F.normalize(self.proj(x), dim=-1) for x in (a, b))
        # fp32 similarities: under bf16 autocast a cosine is rounded to ~0.004, times a scale up to 100.
        with torch.autocast(a.device.type, enabled=False):
            logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * (a.float() @ b.float().T)
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def view_embeddings(model: ItemModel, mb: MaskedBatch, rows: torch.Tensor, view: str,
                    images: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled embeddings of ``rows`` seen through one modality, built exactly as the encoder sees an
    image-only product (``[CLS] [SEP]`` + clean patches) or a title-only one (clean tokens, no image).
    ``images`` (already the rows' own) replaces the batch's photos in the image view."""
    if view == "image":
        # [CLS] and [SEP] from the masked ids: specials are never masked, and a title-dropped row's
        # ids are already [CLS] [SEP] (its original ids would put a title word where [SEP] goes).
        ids, text_mask = mb.input_ids[rows], mb.text_mask[rows]
        sep = ids.gather(1, (text_mask.sum(1, keepdim=True) - 1).clamp(min=0))
        ids = torch.cat([ids[:, :1], sep], dim=1)
        pixels = mb.images[rows] if images is None else images
        out = model(ids, torch.ones_like(ids, dtype=torch.bool), pixels, mb.has_image[rows], None)
    else:
        out = model(mb.original_ids()[rows], mb.text_mask[rows], None, None, None)
    return model.pool(out)


class ItemObjectives(nn.Module):
    """Heads and losses of the enabled objectives; sums them with their weights."""

    def __init__(self, model: ItemModel, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # When set, only these objectives are summed into ``loss`` (a curriculum phase, e.g. ITM first);
        # the others are still computed and logged.
        self.only: tuple[str, ...] | None = None
        mc = model.cfg
        h, eps = mc.hidden_size, mc.layer_norm_eps
        w = cfg.weights()
        self.heads = nn.ModuleDict()
        if w["itm"] > 0:
            self.heads["itm"] = ITMHead(h)
        if w["mlm"] > 0:
            self.heads["mlm"] = WordHead(h, h, mc.vocab_size, eps)
        if w["global_mlm"] > 0:
            self.heads["global_mlm"] = WordHead(2 * h, h, mc.vocab_size, eps)
        d_target = target_dim(cfg.mim_target, mc.patch_size)
        if w["mim"] > 0:
            self.heads["mim"] = PatchHead(h, h, d_target, eps)
        if w["global_mim"] > 0:
            self.heads["global_mim"] = PatchHead(2 * h, h, d_target, eps)
        if w["contrastive"] > 0:
            if cfg.contrastive_dims > h:
                raise ValueError(f"contrastive_dims={cfg.contrastive_dims} exceeds the embedding width {h}")
            self.heads["contrastive"] = ContrastiveHead()
        if w["image_contrastive"] > 0:
            self.heads["image_contrastive"] = ContrastiveHead(h, cfg.image_contrastive_proj)

    def _contrastive_part(self, emb: torch.Tensor) -> torch.Tensor:
        """What the contrastive term compares: the whole (unit) embedding, or its last
        ``contrastive_dims`` coordinates scaled back to unit length."""
        k = self.cfg.contrastive_dims
        return emb if k == 0 else F.normalize(emb[:, -k:], dim=-1)

    def global_word_logits(self, model: ItemModel, out: EncoderOutput, rows: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
        """Global MLM: logits for text ``positions`` of ``rows`` from [CLS] + position embedding only."""
        cls = out.hidden[rows, 0]
        pos = model.text_positions.weight[positions].to(cls.dtype)
        return self.heads["global_mlm"](torch.cat([cls, pos], dim=-1), model.word_embeddings.weight)

    def global_patch_pred(self, model: ItemModel, out: EncoderOutput, rows: torch.Tensor,
                          patches: torch.Tensor) -> torch.Tensor:
        """Global MIM: targets of ``patches`` of ``rows`` from [CLS] + the patch's position embedding only."""
        cls = out.hidden[rows, 0]
        pos = model.image_pos[0, patches].to(cls.dtype)
        return self.heads["global_mim"](torch.cat([cls, pos], dim=-1))

    def summed_weights(self) -> dict[str, float]:
        """The weights of the objectives that count in ``loss`` now (all of them, or those in ``only``)."""
        return {k: w for k, w in self.cfg.weights().items() if self.only is None or k in self.only}

    def forward(self, model: ItemModel, out: EncoderOutput, mb: MaskedBatch) -> dict[str, torch.Tensor]:
        """Each enabled objective's loss (fp32 scalars), ``loss`` their weighted sum, and ``itm_acc``."""
        w = self.cfg.weights()
        losses: dict[str, torch.Tensor] = {}
        if "itm" in self.heads and bool((mb.itm_labels != IGNORE).any()):
            rows = mb.itm_labels != IGNORE
            logits = self.heads["itm"](out.hidden[rows, 0]).float()
            losses["itm"] = F.cross_entropy(logits, mb.itm_labels[rows])
            losses["itm_acc"] = (logits.argmax(-1) == mb.itm_labels[rows]).float().mean().detach()

        text_sel = (mb.mlm_labels != IGNORE) & mb.matched.unsqueeze(1)
        if bool(text_sel.any()):
            rows, positions = torch.nonzero(text_sel, as_tuple=True)
            labels = mb.mlm_labels[rows, positions]
            own = ~mb.title_dropped[rows]  # a dropped title's positions have no output of their own
            if "mlm" in self.heads and bool(own.any()):
                logits = self.heads["mlm"](out.hidden[rows[own], positions[own]], model.word_embeddings.weight)
                losses["mlm"] = F.cross_entropy(logits.float(), labels[own])
            if "global_mlm" in self.heads:
                logits = self.global_word_logits(model, out, rows, positions)
                per_word = F.cross_entropy(logits.float(), labels, reduction="none")
                losses["global_mlm"] = per_word.mean()
                if not bool(own.all()):  # logged: how well the image alone spells its title
                    losses["title_from_image"] = per_word[~own].mean().detach()

        if mb.mim_mask is not None:
            patch_sel = mb.mim_mask & mb.matched.unsqueeze(1)
            # Title-dropped rows (all patches visible, as an image-only query) may rebuild every patch
            # from [CLS]: global MIM then also teaches the image-only [CLS] what the picture shows.
            whole = mb.title_dropped.unsqueeze(1).expand_as(patch_sel)
            if not (self.cfg.title_dropout_mim and "global_mim" in self.heads):
                whole = torch.zeros_like(patch_sel)
            if bool(patch_sel.any()) or bool(whole.any()):
                targets = patch_targets(mb.images, model.cfg.patch_size, self.cfg.mim_target)
                rows, patches = torch.nonzero(patch_sel, as_tuple=True)
                if "mim" in self.heads and len(rows):
                    pred = self.heads["mim"](out.hidden[rows, out.text_len + patches])
                    losses["mim"] = F.mse_loss(pred.float(), targets[rows, patches])
                if "global_mim" in self.heads:
                    rows, patches = torch.nonzero(patch_sel | whole, as_tuple=True)
                    pred = self.global_patch_pred(model, out, rows, patches)
                    per_patch = F.mse_loss(pred.float(), targets[rows, patches], reduction="none").mean(-1)
                    losses["global_mim"] = per_patch.mean()
                    if bool(whole.any()):  # logged: how well an image-only [CLS] holds its own picture
                        losses["image_from_image"] = per_patch[whole[rows, patches]].mean().detach()

        if "contrastive" in self.heads and mb.images is not None:
            # Full products: the shared pass's matched rows (masked, like any augmented view).
            rows = mb.matched & mb.has_image & mb.has_text & ~mb.title_dropped
            if int(rows.sum()) >= 2:
                full = model.pool(out)[rows]
                if self.cfg.contrastive_stop_grad:
                    full = full.detach()
                full = self._contrastive_part(full)  # once, shared by every view
                terms = [self.heads["contrastive"](self._contrastive_part(view_embeddings(model, mb, rows, v)), full)
                         for v in self.cfg.views]
                losses["contrastive"] = sum(terms) / len(terms)

        if "image_contrastive" in self.heads and mb.views is not None:
            rows = mb.has_image
            if int(rows.sum()) >= 2:
                a, b = (view_embeddings(model, mb, rows, "image", mb.views[rows, i]) for i in (0, 1))
                losses["image_contrastive"] = self.heads["image_contrastive"](a, b)

        summed = self.summed_weights()
        total = sum((summed[k] * v for k, v in losses.items() if k in summed), torch.zeros(()))
        losses["loss"] = total
        return losses


def special_token_ids(tokenizer) -> list[int]:
    return [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
