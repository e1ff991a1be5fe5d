"""The shape slice: descriptor, whitening fit, how photo-only and title-only products embed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import RECIPE_SHAPE_DIMS, ModelConfig, model_config_for
from item_embed.data.arrays import load_tokenizer
from item_embed.encode import ItemEncoder
from item_embed.model.encoder import ItemModel
from item_embed.model.shape import ShapeSlice, descriptor_dim, shape_descriptor


def _pil(photo: np.ndarray):
    from PIL import Image

    return Image.fromarray(photo)


def _photos(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random blocky photos: coarse random fields upsampled, so gradients vary between photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    return coarse.repeat(4, axis=1).repeat(4, axis=2)


def test_descriptor_shape_and_sign():
    x = torch.from_numpy(_photos(3))
    d = shape_descriptor(x, 8)
    assert d.shape == (3, descriptor_dim(32, 8)) == (3, 16 * 36)
    assert (d >= 0).all() and d.dtype == torch.float32


def test_fit_whitens_the_training_descriptors():
    photos = _photos(600)
    s = ShapeSlice(32, 8, dims=16)
    assert not s.fitted and torch.equal(s(torch.from_numpy(photos[:4])), torch.zeros(4, 16))
    assert s.fit(photos) == 600 and s.fitted
    z = (shape_descriptor(torch.from_numpy(photos), 8).double() - s.mean.double()) @ s.proj.double()
    cov = torch.cov(z.T, correction=0)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3  # decorrelated
    var = torch.diag(cov)
    assert var[0] == pytest.approx(1 / 1.01**2, rel=1e-3)  # unit variance, less the eigenvalue floor
    assert (var > 0.3).all() and (var <= 1.0).all()
    out = s(torch.from_numpy(photos[:5]))
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_fit_with_fewer_photos_than_dims_zero_pads_and_subsamples():
    s = ShapeSlice(32, 8, dims=16)
    s.fit(_photos(5))
    assert (s.proj[:, 4:] == 0).all() and (s.proj[:, :4] != 0).any()  # rank of 5 centred photos is 4
    big = ShapeSlice(32, 8, dims=4)
    assert big.fit(_photos(50), max_photos=20) == 20
    with pytest.raises(ValueError, match="at least 2 photos"):
        ShapeSlice(32, 8, dims=4).fit(_photos(1))
    same = ShapeSlice(32, 8, dims=4)
    assert same.fit(np.repeat(_photos(1), 3, axis=0)) == 0 and not same.fitted  # nothing to whiten


def test_fit_from_a_stream_of_batches_is_the_fit_on_the_whole_array():
    photos = _photos(300, seed=4)
    whole, streamed = ShapeSlice(32, 8, dims=16), ShapeSlice(32, 8, dims=16)
    assert whole.fit(photos) == 300
    # Uneven and empty batches, as a catalog's chunks come.
    assert streamed.fit_batches([photos[:7], photos[7:7], photos[7:250], photos[250:]]) == 300
    torch.testing.assert_close(streamed.mean, whole.mean)
    torch.testing.assert_close(streamed.proj, whole.proj)
    with pytest.raises(ValueError, match="got 1"):
        ShapeSlice(32, 8, dims=4).fit_batches(iter([photos[:1]]))


def test_config_defaults_old_models_and_bad_values():
    # ITEm's own embedding ([CLS] alone) is the dataclass default; the presets carry the recipe.
    assert ModelConfig().shape_dims == 0 and model_config_for("tiny").shape_dims == 32
    assert model_config_for("minilm").shape_dims == RECIPE_SHAPE_DIMS == 256
    assert model_config_for("tiny").embedding_dim == 64 + 32
    old = model_config_for("tiny").to_dict()
    del old["shape_dims"], old["shape_weight"]
    assert ModelConfig.from_dict(old).shape_dims == 0  # saved before the slice existed: none
    # Without a slice the identity is what it was before the slice existed.
    plain = model_config_for("tiny", shape_dims=0)
    assert "shape_dims" not in plain.identity_dict() and "shape_dims" in model_config_for("tiny").identity_dict()
    with pytest.raises(ValueError, match="shape_dims"):
        model_config_for("tiny", shape_dims=-1)
    with pytest.raises(ValueError, match="even"):
        model_config_for("tiny", image_size=35, patch_size=7, image_stem="linear")
    with pytest.raises(ValueError, match="shape_weight"):
        model_config_for("tiny", shape_weight=0.0)
    assert model_config_for("tiny", image_size=35, patch_size=7, shape_dims=0).embedding_dim == 64


@pytest.fixture(scope="module")
def fitted_encoder():
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny")).eval()
    model.shape.fit(_photos(200, seed=1))
    return ItemEncoder(model, load_tokenizer(), device="cpu")


def test_photo_only_rows_keep_only_shape_and_text_only_rows_only_cls(fitted_encoder):
    photos = _photos(3, seed=2)
    recs = [{"title": "blue mug", "image": _pil(photos[0])}, {"title": "blue mug"}, {"image": _pil(photos[0])}]
    emb = fitted_encoder.encode(recs)
    h = fitted_encoder.cfg.hidden_size
    assert emb.shape == (3, h + 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.abs(emb[2, :h]).max() == 0 and np.abs(emb[2, h:]).max() > 0  # photo only: shape part
    assert np.abs(emb[1, h:]).max() == 0 and np.abs(emb[1, :h]).max() > 0  # title only: [CLS] part
    # The full product: [CLS] and shape in the ratio 1 : shape_weight.
    ratio = np.linalg.norm(emb[0, h:]) / np.linalg.norm(emb[0, :h])
    assert ratio == pytest.approx(fitted_encoder.cfg.shape_weight, rel=1e-4)
    # The photo's shape coordinates are the same with or without a title.
    np.testing.assert_allclose(emb[0, h:] / np.linalg.norm(emb[0, h:]), emb[2, h:], atol=1e-5)


def test_photo_queries_find_their_product_by_shape_at_any_weight(fitted_encoder):
    """A photo query ranks the gallery by shape alone: its own product comes first, and the order
    is the same whatever the weight (what keeps products and title queries ranking by [CLS])."""
    photos = _photos(12, seed=3)
    titles = [f"product number {i}" for i in range(12)]
    orders = []
    for w in (0.05, 1.0):
        model = fitted_encoder.model
        enc = ItemEncoder(model, fitted_encoder.tokenizer, device="cpu")
        old = model.cfg
        model.cfg = ModelConfig.from_dict({**old.to_dict(), "shape_weight": w})
        try:
            gallery = enc.encode([{"title": t, "image": _pil(p)} for t, p in zip(titles, photos)])
            queries = enc.encode([{"image": _pil(p)} for p in photos])
        finally:
            model.cfg = old
        sims = queries @ gallery.T
        assert (sims.argmax(axis=1) == np.arange(12)).all()
        orders.append(np.argsort(-sims, axis=1))
    assert (orders[0] == orders[1]).all()


def test_unfitted_slice_leaves_photo_only_rows_their_cls():
    torch.manual_seed(0)
    enc = ItemEncoder(ItemModel(model_config_for("tiny")).eval(), load_tokenizer(), device="cpu")
    emb = enc.encode([{"image": _pil(_photos(1)[0])}])
    h = enc.cfg.hidden_size
    assert np.abs(emb[0, :h]).max() > 0 and np.abs(emb[0, h:]).max() == 0
