"""Masking, swapping and the five objectives' heads and losses on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import ObjectiveConfig, model_config_for
from item_embed.data.arrays import Batch
from item_embed.model.encoder import ItemModel
from item_embed.model.objectives import (
    IGNORE,
    ItemObjectives,
    mask_batch,
    patch_targets,
)

CLS, SEP, PAD, MASK, VOCAB = 101, 102, 0, 103, 30522
SPECIALS = [CLS, SEP, PAD]


def make_batch(b: int = 8, t: int = 12, s: int = 32, seed: int = 0, text_only_rows=(), image_only_rows=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, t), generator=g)
    lengths = torch.randint(4, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[~mask] = PAD
    has_text = torch.ones(b, dtype=torch.bool)
    for r in image_only_rows:
        has_text[r] = False
        ids[r] = PAD
        ids[r, :2] = torch.tensor([CLS, SEP])
        mask[r] = False
        mask[r, :2] = True
    images = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g)
    has_image = torch.ones(b, dtype=torch.bool)
    for r in text_only_rows:
        has_image[r] = False
        images[r] = 255
    return Batch(ids, mask, has_text, images, has_image)


def test_mlm_masking_follows_bert_recipe():
    batch = make_batch(b=256, t=32)
    cfg = ObjectiveConfig(itm=0, mim=0, global_mim=0)
    mb = mask_batch(batch, cfg, 16, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(1))
    chosen = mb.mlm_labels != IGNORE
    eligible = batch.text_mask & ~torch.isin(batch.input_ids, torch.tensor(SPECIALS))
    assert not (chosen & ~eligible).any(), "special tokens or padding were chosen"
    share = chosen.sum().item() / eligible.sum().item()
    assert 0.12 < share < 0.18
    assert torch.equal(mb.mlm_labels[chosen], batch.input_ids[chosen])
    became_mask = (mb.input_ids == MASK) & chosen
    kept = (mb.input_ids == batch.input_ids) & chosen
    assert 0.74 < became_mask.sum().item() / chosen.sum().item() < 0.86
    assert 0.06 < kept.sum().item() / chosen.sum().item() < 0.15
    assert torch.equal(mb.input_ids[~chosen], batch.input_ids[~chosen]), "unchosen tokens changed"
    assert mb.mim_mask is None and (mb.itm_labels == IGNORE).all()


def test_mim_masks_exact_share_of_image_rows_only():
    batch = make_batch(b=6, text_only_rows=(2,))
    cfg = ObjectiveConfig(mim_ratio=0.5)
    mb = mask_batch(batch, cfg, 16, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    per_row = mb.mim_mask.sum(1)
    assert per_row[2] == 0
    assert all(per_row[r] == 8 for r in (0, 1, 3, 4, 5))


def test_itm_swaps_half_with_other_images():
    batch = make_batch(b=10, text_only_rows=(9,), image_only_rows=(8,))
    mb = mask_batch(batch, ObjectiveConfig(), 16, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(3))
    eligible = batch.has_text & batch.has_image  # 8 rows
    assert (mb.itm_labels[~eligible] == IGNORE).all()
    negatives = torch.nonzero(mb.itm_labels == 0).squeeze(1)
    assert len(negatives) == 4
    for r in negatives:
        assert not torch.equal(mb.images[r], batch.images[r]), "a negative kept its own image"
    positives = mb.itm_labels == 1
    assert torch.equal(mb.images[positives], batch.images[positives])
    assert torch.equal(mb.matched, mb.itm_labels != 0)


def test_masking_is_reproducible_from_the_generator():
    batch = make_batch()
    a = mask_batch(batch, ObjectiveConfig(), 16, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(5))
    b = mask_batch(batch, ObjectiveConfig(), 16, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(5))
    for name in ("input_ids", "mlm_labels", "mim_mask", "itm_labels", "images"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    cfg = model_config_for("tiny")
    model = ItemModel(cfg).eval()
    return model, ItemObjectives(model, ObjectiveConfig()).eval()


def test_zero_weight_turns_objective_off(tiny):
    model, _ = tiny
    obj = ItemObjectives(model, ObjectiveConfig(itm=0, global_mim=0, align=0))
    assert set(obj.heads) == {"mlm", "mim", "global_mlm"}
    batch = make_batch()
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    losses = obj(model, model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask), mb)
    assert "itm" not in losses and "global_mim" not in losses
    expected = losses["mlm"] + losses["mim"] + obj.cfg.global_mlm * losses["global_mlm"]
    assert torch.allclose(losses["loss"], expected)


def test_global_heads_see_only_cls_and_positions(tiny):
    """Changing masked positions' own outputs must not move global predictions (it must move local ones)."""
    model, obj = tiny
    batch = make_batch()
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
        rows, pos = torch.nonzero(mb.mlm_labels != IGNORE, as_tuple=True)
        prow, patch = torch.nonzero(mb.mim_mask, as_tuple=True)
        g_words = obj.global_word_logits(model, out, rows, pos)
        g_patches = obj.global_patch_pred(model, out, prow, patch)
        local_words = obj.heads["mlm"](out.hidden[rows, pos], model.word_embeddings.weight)
        local_patches = obj.heads["mim"](out.hidden[prow, out.text_len + patch])

        out.hidden[:, 1:] += torch.randn_like(out.hidden[:, 1:])  # every non-[CLS] output
        assert torch.equal(obj.global_word_logits(model, out, rows, pos), g_words)
        assert torch.equal(obj.global_patch_pred(model, out, prow, patch), g_patches)
        assert not torch.allclose(obj.heads["mlm"](out.hidden[rows, pos], model.word_embeddings.weight), local_words)
        assert not torch.allclose(obj.heads["mim"](out.hidden[prow, out.text_len + patch]), local_patches)

        out.hidden[:, 0] += 1.0  # the [CLS] output does drive them
        assert not torch.allclose(obj.global_word_logits(model, out, rows, pos), g_words)
        assert not torch.allclose(obj.global_patch_pred(model, out, prow, patch), g_patches)
        # Position matters: the same [CLS] gives different predictions at different positions.
        shifted = obj.global_word_logits(model, out, rows, (pos + 1) % out.text_len)
        assert not torch.allclose(shifted, obj.global_word_logits(model, out, rows, pos))


