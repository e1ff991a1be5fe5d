"""The ITEm encoder: MiniLM initialisation, modalities, and embeddings independent of batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import model_config_for
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
