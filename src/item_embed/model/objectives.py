"""The five ITEm objectives: masking and swapping in one place, each head next to its loss.

One shared forward pass serves all five: ITM negatives are swapped in and text/patches masked
for every row (so masking cannot tell ITM which rows are negatives); the masked-prediction
losses are then computed on matched rows only. The global heads read nothing but the final
``[CLS]`` state and the masked position's position embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ObjectiveConfig
from ..data.arrays import Batch
from ..data.images import patchify
from .encoder import EncoderOutput, ItemModel
from .losses import SAME_TEXT, contrastive_loss

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
    # For view alignment (None without it): each row's title alone, and the teacher embeddings of its
    # text and of its title.
    title_ids: torch.Tensor | None = None  # (B, Tt) [CLS] title [SEP], padded
    title_mask: torch.Tensor | None = None  # (B, Tt) bool
    teacher: torch.Tensor | None = None  # (B, D) float32, L2-normalised (zero without text)
    teacher_title: torch.Tensor | None = None  # (B, D) the same of the title alone

    # Which rows and positions each loss reads (``Selection``), made on the host by ``to``.
    chosen: "Selection | None" = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {k: v for k, v in vars(self).items() if k != "chosen"}

    def select(self, rows: slice) -> "MaskedBatch":
        """The rows ``rows`` of every field (a rank's or a micro-batch's share)."""
        return MaskedBatch(**{k: None if v is None else v[rows] for k, v in self._tensors().items()})

    def to(self, device: torch.device) -> "MaskedBatch":
        """This batch on ``device``, with its :class:`Selection` made first (from the host's tensors when
        the batch is still on the host, as the engine moves it)."""
        chosen = self.chosen if self.chosen is not None else Selection.of(self)
        return MaskedBatch(**{k: None if v is None else v.to(device, non_blocking=True)
                              for k, v in self._tensors().items()}, chosen=chosen.to(device))


@dataclass
class Selection:
    """The rows and positions each loss reads, as index tensors made from a batch's masks while they are
    still on the host. The losses gather with these, never with a boolean mask or ``bool(tensor)``, both
    of which make the host wait for the device to count the rows (a GPU step would stall on each)."""

    itm_rows: torch.Tensor  # (K,) rows with an ITM label
    text_rows: torch.Tensor  # (K_t,) MLM: the row and position of each chosen token of a matched row
    text_positions: torch.Tensor
    patch_rows: torch.Tensor  # (K_p,) MIM: the row and patch of each masked patch of a matched row
    patch_ids: torch.Tensor
    joint_rows: torch.Tensor  # view alignment: matched rows with text (and a teacher embedding)
    title_rows: torch.Tensor  # rows with text, whose title view is encoded
    title_len: int  # the longest title among ``title_rows``

    @classmethod
    def of(cls, mb: MaskedBatch) -> "Selection":
        none = torch.zeros(0, dtype=torch.long, device=mb.input_ids.device)
        itm_rows = torch.nonzero(mb.itm_labels != IGNORE).squeeze(1)
        text_rows, text_positions = torch.nonzero((mb.mlm_labels != IGNORE) & mb.matched.unsqueeze(1), as_tuple=True)
        patch_rows, patch_ids = none, none
        if mb.mim_mask is not None:
            patch_rows, patch_ids = torch.nonzero(mb.mim_mask & mb.matched.unsqueeze(1), as_tuple=True)
        joint_rows, title_rows, title_len = none, none, 0
        if mb.teacher is not None:
            texted = mb.has_text & (mb.teacher.abs().sum(1) > 0)
            joint_rows = torch.nonzero(mb.matched & texted).squeeze(1)
            title_rows = torch.nonzero(texted).squeeze(1)
            if len(title_rows):
                title_len = int(mb.title_mask[title_rows].sum(1).max())
        return cls(itm_rows, text_rows, text_positions, patch_rows, patch_ids, joint_rows, title_rows, title_len)

    def to(self, device: torch.device) -> "Selection":
        return Selection(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
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
    if w["itm"] > 0 and images is not None and int(both.sum()) >= 2:
        itm_labels[both] = 1
        eligible = torch.nonzero(both).squeeze(1)
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

    mim_mask = None
    if images is not None and (w["mim"] > 0 or w["global_mim"] > 0) and cfg.mim_ratio > 0:
        # Exactly round(ratio * N) patches per image row, as in MAE's random_masking.
        k = max(1, int(round(cfg.mim_ratio * num_patches)))
        noise = torch.rand(b, num_patches, generator=g)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        mim_mask = (ranks < k) & batch.has_image.unsqueeze(1)

    return MaskedBatch(input_ids, batch.text_mask, images, batch.has_image, mlm_labels, mim_mask, itm_labels, matched,
                       batch.has_text)


def patch_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MIM targets, (B, N, p*p*3): each patch's pixels normalised by its own mean and variance (as in MAE)."""
    x = patchify(images.float() / 255.0, patch_size)  # (B, N, p*p*3)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


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


