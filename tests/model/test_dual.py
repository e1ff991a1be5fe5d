"""The dual encoder model: its InfoNCE loss, temperature, identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import model_config_for
from item_embed.data.arrays import load_tokenizer
from item_embed.evaluate.dual import DualEncoder
from item_embed.model.dual import DualModel, contrastive_loss


def test_contrastive_loss_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.9, 0.19**0.5]])
    out = contrastive_loss(image, text, torch.tensor(2.0))
    logits = 2.0 * np.array([[1.0, 0.9], [0.0, 0.19**0.5]])  # images as rows
    ce = lambda m: np.mean([-(m[i, i] - np.log(np.exp(m[i]).sum())) for i in range(2)])  # noqa: E731
    assert float(out["loss"]) == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)
    assert float(out["i2t_acc"]) == 1.0  # each image's own title scores highest
    assert float(out["t2i_acc"]) == 0.5  # title 1 is closer to image 0 (0.9) than to its own (0.44)
    assert float(out["temperature"]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_cfg():
    return model_config_for("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_temperature_starts_at_007_and_is_capped(tiny_cfg):
    model = DualModel(tiny_cfg)
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) would be 22026
    assert float(model.scale().detach()) == pytest.approx(100.0, rel=1e-5)


def test_linear_stem_dual_keeps_its_model_id(tiny_cfg, tokenizer):
    """image_stem came later: a linear dual hashes as before it existed, so its indexes still match."""
    model = DualModel(tiny_cfg)
    assert DualEncoder(model, tokenizer, {}, "cpu").model_id == "dual-f5c84819ba65e0c0-"
    conv = DualModel(model_config_for("tiny", image_stem="conv_channelnorm"))
    assert DualEncoder(conv, tokenizer, {}, "cpu").model_id != "dual-f5c84819ba65e0c0-"
