"""Classifier fine-tuning through the shared engine: checkpoints, metrics.jsonl and exact resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import torch

from item_embed.checkpoint import checkpoint_dirs
from item_embed.config import TrainConfig
from item_embed.data.arrays import ProductArrays
from item_embed.data.catalog import Catalog
from item_embed.encode import ItemEncoder
from item_embed.train.finetune import FineTuning, finetune


def _task(tiny_run, tiny_catalog, seed: int = 0) -> FineTuning:
    encoder = ItemEncoder.from_pretrained(tiny_run, device="cpu", precision="fp32")
    products = Catalog.open(tiny_catalog).load_all(encoder.cfg.image_size)
    data = ProductArrays.build(products, encoder.tokenizer, encoder.cfg.max_text_len, encoder.cfg.image_size)
    labels = pd.read_csv(tiny_catalog)["category"].astype("category").cat.codes.to_numpy()
    torch.manual_seed(seed)
    return FineTuning(encoder.model, int(labels.max()) + 1, data, np.arange(len(data)), labels)


def test_finetuning_resumes_exactly_from_its_checkpoint(tiny_run, tiny_catalog, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-4, new_lr_scale=10.0, precision="fp32", save_every=2)
    meta = {"finetune": {"finetuned_from": "tiny"}}
    full = _task(tiny_run, tiny_catalog)
    finetune(full, cfg, tmp_path / "full", meta=meta, log=lambda _m: None)
    log = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and {"loss", "accuracy", "lr"} <= set(log[0])
    assert [p.name for p in checkpoint_dirs(tmp_path / "full")] == ["step-00000006", "step-00000004"]

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    resumed = _task(tiny_run, tiny_catalog, seed=1)  # another head init: the checkpoint must overwrite it
    messages: list[str] = []
    finetune(resumed, cfg, tmp_path / "cut", resume=True, meta=meta, log=messages.append)
    assert any("resumed from step-00000004" in m for m in messages)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resuming_another_finetuning_is_refused(tiny_run, tiny_catalog, tmp_path):
    import pytest

    cfg = TrainConfig(steps=2, batch_size=8, precision="fp32", save_every=1)
    finetune(_task(tiny_run, tiny_catalog), cfg, tmp_path, meta={"finetune": {"labels": ["a"]}}, log=lambda _m: None)
    with pytest.raises(ValueError, match="fine-tunes something else"):
        finetune(_task(tiny_run, tiny_catalog), cfg, tmp_path, resume=True, meta={"finetune": {"labels": ["b"]}})
