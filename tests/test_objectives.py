"""Masking, swapping and the five objectives' heads and losses on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import ObjectiveConfig, model_config_for
from item_embed.data import Batch
from item_embed.model import ItemModel
from item_embed.objectives import IGNORE, ItemObjectives, mask_batch, patch_targets

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
    obj = ItemObjectives(model, ObjectiveConfig(itm=0, global_mim=0))
    assert set(obj.heads) == {"mlm", "mim", "global_mlm"}
    batch = make_batch()
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    losses = obj(model, model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask), mb)
    assert "itm" not in losses and "global_mim" not in losses
    expected = losses["mlm"] + losses["mim"] + obj.cfg.global_mlm * losses["global_mlm"]
    assert torch.allclose(losses["loss"], expected)


def test_only_sums_the_named_objectives_and_leaves_the_other_heads_without_gradient(tiny):
    """The ITM-first phase (``only``): every loss is still computed and reported, ``loss`` is ITM's, and no
    gradient reaches the other heads."""
    model, obj = tiny
    obj.only = ("itm",)
    batch = make_batch()
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    losses = obj(model, model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask), mb)
    assert {"itm", "mlm", "mim", "global_mlm", "global_mim"} <= set(losses)
    assert torch.allclose(losses["loss"], obj.cfg.itm * losses["itm"])
    losses["loss"].backward()
    assert next(obj.heads["itm"].parameters()).grad is not None
    for name in ("mlm", "mim", "global_mlm", "global_mim"):
        assert all(p.grad is None for p in obj.heads[name].parameters()), name


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


def test_original_ids_undo_mlm_masking():
    batch = make_batch(b=16, t=20)
    mb = mask_batch(batch, ObjectiveConfig(mlm_prob=0.5), 4, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(1))
    assert not torch.equal(mb.input_ids, batch.input_ids)
    assert torch.equal(mb.original_ids(), batch.input_ids)


def test_views_match_how_the_encoder_sees_one_modality(tiny):
    """The image view is what a mixed batch gives an image-only row ([CLS] [SEP] + clean patches), the
    title view what it gives a text-only row, whatever masking the shared pass used."""
    from item_embed.objectives import view_embeddings

    model, _ = tiny
    batch = make_batch(b=6)
    mb = mask_batch(batch, ObjectiveConfig(), model.cfg.num_patches, SPECIALS, MASK, VOCAB,
                    torch.Generator().manual_seed(0))
    rows = mb.matched.clone()
    with torch.no_grad():
        got_image = view_embeddings(model, mb, rows, "image")
        got_title = view_embeddings(model, mb, rows, "title")
        as_image_only = make_batch(b=6, image_only_rows=range(6))
        ref_image = model.pool(model(as_image_only.input_ids, as_image_only.text_mask, batch.images, batch.has_image))
        ref_title = model.pool(model(batch.input_ids, batch.text_mask))
    assert torch.allclose(got_image, ref_image[rows], atol=1e-5)
    assert torch.allclose(got_title, ref_title[rows], atol=1e-5)


@pytest.mark.parametrize("views", ["image", "image,title"])
def test_contrastive_term(tiny, views):
    model, _ = tiny
    model.train()
    obj = ItemObjectives(model, ObjectiveConfig(itm=0, mlm=0, mim=0, global_mlm=0, global_mim=0,
                                                contrastive=1, contrastive_views=views))
    assert set(obj.heads) == {"contrastive"}
    batch = make_batch(b=8, text_only_rows=(1,), image_only_rows=(2,))
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    losses = obj(model, model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask), mb)
    # 6 usable rows (one lacks an image, one a title): InfoNCE of a near-random model is near log(6).
    assert abs(losses["contrastive"].item() - np.log(6)) < 0.7
    losses["loss"].backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0  # the image side learns from it
    assert obj.heads["contrastive"].logit_scale.grad is not None


def test_contrastive_views_are_checked():
    with pytest.raises(ValueError, match="contrastive_views"):
        ObjectiveConfig(contrastive=1, contrastive_views="audio")


@pytest.mark.parametrize("stop_grad", [True, False])
def test_contrastive_full_product_is_a_fixed_target_by_default(tiny, stop_grad):
    """With stop_grad the term moves only the reduced view; the shared pass's output gets no gradient."""
    model, _ = tiny
    obj = ItemObjectives(model, ObjectiveConfig(itm=0, mlm=0, mim=0, global_mlm=0, global_mim=0, contrastive=1,
                                                contrastive_stop_grad=stop_grad))
    batch = make_batch(b=8)
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    out.hidden.retain_grad()
    obj(model, out, mb)["loss"].backward()
    moved = out.hidden.grad is not None and bool(out.hidden.grad.abs().sum() > 0)
    assert moved is not stop_grad
    assert ObjectiveConfig().contrastive_stop_grad


