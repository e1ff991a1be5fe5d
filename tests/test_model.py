"""The ITEm encoder: MiniLM initialisation, modalities, and embeddings independent of batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import IMAGE_STEMS, ModelConfig, model_config_for
from item_embed.data import load_tokenizer, tokenize
from item_embed.encode import ItemEncoder
from item_embed.model import ItemModel, minilm_model_config, minilm_path

TITLES = ["Red striped ceramic mug", "Acme cotton t-shirt, navy blue, size M", "Ünïcödé 靴 👟 running shoes"]


def test_minilm_text_only_matches_sentence_transformers():
    """Text-only input with mean pooling reproduces all-MiniLM-L6-v2's sentence embedding."""
    st = pytest.importorskip("sentence_transformers")
    cfg = minilm_model_config(pooling="mean", max_text_len=128)
    model = ItemModel.from_minilm(cfg).eval()
    tok = load_tokenizer()
    ids = tokenize(TITLES, tok, 128)
    t = max(map(len, ids))
    x = torch.zeros(len(ids), t, dtype=torch.long)
    mask = torch.zeros(len(ids), t, dtype=torch.bool)
    for i, s in enumerate(ids):
        x[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    with torch.no_grad():
        ours = model.pool(model(x, mask)).numpy()
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(TITLES, normalize_embeddings=True)
    assert np.abs(ours - ref).max() < 1e-5


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny"))
    return ItemEncoder(model, load_tokenizer(), device="cpu")


def _img(seed: int, size: int = 40) -> np.ndarray:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def test_encode_image_only_text_only_and_both(encoder):
    recs = [{"title": "blue mug", "image": _img(0)}, {"title": "blue mug"}, {"image": _img(0)}]
    emb = encoder.encode(recs)
    assert emb.shape == (3, encoder.dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1]) and not np.allclose(emb[0], emb[2])


def test_embedding_does_not_depend_on_batch_companions(encoder):
    """Padding and missing modalities are masked: a product embeds the same alone or in a mixed batch."""
    recs = [{"title": "a very long title " * 3, "image": _img(1)}, {"title": "cap"}, {"image": _img(2)},
            {"title": "green sock", "image": _img(3)}]
    together = encoder.encode(recs, batch_size=4)
    alone = np.concatenate([encoder.encode([r]) for r in recs])
    assert np.abs(together - alone).max() < 1e-5


def test_encode_batched_groups_titles_by_length_and_keeps_the_order_given(encoder):
    """Batches are cut from products sorted by title length (less padding); rows come back in input
    order, each the embedding the product gets alone."""
    recs = [{"id": str(i), "title": None if i in (2, 5) else "word " * (i * 7 % 11 + 1), "image": _img(i) if i % 3 else None}
            for i in range(1, 10)]
    products = [encoder.to_product(r, i) for i, r in enumerate(recs)]
    batched = encoder.encode_batched(products, batch_size=2)
    alone = np.concatenate([encoder.encode_products([p]) for p in products])
    assert batched.shape == (9, encoder.dim) and np.abs(batched - alone).max() < 1e-5
    assert encoder.encode_batched([], batch_size=2).shape == (0, encoder.dim)


def test_bf16_encoder_runs_a_bf16_copy_and_leaves_the_model_fp32():
    """bf16 encodes with its own bfloat16 copy (shape slice shared, fp32): the model it was given keeps its
    fp32 weights (what gets saved and fine-tuned), and the embeddings stay those of fp32 within bf16's rounding."""
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny", image_stem="conv_channelnorm")).eval()
    rng = np.random.default_rng(0)
    model.shape.fit(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    tok = load_tokenizer()
    fp32, bf16 = ItemEncoder(model, tok, device="cpu"), ItemEncoder(model, tok, device="cpu", precision="bf16")
    assert fp32.runner is model and bf16.runner is not model and bf16.runner.shape is model.shape
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.runner.parameters())
    assert model.shape.proj.dtype == torch.float32
    recs = [{"title": f"green sock {i}", "image": _img(i)} for i in range(6)] + [{"title": "cap"}, {"image": _img(9)}]
    a, b = fp32.encode(recs), bf16.encode(recs)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # bf16 did run, and stayed close


def test_auto_precision_follows_the_hardware(monkeypatch):
    """``auto`` is bf16 only where the device has native bf16 matrix units; explicit choices stand."""
    from item_embed import encode as enc_mod

    model = ItemModel(model_config_for("tiny")).eval()
    tok = load_tokenizer()
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(enc_mod, "native_bf16", lambda device, native=native: native)
        auto = ItemEncoder(model, tok, device="cpu", precision="auto")
        assert auto.precision == expected and (auto.runner is model) == (expected == "fp32")
        assert ItemEncoder(model, tok, device="cpu", precision="fp32").precision == "fp32"
        assert ItemEncoder(model, tok, device="cpu", precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="'fp16'"):
        ItemEncoder(model, tok, device="cpu", precision="fp16")
    monkeypatch.undo()
    assert isinstance(enc_mod.native_bf16("cpu"), bool) and enc_mod.native_bf16("meta") is False


def test_encode_rejects_empty_record_naming_it(encoder):
    with pytest.raises(ValueError, match="'x9'"):
        encoder.encode([{"id": "x9", "title": "  "}])


