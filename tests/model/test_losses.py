"""The one contrastive loss: plain and multi-positive InfoNCE against hand computation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from item_embed.model.losses import contrastive_loss


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_plain_infonce_hand_computed():
    image, text = _unit([1, 0], [0, 1], [1, 1]), _unit([1, 0], [0, 1], [-1, 1])
    out = contrastive_loss(image, text, torch.tensor(2.0))
    logits = 2.0 * image @ text.T
    target = torch.arange(3)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(out["loss"], expected)
    assert out["i2t_acc"] == (logits.argmax(1) == target).float().mean()
    assert math.isclose(float(out["temperature"]), 0.5)


def test_multi_positive_counts_the_mass_on_every_positive():
    """Rows 0 and 1 share a text: for image 0 the softmax mass on texts 0 and 1 together is what counts."""
    image, text = _unit([1, 0], [1, 0.1], [0, 1]), _unit([1, 0], [1, 0], [0, 1])
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    out = contrastive_loss(image, text, torch.tensor(5.0), positives=same)
    logits = 5.0 * image @ text.T
    p_rows, p_cols = logits.softmax(1), logits.softmax(0)
    i2t = -torch.log(torch.stack([p_rows[0, :2].sum(), p_rows[1, :2].sum(), p_rows[2, 2]])).mean()
    t2i = -torch.log(torch.stack([p_cols[:2, 0].sum(), p_cols[:2, 1].sum(), p_cols[2, 2]])).mean()
    assert torch.allclose(out["loss"], (i2t + t2i) / 2, atol=1e-6)
    assert out["i2t_acc"] == 1.0  # a row matched to the other listing of its product is right
    plain = contrastive_loss(image, text, torch.tensor(5.0))
    assert out["loss"] < plain["loss"]  # the same product is no longer a negative