def test_contrastive_dims_compares_only_the_last_coordinates(tiny):
    """With contrastive_dims=k the term reaches the full product's [CLS] through its last k
    coordinates only; the rest of the embedding is left to the other objectives."""
    model, _ = tiny
    k = 8
    obj = ItemObjectives(model, ObjectiveConfig(itm=0, mlm=0, mim=0, global_mlm=0, global_mim=0, contrastive=1,
                                                contrastive_stop_grad=False, contrastive_dims=k))
    batch = make_batch(b=8)
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    out.hidden.retain_grad()
    obj(model, out, mb)["loss"].backward()
    cls_grad = out.hidden.grad[:, 0].abs()
    assert cls_grad[:, -k:].sum() > 0
    assert cls_grad[:, :-k].max() < 1e-6 * cls_grad[:, -k:].max()
    with pytest.raises(ValueError, match="contrastive_dims"):
        ObjectiveConfig(contrastive=1, contrastive_dims=-1)
    with pytest.raises(ValueError, match="contrastive_dims"):
        ItemObjectives(model, ObjectiveConfig(contrastive=1, contrastive_dims=model.cfg.hidden_size + 1))


def test_title_dropout_turns_rows_into_image_only_products():
    batch = make_batch(b=64, t=12, text_only_rows=(3,), image_only_rows=(4,))
    cfg = ObjectiveConfig(title_dropout=0.5)
    mb = mask_batch(batch, cfg, 16, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(2))
    dropped = torch.nonzero(mb.title_dropped).squeeze(1).tolist()
    assert 16 < len(dropped) < 48 and 3 not in dropped and 4 not in dropped  # only rows with both
    for r in dropped:
        n = int(batch.text_mask[r].sum())
        assert mb.input_ids[r, :2].tolist() == [CLS, SEP] and (mb.input_ids[r, 2:] == MASK).all()
        assert mb.text_mask[r].tolist() == [True, True] + [False] * 10
        assert torch.equal(mb.mlm_labels[r, 1:n - 1], batch.input_ids[r, 1:n - 1])  # every title word
        assert (mb.mlm_labels[r, n - 1:] == IGNORE).all() and mb.mlm_labels[r, 0] == IGNORE
        assert mb.itm_labels[r] == IGNORE and mb.matched[r] and not mb.mim_mask[r].any()
        assert torch.equal(mb.images[r], batch.images[r])
    kept = ~mb.title_dropped
    assert torch.equal(mb.text_mask[kept], batch.text_mask[kept])
    assert ((mb.itm_labels[kept & batch.has_text & batch.has_image]) != IGNORE).all()


def test_title_dropout_off_draws_nothing():
    """Runs without it keep their exact random stream (and so their resumes and results): the masks
    and the generator's next draw are those of the code before title dropout existed (224a108)."""
    import hashlib

    g = torch.Generator().manual_seed(5)
    mb = mask_batch(make_batch(), ObjectiveConfig(), 16, SPECIALS, MASK, VOCAB, g)
    h = hashlib.sha256()
    for name in ("input_ids", "mlm_labels", "mim_mask", "itm_labels", "images"):
        h.update(getattr(mb, name).numpy().tobytes())
    assert h.hexdigest()[:16] == "f307095fa43952bc"
    assert torch.randint(1 << 30, (1,), generator=g).item() == 40695213
    assert not mb.title_dropped.any()
    with pytest.raises(ValueError, match="global_mlm"):
        ObjectiveConfig(title_dropout=0.25, global_mlm=0)


