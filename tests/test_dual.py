"""The CLIP-style dual encoder: loss, learning, embedding modes, save/load, budget, CLI, harness."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from item_embed.catalog import Product
from item_embed.checkpoint import CheckpointError
from item_embed.config import TrainConfig, model_config_for
from item_embed.data import ProductArrays, load_tokenizer
from item_embed.dual import Budget, DualEncoder, DualModel, contrastive_loss, train_dual
from item_embed.train import lr_at

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (15, 15, 15), "orange": (250, 140, 0), "purple": (140, 40, 180), "pink": (250, 150, 200)}


def squares(per_colour: int = 4, size: int = 32, seed: int = 0) -> list[Product]:
    """Coloured squares on white, jittered in place and size, titled by their colour."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(per_colour * len(COLOURS)):
        name = list(COLOURS)[i % len(COLOURS)]
        img = np.full((size, size, 3), 255, np.uint8)
        a, b = int(rng.integers(0, 8)), int(rng.integers(20, 30))
        img[a:b, a:b] = COLOURS[name]
        out.append(Product(i, f"sq{i}", f"{name} square", img))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_cfg():
    return model_config_for("tiny")


@pytest.fixture(scope="module")
def square_data(tokenizer, tiny_cfg):
    products = squares()
    return products, ProductArrays.build(products, tokenizer, tiny_cfg.max_text_len, tiny_cfg.image_size)


@pytest.fixture(scope="module")
def dual_run(square_data, tokenizer, tiny_cfg, tmp_path_factory):
    """The tiny dual encoder trained for 20 steps on the coloured squares."""
    _, data = square_data
    run = tmp_path_factory.mktemp("dual")
    cfg = TrainConfig(steps=20, batch_size=8, lr=2e-3, precision="fp32", save_every=10)  # lr scale: dual's default
    result = train_dual(data, tokenizer, run, tiny_cfg, cfg, progress=False, log=lambda _m: None)
    return run, result


def test_contrastive_loss_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.9, 0.19**0.5]])
    out = contrastive_loss(image, text, torch.tensor(2.0))
    logits = 2.0 * np.array([[1.0, 0.9], [0.0, 0.19**0.5]])  # images as rows
    ce = lambda m: np.mean([-(m[i, i] - np.log(np.exp(m[i]).sum())) for i in range(2)])  # noqa: E731
    assert float(out["loss"]) == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)
    assert float(out["i2t_acc"]) == 1.0  # each image's own title scores highest
    assert float(out["t2i_acc"]) == 0.5  # title 1 is closer to image 0 (0.9) than to its own (0.44)
    assert float(out["temperature"]) == pytest.approx(0.5)


def test_temperature_starts_at_007_and_is_capped(tiny_cfg):
    model = DualModel(tiny_cfg)
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) would be 22026
    assert float(model.scale().detach()) == pytest.approx(100.0, rel=1e-5)


def test_lr_scale_left_unset_is_the_dual_default(dual_run):
    from item_embed.checkpoint import latest_good_checkpoint

    run, _ = dual_run
    _, _, meta = latest_good_checkpoint(run)
    assert meta["train"]["new_lr_scale"] == 1.0  # not ITEm's 10, which made the image tower diverge


def test_contrastive_loss_drops_on_coloured_squares(dual_run):
    run, result = dual_run
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and result.steps == 20
    assert losses[0] == pytest.approx(math.log(8), abs=0.05)  # batch of 8, untrained: uniform
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.25, losses


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
    with pytest.raises(CheckpointError, match="not a dual encoder"):
        DualEncoder.from_pretrained(tiny_run)
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("checkpoints"))
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="checksum"):
        DualEncoder.from_pretrained(bad)