def test_masked_losses_only_on_matched_rows(tiny):
    model, obj = tiny
    batch = make_batch(b=8)
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
        base = obj(model, out, mb)
        # Scrambling the outputs of swapped (unmatched) rows, except [CLS], leaves MLM/MIM unchanged.
        neg = ~mb.matched
        assert neg.any()
        out.hidden[neg, 1:] = torch.randn_like(out.hidden[neg, 1:])
        again = obj(model, out, mb)
    for k in ("mlm", "mim", "global_mlm", "global_mim"):
        assert torch.equal(base[k], again[k]), k


def test_mim_targets_are_per_patch_normalised():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    t = patch_targets(images, 8)
    assert t.shape == (2, 16, 8 * 8 * 3)
    assert np.allclose(t.mean(-1).numpy(), 0, atol=1e-5)
    assert np.allclose(t.std(-1).numpy(), 1, atol=1e-2)


def test_mim_heads_regress_a_patch_of_pixels(tiny):
    model, _ = tiny
    cfg = ObjectiveConfig()
    obj = ItemObjectives(model, cfg)
    d = model.cfg.patch_dim
    assert obj.heads["mim"].out.out_features == d == obj.heads["global_mim"].out.out_features
    batch = make_batch()
    mb = mask_batch(batch, cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    losses = obj(model, out, mb)
    assert torch.isfinite(losses["mim"]) and torch.isfinite(losses["global_mim"])
    losses["mim"].backward()  # the target's gradient reaches the head and the image side
    assert obj.heads["mim"].out.weight.grad.abs().sum() > 0
    assert model.image_pos.grad.abs().sum() > 0




def _aligned_batch(model, b: int = 8, seed: int = 0):
    """A masked batch with the view-alignment fields, a random unit teacher per row."""
    batch = make_batch(b=b, seed=seed)
    cfg = ObjectiveConfig(align=1.0)
    mb = mask_batch(batch, cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(seed))
    mb.title_ids, mb.title_mask = batch.input_ids, batch.text_mask
    mb.teacher = torch.nn.functional.normalize(torch.randn(b, 384, generator=torch.Generator().manual_seed(1)), dim=-1)
    return batch, mb, cfg


def test_the_title_view_is_encoded_exactly_as_a_title_query_is(tiny):
    """The title view is what ItemEncoder makes of a title-only product."""
    from item_embed.model.objectives import title_view

    model, _ = tiny
    batch, mb, _ = _aligned_batch(model)
    rows = torch.arange(3)
    t = int(batch.text_mask[:3].sum(1).max())
    with torch.no_grad():
        title = title_view(model, mb, rows, t)
        text_only = model.pool(model(batch.input_ids[:3, :t], batch.text_mask[:3, :t]))
        assert torch.allclose(title, text_only, atol=1e-6)


def test_view_alignment_pulls_both_views_towards_the_teacher_and_reaches_the_image_side(tiny):
    model, _ = tiny
    batch, mb, cfg = _aligned_batch(model)
    obj = ItemObjectives(model, cfg, teacher_dim=384)
    model.train()
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    losses = obj(model, out, mb)
    assert {"align", "align_joint", "align_title", "align_joint_acc"} <= set(losses) and "align_image" not in losses
    assert torch.allclose(losses["align"], (losses["align_joint"] + losses["align_title"]) / 2)
    losses["align"].backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0  # the joint view reaches the image side
    assert obj.heads["align"].proj is not None  # tiny [CLS] (64) is mapped to the teacher's 384
    # Without teacher embeddings in the batch (or with weight 0) there is no alignment term.
    mb.teacher = None
    assert "align" not in obj(model, model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask), mb)
    assert "align" not in ItemObjectives(model, ObjectiveConfig(align=0)).heads