def test_a_dropped_title_is_learned_from_the_image_as_a_query_sees_it(tiny):
    """The dropped row's [CLS] is exactly an image-only product's, and global MLM spells its title
    from it: the loss reaches the image side, the local MLM head never reads those positions."""
    model, _ = tiny
    obj = ItemObjectives(model, ObjectiveConfig(title_dropout=0.5))
    batch = make_batch(b=8, t=12)
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(1))
    r = int(torch.nonzero(mb.title_dropped)[0])
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    with torch.no_grad():
        alone = model(torch.tensor([[CLS, SEP]]), torch.ones(1, 2, dtype=torch.bool), batch.images[r:r + 1])
    assert torch.allclose(out.hidden[r, 0], alone.hidden[0, 0], atol=1e-5)
    losses = obj(model, out, mb)
    assert "title_from_image" in losses
    selected = (mb.mlm_labels != IGNORE) & mb.matched.unsqueeze(1) & ~mb.title_dropped.unsqueeze(1)
    rows, pos = torch.nonzero(selected, as_tuple=True)
    local = obj.heads["mlm"](out.hidden[rows, pos], model.word_embeddings.weight)
    assert torch.allclose(losses["mlm"], torch.nn.functional.cross_entropy(local, mb.mlm_labels[rows, pos]))
    model.zero_grad()
    only = obj.global_word_logits(model, out, torch.full((3,), r), torch.tensor([1, 2, 3]))
    torch.nn.functional.cross_entropy(only, mb.mlm_labels[r, 1:4]).backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0