def test_cls_pooling_is_first_token(encoder):
    tok = encoder.tokenizer
    ids = torch.tensor([tokenize(["mug"], tok, 8)[0]])
    with torch.no_grad():
        out = encoder.model(ids, torch.ones_like(ids, dtype=torch.bool))
        v = encoder.model.pool(out)
    assert torch.allclose(v, torch.nn.functional.normalize(out.hidden[:, 0], dim=-1))


@pytest.mark.parametrize("stem, prefix", [("conv", "conv_stem."), ("conv4_channelnorm", "conv_stem."), ("hog", "hog_stem."),
                                          ("hog_colour", "hog_stem.")])
def test_stem_shapes_and_config_checks(stem, prefix):
    model = ItemModel(model_config_for("tiny", image_stem=stem))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert model.project_patches(images, None).shape == (2, model.cfg.num_patches, model.cfg.hidden_size)
    assert not hasattr(model, "patch_embed")
    stems = {k.split(".")[0] for k in model.state_dict() if k.endswith("_stem") or "_stem." in k}
    assert stems == {prefix[:-1]}
    with pytest.raises(ValueError, match="power of two"):
        model_config_for("tiny", image_size=36, patch_size=12, image_stem="conv")
    with pytest.raises(ValueError, match="stride-4"):
        model_config_for("tiny", image_size=32, patch_size=2, image_stem="conv4_channelnorm")
    model_config_for("tiny", image_size=36, patch_size=12, image_stem="hog")  # HOG only needs 2x2 cells
    with pytest.raises(ValueError, match="even"):
        model_config_for("tiny", image_size=35, patch_size=7, image_stem="hog")
    with pytest.raises(ValueError, match="image_stem"):
        model_config_for("tiny", image_stem="cnn")


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


@pytest.mark.parametrize("stem", ["conv", "hog", "hog_colour"])
def test_stem_model_saves_and_reloads(tmp_path, stem):
    from item_embed.checkpoint import save_model

    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny", image_stem=stem))
    save_model(tmp_path / "run", model, load_tokenizer())
    again = ItemEncoder.from_pretrained(tmp_path / "run", device="cpu")
    assert again.cfg.image_stem == stem
    recs = [{"title": "blue mug", "image": _img(0)}, {"image": _img(1)}]
    before = ItemEncoder(model, load_tokenizer(), device="cpu").encode(recs)
    assert np.abs(again.encode(recs) - before).max() < 1e-6


def test_linear_stem_keeps_the_config_hash_of_earlier_models():
    """image_stem and the shape slice came later: a linear-stem model without a slice hashes as before,
    so existing indexes still match."""
    cfg = model_config_for("tiny", shape_dims=0)
    old = cfg.to_dict()
    del old["image_stem"], old["shape_dims"], old["shape_weight"]
    assert ModelConfig.from_dict(old).config_hash() == cfg.config_hash() == "acaa99986d0b2932"
    assert model_config_for("tiny", image_stem="conv", shape_dims=0).config_hash() != cfg.config_hash()
    assert model_config_for("tiny").config_hash() != cfg.config_hash()


@pytest.mark.parametrize("stem", ["hog", "hog_colour"])
def test_hog_stems_see_edges_and_only_hog_colour_sees_colour(stem):
    """A HOG stem's input is each patch's edge directions (and for hog_colour its mean colour): a stripe
    turned 90 degrees changes the patch's vector while the patches its gradients do not reach stay as
    they were; two flat pictures of different colours look the same to ``hog`` only."""
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny", image_stem=stem)).eval()
    base = torch.full((1, 32, 32, 3), 230, dtype=torch.uint8)
    vertical, horizontal = base.clone(), base.clone()
    vertical[:, 1:7, 3:5] = 20  # inside the first 8-px patch, a pixel clear of its borders
    horizontal[:, 3:5, 1:7] = 20
    red = torch.tensor([200, 20, 20], dtype=torch.uint8).expand(1, 32, 32, 3).contiguous()
    blue = torch.tensor([20, 20, 200], dtype=torch.uint8).expand(1, 32, 32, 3).contiguous()
    with torch.no_grad():
        v, h, flat, r, b = (model.project_patches(x, None) for x in (vertical, horizontal, base, red, blue))
    assert not torch.allclose(v[0, 0], h[0, 0])
    assert torch.equal(v[0, 1:], flat[0, 1:]) and torch.equal(h[0, 1:], flat[0, 1:])
    assert torch.equal(r, b) == (stem == "hog")


def test_channel_norm_stem_keeps_far_patches_apart():
    """With per-pixel channel normalisation a patch's vector depends only on pixels in its receptive
    field; GroupNorm's image-wide statistics carry a far patch's change into every patch."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    changed = images.clone()
    changed[:, 24:, 24:] = 255 - changed[:, 24:, 24:]  # the last of the 4x4 grid of 8-px patches
    for stem, first_patch_moves in (("conv_channelnorm", False), ("conv4_channelnorm", False), ("conv", True)):
        model = ItemModel(model_config_for("tiny", image_stem=stem)).eval()
        with torch.no_grad():
            a, b = model.project_patches(images, None), model.project_patches(changed, None)
        assert torch.equal(a[0, 0], b[0, 0]) != first_patch_moves, stem
        assert not torch.allclose(a[0, 15], b[0, 15])
