"""Modality diagnostics: [CLS] attention shares, hand-computed and against eager attention."""

from __future__ import annotations

import numpy as np
import pytest

from item_embed.evaluate.diagnostics import ClsAttentionMeter, cls_attention_shares
from item_embed.evaluate.featurizers import EncoderFeaturizer, RawProducts


def test_cls_attention_shares_hand_computed():
    import torch
    from torch import nn

    class SelfAttn(nn.Module):
        num_attention_heads, attention_head_size = 1, 2

        def __init__(self):
            super().__init__()
            self.query, self.key = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
            nn.init.eye_(self.query.weight)
            nn.init.eye_(self.key.weight)

    # CLS = (1, 0). Scores = q.k / sqrt(2): token 1 (text) (1,0) -> 1/sqrt2; token 2 (image) (0,0) -> 0;
    # token 3 (image, padded out) must not count.
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 0.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    shares = cls_attention_shares(SelfAttn(), hidden, mask, text_len=2)
    s = np.exp(1 / np.sqrt(2))
    expected_image = 1 / (2 * s + 1)
    np.testing.assert_allclose(shares.numpy(), [[1 - expected_image, expected_image]], rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_products(tiny_catalog):
    from item_embed.data.catalog import Catalog

    return RawProducts.from_catalog(Catalog.open(tiny_catalog))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_diagnostics_on_the_tiny_model(tiny_run, tiny_products, precision):
    """The shares are computed in fp32 even when the encoder runs in bf16 (they sum to 1 either way)."""
    feat = EncoderFeaturizer.from_pretrained(tiny_run, device="cpu", precision=precision)
    d = feat.diagnostics(tiny_products)
    assert set(d) == {"cls_attention_image", "cls_attention_text", "cos_joint_image", "cos_joint_title"}
    assert 0.0 <= d["cls_attention_image"] <= 1.0 and 0.0 <= d["cls_attention_text"] <= 1.0
    assert d["cls_attention_image"] + d["cls_attention_text"] == pytest.approx(1.0, abs=1e-5)
    # The tiny model's image tokens outnumber its text tokens; an untrained-ish model attends to both.
    assert 0.0 < d["cls_attention_image"] < 1.0
    assert -1.0 <= d["cos_joint_image"] <= 1.0 and -1.0 <= d["cos_joint_title"] <= 1.0
    # The cosines are those of the three embeddings the featurizer returns.
    j, i, t = (feat.embed(tiny_products, m) for m in ("joint", "image", "title"))
    assert d["cos_joint_image"] == pytest.approx(float(np.sum(j * i, 1).mean()), abs=1e-6)
    assert d["cos_joint_title"] == pytest.approx(float(np.sum(j * t, 1).mean()), abs=1e-6)
    assert not np.allclose(j, i) and not np.allclose(j, t)  # the modes really left something out


def test_cls_attention_matches_eager_attention_weights(tiny_run, tiny_products):
    """The recomputed last-layer [CLS] attention equals what eager attention returns."""
    import torch
    from transformers.models.bert.modeling_bert import eager_attention_forward

    from item_embed.data.arrays import make_batch
    from item_embed.encode import ItemEncoder

    enc = ItemEncoder.from_pretrained(tiny_run, device="cpu")
    products = [enc.to_product(r, i, tiny_products.image_root) for i, r in enumerate(tiny_products.records()[:6])]
    products[1].image = None  # one product without an image: its image share must be 0 and not counted
    batch = make_batch(products, enc.tokenizer, enc.cfg.max_text_len, enc.cfg.image_size)
    layer = enc.model.bert.encoder.layer[-1]
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), ClsAttentionMeter(enc.model) as meter:
        out = enc.model(batch.input_ids, batch.text_mask, batch.images, batch.has_image)
    hook.remove()
    sa = layer.attention.self
    h = captured["h"].detach()
    b, length, _ = h.shape
    with torch.no_grad():
        q = sa.query(h).view(b, length, sa.num_attention_heads, -1).transpose(1, 2)
        k = sa.key(h).view(b, length, sa.num_attention_heads, -1).transpose(1, 2)
        additive = (1.0 - out.attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        _, weights = eager_attention_forward(sa, q, k, k, additive, scaling=sa.scaling, dropout=0.0)
    cls = weights[:, :, 0].mean(1)  # (B, L)
    image_share = cls[:, out.text_len:].sum(1)
    assert float(image_share[1]) == pytest.approx(0.0, abs=1e-6)
    both = [0, 2, 3, 4, 5]
    assert meter.count == 5
    assert meter.result()["cls_attention_image"] == pytest.approx(float(image_share[both].mean()), abs=1e-5)
