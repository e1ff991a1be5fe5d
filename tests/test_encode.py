"""ItemEncoder: modalities, batching, precision, bad records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import model_config_for
from item_embed.data.arrays import load_tokenizer
from item_embed.encode import ItemEncoder
from item_embed.model.encoder import ItemModel

TITLES = ["Red striped ceramic mug", "Acme cotton t-shirt, navy blue, size M", "Ünïcödé 靴 👟 running shoes"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny"))
    return ItemEncoder(model, load_tokenizer(), device="cpu", precision="fp32")  # exact: bf16 rounds per batch


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
    fp32 = ItemEncoder(model, tok, device="cpu", precision="fp32")
    bf16 = ItemEncoder(model, tok, device="cpu", precision="bf16")
    assert fp32.runner is model and bf16.runner is not model and bf16.runner.shape is model.shape
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.runner.parameters())
    assert model.shape.proj.dtype == torch.float32
    recs = [{"title": f"green sock {i}", "image": _img(i)} for i in range(6)] + [{"title": "cap"}, {"image": _img(9)}]
    a, b = fp32.encode(recs), bf16.encode(recs)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # bf16 did run, and stayed close


def test_encode_rejects_empty_record_naming_it(encoder):
    with pytest.raises(ValueError, match="'x9'"):
        encoder.encode([{"id": "x9", "title": "  "}])
