"""Image stems: the paper's linear patch projection and the recipe's conv stem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import IMAGE_STEMS, model_config_for
from item_embed.data.arrays import load_tokenizer
from item_embed.encode import ItemEncoder
from item_embed.model.encoder import ItemModel


def _img(seed: int, size: int = 40):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("stem, key", [("linear", "patch_embed"), ("conv_channelnorm", "conv_stem")])
def test_stem_shapes_and_config_checks(stem, key):
    model = ItemModel(model_config_for("tiny", image_stem=stem))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert model.project_patches(images, None).shape == (2, model.cfg.num_patches, model.cfg.hidden_size)
    assert {k.split(".")[0] for k in model.state_dict() if k.split(".")[0] in ("patch_embed", "conv_stem")} == {key}
    with pytest.raises(ValueError, match="power of two"):
        model_config_for("tiny", image_size=36, patch_size=12, image_stem="conv_channelnorm")
    model_config_for("tiny", image_size=36, patch_size=12, image_stem="linear")  # any patch size
    with pytest.raises(ValueError, match="image_stem"):
        model_config_for("tiny", image_stem="cnn")


@pytest.mark.parametrize("stem", ["conv", "conv4_channelnorm", "hog", "hog_colour"])
def test_retired_stems_are_refused_naming_where_their_code_is(stem):
    with pytest.raises(ValueError, match="retired.*ablations-2026-11"):
        model_config_for("tiny", image_stem=stem)


@pytest.mark.parametrize("stem", IMAGE_STEMS)
def test_masked_patch_pixels_reach_no_output(stem):
    """MIM must not be solvable by peeking: with a patch masked, its pixels change nothing the
    model outputs (the conv stem sees across patch borders, so it must blank them first)."""
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny", image_stem=stem)).eval()
    ids, text_mask = torch.tensor([[101, 2000, 102]]), torch.ones(1, 3, dtype=torch.bool)
    images = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    changed = images.clone()
    changed[:, 8:16, 8:16] = 255 - changed[:, 8:16, 8:16]  # patch (1, 1) of the 4x4 grid of 8-px patches
    masked = torch.zeros(1, 16, dtype=torch.bool)
    masked[0, 5] = True
    with torch.no_grad():
        a = model(ids, text_mask, images, None, masked).hidden
        b = model(ids, text_mask, changed, None, masked).hidden
        c = model(ids, text_mask, changed, None, None).hidden
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # unmasked, the same change does show


@pytest.mark.parametrize("stem", IMAGE_STEMS)
def test_stem_model_saves_and_reloads(tmp_path, stem):
    from item_embed.checkpoint import save_model

    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny", image_stem=stem))
    save_model(tmp_path / "run", model, load_tokenizer())
    again = ItemEncoder.from_pretrained(tmp_path / "run", device="cpu", precision="fp32")
    assert again.cfg.image_stem == stem
    recs = [{"title": "blue mug", "image": _img(0)}, {"image": _img(1)}]
    before = ItemEncoder(model, load_tokenizer(), device="cpu", precision="fp32").encode(recs)
    assert np.abs(again.encode(recs) - before).max() < 1e-6


def test_channel_norm_stem_keeps_far_patches_apart():
    """With per-pixel channel normalisation a patch's vector depends only on pixels in its receptive
    field (GroupNorm's image-wide statistics, the retired `conv` stem, carried a far patch's change
    into every patch)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    changed = images.clone()
    changed[:, 24:, 24:] = 255 - changed[:, 24:, 24:]  # the last of the 4x4 grid of 8-px patches
    model = ItemModel(model_config_for("tiny", image_stem="conv_channelnorm")).eval()
    with torch.no_grad():
        a, b = model.project_patches(images, None), model.project_patches(changed, None)
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.allclose(a[0, 15], b[0, 15])