def test_resume_matches_an_uninterrupted_run(square_data, tokenizer, tiny_cfg, tmp_path):
    _, data = square_data
    cfg = TrainConfig(steps=4, batch_size=8, lr=2e-3, precision="fp32", save_every=2, new_lr_scale=1.0)
    quiet = lambda _m: None  # noqa: E731
    train_dual(data, tokenizer, tmp_path / "a", tiny_cfg, cfg, progress=False, log=quiet)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    (tmp_path / "b" / "model.safetensors").unlink()
    messages = []
    train_dual(data, tokenizer, tmp_path / "b", tiny_cfg, cfg, resume=True, progress=False, log=messages.append)
    assert any("resumed from step-00000002" in m for m in messages)
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_budget_schedule():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1)
    by_steps = Budget(steps=50)
    assert [by_steps.lr(s, 123.0, cfg) for s in range(50)] == [lr_at(s, 50, cfg) for s in range(50)]
    assert not by_steps.done(49, 1e9) and by_steps.done(50, 0.0)
    by_time = Budget(seconds=10.0)
    assert by_time.progress(1000, 5.0) == 0.5 and not by_time.done(10**6, 9.99) and by_time.done(1, 10.0)
    assert by_time.lr(0, 0.5, cfg) == pytest.approx(0.5, abs=1e-3)  # half-way through the 1 s warm-up
    assert by_time.lr(0, 1.0, cfg) == pytest.approx(1.0, abs=1e-3)  # warm-up done
    assert by_time.lr(0, 5.5, cfg) == pytest.approx(0.5, abs=1e-3)  # cosine half-way
    assert by_time.lr(0, 9.99, cfg) < 1e-3
    both = Budget(steps=100, seconds=10.0)
    assert both.done(100, 1.0) and both.done(3, 10.0) and not both.done(99, 9.9)
    with pytest.raises(ValueError):
        Budget()


def test_train_by_wall_clock_seconds(square_data, tokenizer, tiny_cfg, tmp_path):
    _, data = square_data
    cfg = TrainConfig(batch_size=8, lr=2e-3, precision="fp32", save_every=1000, new_lr_scale=1.0)  # no step cap
    result = train_dual(data, tokenizer, tmp_path, tiny_cfg, cfg, max_seconds=1.0, progress=False, log=lambda _m: None)
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == len(records) >= 1
    assert result.seconds >= 1.0 and records[-1]["elapsed"] >= 1.0
    if len(records) > 1:
        assert records[-2]["elapsed"] <= 1.0  # stopped at the first step past the budget (log rounds to 1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["budget"] == {"steps": None, "seconds": 1.0}


def test_cli_trains_from_a_catalog_and_from_a_cache(tiny_catalog, tmp_path):
    from item_embed.cli import main

    common = ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--precision", "fp32", "--no-progress"]
    assert main(["train-dual", str(tiny_catalog), "--out", str(tmp_path / "a"), *common]) == 0
    assert (tmp_path / "a" / "catalog_report.json").is_file()
    assert main(["prepare", str(tiny_catalog), "--out", str(tmp_path / "cache"), "--preset", "tiny"]) == 0
    assert main(["train-dual", str(tmp_path / "cache"), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("a", "b"))
    for k in a:  # same products, same seed: the cache trains exactly like the catalog
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["trained_steps"] == 2


def test_the_harness_evaluates_the_dual_encoder(dual_run, tiny_catalog):
    from item_embed.catalog import Catalog
    from item_embed.evaluate import RawProducts, evaluate_featurizer, load_featurizer

    run, _ = dual_run
    products = RawProducts.from_catalog(Catalog.open(tiny_catalog))
    feat = load_featurizer(f"dual:{run}")
    image = feat.embed(products, "image")
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    result = evaluate_featurizer(feat, products, group="group", labels=["category"])
    assert set(result["retrieval"]) == {"joint", "image", "title", "image2image"}
    for metrics in result["retrieval"].values():
        assert 0.0 <= metrics["R@1"] <= metrics["R@10"] <= 1.0 and metrics["queries"] > 0
    assert 0.0 <= result["probe"]["category"]["linear"]["accuracy"] <= 1.0


@pytest.mark.parametrize("stem", ["conv", "hog"])
def test_stem_dual_trains_and_reloads(tiny_catalog, square_data, tmp_path, stem):
    """--image-stem gives the image tower ITEm's stem of that name; the choice travels with the model."""
    from item_embed.cli import main

    assert main(["train-dual", str(tiny_catalog), "--out", str(tmp_path / "c"), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "4", "--precision", "fp32", "--no-progress", "--image-stem", stem]) == 0
    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert any(k.startswith(f"image.{stem}_stem.") for k in weights) and "image.patch_embed.weight" not in weights
    products, _ = square_data
    emb = DualEncoder.from_pretrained(tmp_path / "c", device="cpu").embed(products[:4], "image")
    assert emb.shape[0] == 4 and np.isfinite(emb).all()


def test_linear_stem_dual_keeps_its_model_id(tiny_cfg, tokenizer):
    """image_stem came later: a linear dual hashes as before it existed, so its indexes still match."""
    model = DualModel(tiny_cfg)
    assert DualEncoder(model, tokenizer, {}, "cpu").model_id == "dual-f5c84819ba65e0c0-"
    conv = DualModel(model_config_for("tiny", image_stem="conv"))
    assert DualEncoder(conv, tokenizer, {}, "cpu").model_id != "dual-f5c84819ba65e0c0-"
