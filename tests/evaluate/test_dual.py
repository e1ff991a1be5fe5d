"""The dual encoder as a featurizer: embedding modes, save/load, refused folders, the harness."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from item_embed.checkpoint import CheckpointError
from item_embed.data.catalog import Product
from item_embed.evaluate.dual import DualEncoder
from item_embed.model.dual import DualModel


def test_embedding_modes(dual_run, square_data):
    run, _ = dual_run
    products, _ = square_data
    enc = DualEncoder.from_pretrained(run, device="cpu")
    assert enc.name == "dual" and enc.dim == 256
    emb = {m: enc.embed(products, m) for m in ("joint", "image", "title")}
    for m, e in emb.items():
        assert e.shape == (len(products), 256) and e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5, err_msg=m)
    assert not np.allclose(emb["image"], emb["title"], atol=1e-3)
    both = emb["image"] + emb["title"]
    np.testing.assert_allclose(emb["joint"], both / np.linalg.norm(both, axis=1, keepdims=True), atol=1e-5)
    # A missing modality: joint falls back to the other; asking for the missing one gives a zero row.
    p = products[0]
    image_only, title_only = Product(0, "a", None, p.image), Product(1, "b", p.text, None)
    joint = enc.embed([image_only, title_only], "joint")
    np.testing.assert_allclose(joint[0], emb["image"][0], atol=1e-5)
    np.testing.assert_allclose(joint[1], emb["title"][0], atol=1e-5)
    assert np.all(enc.embed([title_only], "image") == 0) and np.all(enc.embed([image_only], "title") == 0)
    with pytest.raises(ValueError, match="mode"):
        enc.embed(products[:1], "audio")


def test_save_load_round_trip(dual_run, square_data, tiny_cfg, tokenizer):
    run, _ = dual_run
    products, _ = square_data
    loaded = DualEncoder.from_pretrained(run, device="cpu")
    # The last checkpoint holds the same weights as the export: rebuilt from it, it embeds the same.
    state = load_file(str(run / "checkpoints" / "step-00000020" / "model.safetensors"))
    rebuilt = DualModel(tiny_cfg)
    fresh = DualEncoder(rebuilt, tokenizer, device="cpu").embed(products[:8], "joint")
    rebuilt.load_state_dict(state)
    again = DualEncoder(rebuilt, tokenizer, device="cpu").embed(products[:8], "joint")
    np.testing.assert_array_equal(loaded.embed(products[:8], "joint"), again)
    assert not np.allclose(fresh, again, atol=1e-3)  # the weights matter
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "item-embed-dual/1" and config["dual"]["embed_dim"] == 256
    assert config["trained_steps"] == 20 and config["model"]["preset"] == "tiny"


def test_wrong_or_corrupt_folders_are_refused(dual_run, tiny_run, tmp_path):
    from item_embed.encode import ItemEncoder

    run, _ = dual_run
    with pytest.raises(CheckpointError, match="format"):
        ItemEncoder.from_pretrained(run)
    with pytest.raises(CheckpointError, match="not 'item-embed-dual/1'"):
        DualEncoder.from_pretrained(tiny_run)
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("checkpoints"))
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="checksum"):
        DualEncoder.from_pretrained(bad)


def test_the_harness_evaluates_the_dual_encoder(dual_run, tiny_catalog):
    from item_embed.data.catalog import Catalog
    from item_embed.evaluate.featurizers import RawProducts, load_featurizer
    from item_embed.evaluate.harness import evaluate_featurizer

    run, _ = dual_run
    products = RawProducts.from_catalog(Catalog.open(tiny_catalog))
    feat = load_featurizer(f"dual:{run}")
    image = feat.embed(products, "image")
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    result = evaluate_featurizer(feat, products, group="group", labels=["category"])
    assert set(result["retrieval"]) == {"joint", "image", "title", "image2image", "title2image"}
    for metrics in result["retrieval"].values():
        assert 0.0 <= metrics["R@1"] <= metrics["R@10"] <= 1.0 and metrics["queries"] > 0
    assert 0.0 <= result["probe"]["category"]["linear"]["accuracy"] <= 1.0
