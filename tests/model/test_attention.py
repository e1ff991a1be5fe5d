"""The encoder's CPU dropout and written-out attention: the same maths as PyTorch's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from item_embed.config import ModelConfig
from item_embed.model.attention import ATTENTION, Dropout, attention, dropout, use_cheap_dropout
from item_embed.model.encoder import ItemModel

N = 1 << 20


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_at_rate_p_in_every_16_bit_lane_and_keeps_the_mean(p):
    torch.manual_seed(0)
    y = dropout(torch.ones(N), p)
    kept = y != 0
    # Each 64-bit draw feeds four consecutive elements: every lane must drop at rate p (5 sigma).
    sigma = math.sqrt(p * (1 - p) / (N // 4))
    for lane in range(4):
        assert abs(float((~kept[lane::4]).float().mean()) - p) < 5 * sigma
    assert torch.allclose(y[kept], torch.full_like(y[kept], 65536 / (65536 - round(p * 65536))))
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(p / (1 - p) / N)


def test_dropout_is_reproducible_and_the_identity_outside_training():
    x = torch.randn(3, 1001)  # an odd size: the last 64-bit draw is only partly used
    torch.manual_seed(7)
    a = dropout(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(a, dropout(x, 0.1))
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_gradient_is_the_same_mask_and_scale(dtype):
    x = torch.randn(64, 384, dtype=dtype, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.1)
    y.backward(torch.ones_like(y))
    scale = 65536 / (65536 - round(0.1 * 65536))
    expected = (y.detach() != 0).to(dtype) * scale
    assert torch.equal(x.grad, expected)
    assert y.dtype == dtype


def test_dropout_module_replaces_nn_dropout_everywhere_with_the_same_p():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Sequential(nn.Dropout(0.2)))
    use_cheap_dropout(model)
    found = [m for m in model.modules() if isinstance(m, (nn.Dropout, Dropout))]
    assert [type(m) for m in found] == [Dropout, Dropout] and [m.p for m in found] == [0.3, 0.2]
    model.eval()
    x = torch.randn(2, 4)
    assert torch.equal(model(x), model[0](x))


def _qkv_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False  # padding of the first row
    return q, k, v, mask


def test_attention_equals_sdpa_in_eval():
    q, k, v, mask = _qkv_mask()
    module = nn.Module().eval()
    module.is_causal = False
    ours, _ = attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours, _ = attention(module, q, k, v, None)
    ref, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_attention_in_training_drops_attention_probabilities_with_the_cheap_dropout():
    q, k, v, mask = _qkv_mask()
    module = nn.Module().train()
    torch.manual_seed(3)
    ours, _ = attention(module, q, k, v, mask, scaling=0.3, dropout=0.2)
    scores = (q @ k.transpose(2, 3) * 0.3).masked_fill(~mask, torch.finfo(q.dtype).min)
    torch.manual_seed(3)
    probs = dropout(scores.softmax(-1), 0.2)
    torch.testing.assert_close(ours, (probs @ v).transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_the_encoder_uses_them_and_matches_transformers_sdpa_on_real_positions():
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=32, image_size=16, patch_size=8, max_text_len=8, dropout=0.1,
                      shape_dims=0)
    torch.manual_seed(0)
    model = ItemModel(cfg).eval()
    assert model.bert.config._attn_implementation == ATTENTION
    assert not any(type(m) is nn.Dropout for m in model.modules())
    ids = torch.randint(5, 100, (3, 6))
    text_mask = torch.ones(3, 6, dtype=torch.bool)
    text_mask[1, 4:] = False
    images = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)
    has_image = torch.tensor([True, True, False])
    with torch.no_grad():
        ours = model(ids, text_mask, images, has_image).hidden
        model.bert.config._attn_implementation = "sdpa"
        ref = model(ids, text_mask, images, has_image).hidden
    real = torch.cat([text_mask, has_image[:, None].expand(3, 4)], dim=1)
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    assert F.cosine_similarity(ours[real], ref[real], dim=-1).min() > 0.9999


def test_an_unpadded_batch_skips_the_mask_only_without_gradients():
    """Training always gets a mask (knowing that nothing is padded would ask the device); encoding and
    serving still run an unpadded batch maskless, and a padded one is masked either way."""
    from transformers.masking_utils import create_bidirectional_mask

    config = ItemModel(ModelConfig(preset="tiny")).bert.config
    x = torch.randn(2, 5, config.hidden_size)
    full, padded = torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=full) is None
        assert create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=padded) is not None
    assert create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=full) is not None