def _stripes(vertical: bool, s: int = 32, period: int = 4) -> torch.Tensor:
    """A (1, s, s, 3) uint8 image of stripes in two colours picked per call."""
    idx = torch.arange(s)
    on = ((idx // (period // 2)) % 2).bool()
    on = on[None, :].expand(s, s) if vertical else on[:, None].expand(s, s)
    return on


def _colour(on: torch.Tensor, a: tuple[int, int, int], b: tuple[int, int, int]) -> torch.Tensor:
    img = torch.where(on[..., None], torch.tensor(a, dtype=torch.uint8), torch.tensor(b, dtype=torch.uint8))
    return img[None]


def test_hog_target_sees_edge_direction_not_colour():
    from item_embed.objectives import HOG_BINS, HOG_CELLS, patch_hog, target_dim

    vertical = _stripes(vertical=True)  # intensity changes along x: gradient angle 0
    horizontal = _stripes(vertical=False)  # along y: angle pi/2
    dark_on_light = _colour(vertical, (20, 20, 20), (230, 230, 230))
    t = patch_targets(dark_on_light, 8, "hog")
    assert t.shape == (1, 16, target_dim("hog", 8)) == (1, 16, HOG_CELLS ** 2 * HOG_BINS)
    per_bin = t.reshape(1, 16, HOG_CELLS ** 2, HOG_BINS).sum(dim=(0, 1, 2))
    assert per_bin.argmax() == 0 and per_bin[1:].sum() < 1e-3 * per_bin[0]
    per_bin = patch_hog(_colour(horizontal, (20, 20, 20), (230, 230, 230)), 8).reshape(16, 4, HOG_BINS).sum((0, 1))
    assert per_bin.argmax() == HOG_BINS // 2  # 90 degrees
    # Recolouring the same shapes (a colour variant) leaves the target nearly unchanged; the pixel
    # target of the same pair is far apart.
    red_on_blue = _colour(vertical, (200, 30, 30), (30, 30, 200))
    hog_a, hog_b = patch_hog(dark_on_light, 8), patch_hog(red_on_blue, 8)
    assert torch.nn.functional.cosine_similarity(hog_a, hog_b, dim=-1).min() > 0.99
    pix_a, pix_b = patch_targets(dark_on_light, 8), patch_targets(red_on_blue, 8)
    assert torch.nn.functional.cosine_similarity(pix_a.flatten(), pix_b.flatten(), dim=0) < 0.9
    # Edge-rich patches have the pixel target's scale (mean square 1); a flat patch stays near zero.
    assert torch.allclose(hog_a.pow(2).mean(-1), torch.ones(16), atol=0.1)
    flat = patch_hog(torch.full((1, 32, 32, 3), 128, dtype=torch.uint8), 8)
    assert flat.abs().max() == 0
    noisy_flat = patch_hog(torch.randint(126, 130, (1, 32, 32, 3), dtype=torch.uint8), 8)
    assert noisy_flat.pow(2).mean() < 0.05


def test_hog_target_patches_follow_patchify_order():
    """Patch k of the target describes patch k of the image: edges only in the top-right patch."""
    from item_embed.objectives import patch_hog

    img = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    img[0, 2:6, 8 + 2:8 + 6] = 0  # a small dark square inside patch (row 0, col 1) of a 4x4 grid
    energy = patch_hog(img, 8).pow(2).sum(-1)[0]
    assert energy.argmax() == 1 and (energy > 1e-6).sum() == 1


@pytest.mark.parametrize("kind", ["pixels", "hog"])
def test_mim_heads_regress_the_chosen_target(tiny, kind):
    from item_embed.objectives import target_dim

    model, _ = tiny
    cfg = ObjectiveConfig(mim_target=kind)
    obj = ItemObjectives(model, cfg)
    d = target_dim(kind, model.cfg.patch_size)
    assert obj.heads["mim"].out.out_features == d == obj.heads["global_mim"].out.out_features
    batch = make_batch()
    mb = mask_batch(batch, cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    losses = obj(model, out, mb)
    assert torch.isfinite(losses["mim"]) and torch.isfinite(losses["global_mim"])
    losses["mim"].backward()  # the target's gradient reaches the head and the image side
    assert obj.heads["mim"].out.weight.grad.abs().sum() > 0
    assert model.image_pos.grad.abs().sum() > 0


def test_unknown_mim_target_is_refused():
    with pytest.raises(ValueError, match="mim_target"):
        ObjectiveConfig(mim_target="depth")


def test_title_dropout_mim_rebuilds_the_whole_picture_from_the_image_only_cls(tiny):
    """With title_dropout_mim a dropped row's global MIM covers every patch (none of its patches is
    masked, as in an image-only query) and reads only that row's [CLS]; local MIM is unchanged."""
    model, _ = tiny
    cfg = ObjectiveConfig(title_dropout=0.5, title_dropout_mim=True)
    obj = ItemObjectives(model, cfg)
    batch = make_batch(b=8, t=12)
    mb = mask_batch(batch, cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(1))
    dropped = torch.nonzero(mb.title_dropped).squeeze(1)
    assert len(dropped) and not mb.mim_mask[dropped].any()
    out = model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
    losses = obj(model, out, mb)
    n = model.cfg.num_patches
    targets = patch_targets(mb.images, model.cfg.patch_size)
    rows = dropped.repeat_interleave(n)
    patches = torch.arange(n).repeat(len(dropped))
    whole = torch.nn.functional.mse_loss(obj.global_patch_pred(model, out, rows, patches), targets[rows, patches])
    assert torch.allclose(losses["image_from_image"], whole, atol=1e-6)
    off = ItemObjectives(model, ObjectiveConfig(title_dropout=0.5))
    off.load_state_dict(obj.state_dict())
    plain = off(model, out, mb)
    assert "image_from_image" not in plain
    assert torch.allclose(plain["mim"], losses["mim"])  # local MIM: masked patches of matched rows only
    sel = mb.mim_mask & mb.matched.unsqueeze(1)
    k = int(sel.sum())
    # global MIM is one mean over the masked patches and the dropped rows' whole pictures
    expected = (plain["global_mim"] * k + whole * len(rows)) / (k + len(rows))
    assert torch.allclose(losses["global_mim"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="title_dropout_mim"):
        ObjectiveConfig(title_dropout_mim=True)
    with pytest.raises(ValueError, match="title_dropout_mim"):
        ObjectiveConfig(title_dropout=0.25, title_dropout_mim=True, global_mim=0)


def test_image_contrastive_off_draws_nothing_and_on_adds_two_views_last():
    batch = make_batch(b=8)
    off = mask_batch(batch, ObjectiveConfig(), 4, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    on = mask_batch(batch, ObjectiveConfig(image_contrastive=1), 4, SPECIALS, MASK, VOCAB,
                    torch.Generator().manual_seed(0))
    assert off.views is None
    assert on.views.shape == (8, 2, 32, 32, 3) and on.views.dtype == torch.uint8
    assert not torch.equal(on.views[:, 0], on.views[:, 1])
    for name in ("input_ids", "mlm_labels", "mim_mask", "itm_labels", "images"):
        assert torch.equal(getattr(on, name), getattr(off, name)), name  # same stream before the views
    assert on.select(slice(2, 5)).views.shape[0] == 3


@pytest.mark.parametrize("proj", [0, 16])
def test_image_contrastive_term_tells_photos_apart_by_their_views(tiny, proj):
    """InfoNCE between the image-only embeddings of two views of each photo (optionally through a
    projection MLP): near log(n) for a random model, lower when the two views are the same picture than
    when they are different pictures; rows without a photo take no part; the image side gets the gradient."""
    model, _ = tiny
    model.train()
    obj = ItemObjectives(model, ObjectiveConfig(itm=0, mlm=0, mim=0, global_mlm=0, global_mim=0,
                                                image_contrastive=1, image_contrastive_proj=proj))
    head = obj.heads["image_contrastive"]
    assert (head.proj is None) if proj == 0 else head.proj[-1].out_features == proj
    assert set(obj.heads) == {"image_contrastive"}
    batch = make_batch(b=8, text_only_rows=(3,))
    mb = mask_batch(batch, obj.cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))

    def loss(views: torch.Tensor) -> torch.Tensor:
        mb.views = views
        return obj(model, model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask), mb)

    losses = loss(mb.views)
    assert abs(losses["image_contrastive"].item() - np.log(7)) < 0.7
    noisy = mb.views.clone()
    noisy[3] = torch.randint(0, 256, noisy[3].shape, dtype=torch.uint8)
    model.eval()
    with torch.no_grad():  # the row without a photo takes no part: its views change nothing
        assert loss(noisy)["image_contrastive"] == loss(mb.views)["image_contrastive"]
    model.train()
    losses["loss"].backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0
    assert obj.heads["image_contrastive"].logit_scale.grad is not None
    model.eval()
    with torch.no_grad():  # (the InfoNCE itself: matching views score above mismatched ones)
        same = torch.stack([batch.images, batch.images], dim=1)
        other = torch.stack([batch.images, batch.images.roll(1, dims=0)], dim=1)
        assert loss(same)["image_contrastive"] < loss(other)["image_contrastive"]


def test_image_contrastive_projection_width_is_checked():
    with pytest.raises(ValueError, match="image_contrastive_proj"):
        ObjectiveConfig(image_contrastive=1, image_contrastive_proj=-1)
    with pytest.raises(ValueError, match="image_contrastive_proj"):
        ObjectiveConfig(image_contrastive_proj=128)


def test_image_view_of_a_title_dropped_row_is_an_image_only_product(tiny):
    """With title dropout on, the image view of every row (dropped or not) is [CLS] [SEP] + the photo,
    exactly as an image-only query is encoded: no title word slips in where [SEP] goes."""
    from item_embed.objectives import view_embeddings

    model, _ = tiny
    batch = make_batch(b=8)
    cfg = ObjectiveConfig(title_dropout=0.5, image_contrastive=1)
    mb = mask_batch(batch, cfg, model.cfg.num_patches, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(0))
    assert mb.title_dropped.any() and (~mb.title_dropped).any()
    rows = torch.ones(8, dtype=torch.bool)
    with torch.no_grad():
        got = view_embeddings(model, mb, rows, "image", mb.views[:, 0])
        as_image_only = make_batch(b=8, image_only_rows=range(8))
        ref = model.pool(model(as_image_only.input_ids, as_image_only.text_mask, mb.views[:, 0], batch.has_image))
    assert torch.allclose(got, ref, atol=1e-5)
