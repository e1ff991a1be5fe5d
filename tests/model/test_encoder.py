"""The ITEm encoder: MiniLM initialisation, the [CLS] embedding, and model identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import ModelConfig, model_config_for
from item_embed.data.arrays import load_tokenizer, tokenize
from item_embed.encode import ItemEncoder
from item_embed.model.encoder import ItemModel, minilm_model_config, minilm_path

TITLES = ["Red striped ceramic mug", "Acme cotton t-shirt, navy blue, size M", "Ünïcödé 靴 👟 running shoes"]


def test_minilm_text_only_matches_sentence_transformers():
    """ITEm's text path is MiniLM's: text-only hidden states, mean-pooled as sentence-transformers does,
    reproduce all-MiniLM-L6-v2's sentence embedding."""
    st = pytest.importorskip("sentence_transformers")
    model = ItemModel.from_minilm(minilm_model_config(max_text_len=128)).eval()
    tok = load_tokenizer()
    ids = tokenize(TITLES, tok, 128)
    t = max(map(len, ids))
    x = torch.zeros(len(ids), t, dtype=torch.long)
    mask = torch.zeros(len(ids), t, dtype=torch.bool)
    for i, s in enumerate(ids):
        x[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    with torch.no_grad():
        hidden = model(x, mask).hidden  # (B, T, H)
    m = mask.unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(TITLES, normalize_embeddings=True)
    assert np.abs(ours - ref).max() < 1e-5


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny"))
    return ItemEncoder(model, load_tokenizer(), device="cpu")


def test_cls_pooling_is_first_token(encoder):
    tok = encoder.tokenizer
    ids = torch.tensor([tokenize(["mug"], tok, 8)[0]])
    with torch.no_grad():
        out = encoder.model(ids, torch.ones_like(ids, dtype=torch.bool))
        v = encoder.model.pool(out)
    assert torch.allclose(v, torch.nn.functional.normalize(out.hidden[:, 0], dim=-1))


def test_models_saved_before_the_pruning_keep_their_ids():
    """Configs as earlier versions saved them (with ``pooling``; a linear-stem model without ``image_stem``
    or the shape slice) load and hash as they did, so their indexes, embedding files and classifiers
    still match. The hashes were computed by the code at tag ablations-2026-11."""
    cfg = model_config_for("tiny", shape_dims=0)
    old = {**cfg.to_dict(), "pooling": "cls"}
    del old["image_stem"], old["shape_dims"], old["shape_weight"]
    assert ModelConfig.from_dict(old).config_hash() == cfg.config_hash() == "acaa99986d0b2932"
    recipe = {"preset": "minilm", "vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
              "intermediate_size": 1536, "max_position_embeddings": 512, "dropout": 0.1, "layer_norm_eps": 1e-12,
              "image_size": 96, "patch_size": 16, "max_text_len": 40, "use_description": True, "pooling": "cls",
              "image_stem": "conv_channelnorm", "shape_dims": 256, "shape_weight": 0.1}
    assert ModelConfig.from_dict(recipe).config_hash() == "27c550c5b796928d"
    assert model_config_for("tiny", image_stem="conv_channelnorm", shape_dims=0).config_hash() != cfg.config_hash()
    assert model_config_for("tiny").config_hash() != cfg.config_hash()
    with pytest.raises(ValueError, match="retired.*ablations-2026-11"):
        ModelConfig.from_dict({**old, "pooling": "mean"})
