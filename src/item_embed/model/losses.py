"""The one contrastive loss: symmetric in-batch InfoNCE (CLIP), shared by the dual encoder, the image
warm start and ITEm's view alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Two texts whose teacher (MiniLM) embeddings are this close describe one product, so they are positives
# of one another, never negatives. Measured on hm-dev: a group's colour variants share name and
# description (cosine 1.0); of the 17M pairs of different groups 58 reach 0.97 (99.99th percentile 0.875).
SAME_TEXT = 0.97


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                     positives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric in-batch InfoNCE.

    image, text: (B, D) L2-normalised, row i of each from the same product; scale: 1 / temperature;
    positives: (B, B) bool, which other pairs count as matches too (e.g. two listings of one product
    with the same text), the diagonal always does; None: the diagonal alone. With several positives a
    row's loss is -log of the softmax mass on its positives (multi-positive InfoNCE).
    Returns ``loss`` (mean of the image->text and text->image losses), ``i2t_acc`` and ``t2i_acc``
    (share of rows whose best-scoring partner is a positive) and ``temperature``.
    """
    with torch.autocast(image.device.type, enabled=False):  # similarities in fp32 even under bf16
        logits = scale.float() * image.float() @ text.float().T  # (B, B): images as rows, titles as columns
    target = torch.arange(len(image), device=image.device)
    if positives is None:
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        pos = torch.eye(len(image), dtype=torch.bool, device=image.device)
    else:
        pos = positives | torch.eye(len(image), dtype=torch.bool, device=image.device)
        loss = (_multi_positive(logits, pos) + _multi_positive(logits.T, pos.T)) / 2
    with torch.no_grad():
        rows = torch.arange(len(image), device=image.device)
        i2t = pos[rows, logits.argmax(1)].float().mean()
        t2i = pos[logits.argmax(0), rows].float().mean()
    return {"loss": loss, "i2t_acc": i2t, "t2i_acc": t2i, "temperature": 1.0 / scale.detach()}


def _multi_positive(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(sum of softmax over the row's positives)."""
    log_p = logits.log_softmax(dim=1)
    return -torch.logsumexp(log_p.masked_fill(~positives, float("-inf")), dim=1).mean()
