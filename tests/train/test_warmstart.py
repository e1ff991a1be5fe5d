"""The image warm start: MiniLM teacher, the stem learns alone and is cached, hard negatives are mined."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from item_embed.config import TrainConfig, model_config_for
from item_embed.data.arrays import ProductArrays, load_tokenizer
from item_embed.data.catalog import Catalog
from item_embed.model.encoder import ItemModel
from item_embed.model.losses import SAME_TEXT
from item_embed.train.warmstart import (
    STATE_FILE, load_warm_stem, mine_hard_negatives, teacher_embeddings, warm_start,
)


@pytest.fixture(scope="module")
def arrays(tiny_catalog) -> ProductArrays:
    cfg = model_config_for("tiny", image_stem="conv_channelnorm")
    products = Catalog.open(tiny_catalog).load_all(cfg.image_size)
    return ProductArrays.build(products, load_tokenizer(), cfg.max_text_len, cfg.image_size)


def test_the_teacher_is_minilm_sentence_embedding(arrays):
    st = pytest.importorskip("sentence_transformers")
    from item_embed.data.arrays import minilm_path

    teacher = teacher_embeddings(arrays)
    tok = load_tokenizer()
    texts = [tok.decode(arrays.tokens[i, 1 : arrays.lengths[i] - 1]) for i in range(5)]
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert teacher.shape == (len(arrays), 384)
    np.testing.assert_allclose(teacher[:5], reference, atol=2e-3)  # decode/re-encode of lower-cased text


def test_warm_start_learns_caches_and_hands_its_stem_to_item(arrays, tmp_path):
    cfg = model_config_for("tiny", image_stem="conv_channelnorm")
    warm = TrainConfig(epochs=8, batch_size=32, lr=3e-3, precision="fp32", save_every=1000, new_lr_scale=1.0)
    messages: list[str] = []
    folder = warm_start(arrays, tmp_path / "ws", cfg, warm, progress=False, log=messages.append)
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] * 0.8, (log[0]["loss"], log[-1]["loss"])
    assert (folder / STATE_FILE).is_file() and (folder / "teacher.npy").is_file()
    # Done once: the same catalog and configs are reused, not trained again, whatever the checkpoint interval.
    messages.clear()
    warm_start(arrays, folder, cfg, dataclasses.replace(warm, save_every=7), progress=False, log=messages.append)
    assert any("reusing" in m for m in messages)
    model = ItemModel(cfg)
    before = {k: v.clone() for k, v in model.conv_stem.state_dict().items()}
    load_warm_stem(model, folder)
    assert any(not torch.equal(before[k], v) for k, v in model.conv_stem.state_dict().items())


def test_hard_negatives_are_close_texts_photos_never_the_same_product(arrays, tmp_path):
    cfg = model_config_for("tiny", image_stem="conv_channelnorm")
    warm = TrainConfig(epochs=2, batch_size=32, precision="fp32", save_every=1000, new_lr_scale=1.0)
    rows = np.arange(len(arrays) - 5)  # the last five are held out: never a negative
    folder = warm_start(arrays, tmp_path / "ws", cfg, warm, rows=rows, progress=False, log=lambda _m: None)
    teacher = np.load(folder / "teacher.npy")
    hard = mine_hard_negatives(arrays, folder, cfg, teacher, rows, k=4, log=lambda _m: None)
    assert hard.shape == (len(arrays), 4) and (hard[-5:] == -1).all()
    for i in rows:
        for j in hard[i][hard[i] >= 0]:
            assert j != i and j in rows and teacher[i] @ teacher[j] < SAME_TEXT
    assert (hard[rows] >= 0).mean() > 0.9
    again = mine_hard_negatives(arrays, folder, cfg, teacher, rows, k=4, log=lambda _m: None)
    assert np.array_equal(hard, again)  # cached