class ItemObjectives(nn.Module):
    """Heads and losses of the enabled objectives; sums them with their weights."""

    def __init__(self, model: ItemModel, cfg: ObjectiveConfig, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        mc = model.cfg
        h, eps, d_target = mc.hidden_size, mc.layer_norm_eps, mc.patch_dim
        w = cfg.weights()
        self.heads = nn.ModuleDict()
        if w["itm"] > 0:
            self.heads["itm"] = ITMHead(h)
        if w["mlm"] > 0:
            self.heads["mlm"] = WordHead(h, h, mc.vocab_size, eps)
        if w["global_mlm"] > 0:
            self.heads["global_mlm"] = WordHead(2 * h, h, mc.vocab_size, eps)
        if w["mim"] > 0:
            self.heads["mim"] = PatchHead(h, h, d_target, eps)
        if w["global_mim"] > 0:
            self.heads["global_mim"] = PatchHead(2 * h, h, d_target, eps)
        if w["align"] > 0:
            self.heads["align"] = AlignHead(h, teacher_dim or h)

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

    def forward(self, model: ItemModel, out: EncoderOutput, mb: MaskedBatch) -> dict[str, torch.Tensor]:
        """Each enabled objective's loss (fp32 scalars), ``loss`` their weighted sum, and ``itm_acc``.
        Which objectives a batch has is known from ``mb.chosen`` on the host, before the device computes."""
        sel = mb.chosen if mb.chosen is not None else Selection.of(mb)
        losses: dict[str, torch.Tensor] = {}
        if "itm" in self.heads and len(sel.itm_rows):
            rows = sel.itm_rows
            logits = self.heads["itm"](out.hidden[rows, 0]).float()
            losses["itm"] = F.cross_entropy(logits, mb.itm_labels[rows])
            losses["itm_acc"] = (logits.argmax(-1) == mb.itm_labels[rows]).float().mean().detach()

        if len(sel.text_rows):
            rows, positions = sel.text_rows, sel.text_positions
            labels = mb.mlm_labels[rows, positions]
            if "mlm" in self.heads:
                logits = self.heads["mlm"](out.hidden[rows, positions], model.word_embeddings.weight)
                losses["mlm"] = F.cross_entropy(logits.float(), labels)
            if "global_mlm" in self.heads:
                logits = self.global_word_logits(model, out, rows, positions)
                losses["global_mlm"] = F.cross_entropy(logits.float(), labels, reduction="none").mean()

        if len(sel.patch_rows):  # none without a MIM mask
            targets = patch_targets(mb.images, model.cfg.patch_size)
            rows, patches = sel.patch_rows, sel.patch_ids
            if "mim" in self.heads:
                pred = self.heads["mim"](out.hidden[rows, out.text_len + patches])
                losses["mim"] = F.mse_loss(pred.float(), targets[rows, patches])
            if "global_mim" in self.heads:
                pred = self.global_patch_pred(model, out, rows, patches)
                per_patch = F.mse_loss(pred.float(), targets[rows, patches], reduction="none").mean(-1)
                losses["global_mim"] = per_patch.mean()

        if "align" in self.heads and mb.teacher is not None:
            losses.update(self.align_views(model, out, mb, sel))

        weights = self.cfg.weights()
        losses["loss"] = sum((weights[k] * v for k, v in losses.items() if k in weights), torch.zeros(()))
        return losses

    def align_views(self, model: ItemModel, out: EncoderOutput, mb: MaskedBatch,
                    sel: "Selection") -> dict[str, torch.Tensor]:
        """View alignment: InfoNCE between each view's [CLS] and a teacher embedding, over the batch's
        rows that have the view (listings with the same text are positives of one another). Views: the
        product whole (the shared masked pass, its matched rows: masking is the augmentation) towards the
        teacher of the product's text; its title alone (no description, no image, as a title query is
        encoded) towards the teacher of its title, so a title keeps what MiniLM makes of it. Negatives are
        the other rows of this micro-batch on this process. (A photo-only view cost joint R@1 0.996 -> 0.978
        and its [CLS] still found no products: docs/ablations.md.)"""
        head = self.heads["align"]
        scale = head.scale()
        terms: dict[str, torch.Tensor] = {}
        title_teacher = mb.teacher if mb.teacher_title is None else mb.teacher_title
        views = {"joint": (sel.joint_rows, lambda rows: model.pool(out)[rows], mb.teacher),
                 "title": (sel.title_rows, lambda rows: title_view(model, mb, rows, sel.title_len), title_teacher)}
        for name, (rows, embed, targets) in views.items():
            if len(rows) < 2:
                continue
            teacher = targets[rows]
            same = (teacher @ teacher.T) >= SAME_TEXT
            result = contrastive_loss(head(embed(rows)), teacher, scale, positives=same)
            terms[f"align_{name}"] = result["loss"]
            terms[f"align_{name}_acc"] = result["i2t_acc"]
        if not terms:
            return {}
        losses = [v for k, v in terms.items() if not k.endswith("_acc")]
        return {"align": sum(losses) / len(losses), **{k: v.detach() for k, v in terms.items()}}


class AlignHead(nn.Module):
    """View alignment's learned InfoNCE temperature (CLIP: starts at 0.07, 1 / temperature capped at 100)
    and, only when [CLS] and the teacher differ in width (the tiny preset), a linear map between them:
    with the minilm preset [CLS] itself is aligned, so all views share one space with no head between."""

    def __init__(self, hidden: int, teacher_dim: int) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.proj = nn.Linear(hidden, teacher_dim, bias=False) if hidden != teacher_dim else None

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """(R, H) unit [CLS] vectors -> (R, D) unit vectors in the teacher's space."""
        return cls if self.proj is None else F.normalize(self.proj(cls), dim=-1)


def title_view(model: ItemModel, mb: MaskedBatch, rows: torch.Tensor, length: int) -> torch.Tensor:
    """(R, H) [CLS] of ``rows`` encoded as title-only products (their clean title, no image), their
    tokens cut to ``length``, the longest of them."""
    ids, mask = mb.title_ids[rows, :length], mb.title_mask[rows, :length]
    return model.pool(model(ids, mask, None, None, None))


def special_token_ids(tokenizer) -> list[int]:
    return [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
