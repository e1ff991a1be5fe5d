"""Training the dual encoder through the engine: it learns, resumes exactly, trains by the clock, from the CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from item_embed.config import TrainConfig
from item_embed.evaluate.dual import DualEncoder
from item_embed.train.dual import train_dual


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


def test_train_by_wall_clock_seconds(square_data, tokenizer, tiny_cfg, tmp_path):
    _, data = square_data
    cfg = TrainConfig(batch_size=8, lr=2e-3, precision="fp32", save_every=1000, new_lr_scale=1.0,
                      max_seconds=1.0)  # no step cap
    result = train_dual(data, tokenizer, tmp_path, tiny_cfg, cfg, progress=False, log=lambda _m: None)
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


def test_stem_dual_trains_and_reloads(tiny_catalog, square_data, tmp_path):
    """--image-stem gives the image tower ITEm's stem of that name; the choice travels with the model."""
    from item_embed.cli import main

    assert main(["train-dual", str(tiny_catalog), "--out", str(tmp_path / "c"), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "4", "--precision", "fp32", "--no-progress", "--image-stem", "conv_channelnorm"]) == 0
    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert any(k.startswith("image.conv_stem.") for k in weights) and "image.patch_embed.weight" not in weights
    products, _ = square_data
    emb = DualEncoder.from_pretrained(tmp_path / "c", device="cpu").embed(products[:4], "image")
    assert emb.shape[0] == 4 and np.isfinite(emb).all()
