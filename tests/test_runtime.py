"""Where the math runs: precision resolution."""

from __future__ import annotations

import pytest
import torch

from item_embed.config import model_config_for
from item_embed.data.arrays import load_tokenizer
from item_embed.encode import ItemEncoder
from item_embed.model.encoder import ItemModel
from item_embed.runtime import resolve_precision


def test_auto_precision_follows_the_hardware(monkeypatch):
    """``auto`` (the library's default too) is bf16 only where the device has native bf16 matrix units;
    explicit choices stand."""
    from item_embed import runtime

    model = ItemModel(model_config_for("tiny")).eval()
    tok = load_tokenizer()
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        auto = ItemEncoder(model, tok, device="cpu", precision="auto")
        assert auto.precision == expected and (auto.runner is model) == (expected == "fp32")
        assert ItemEncoder(model, tok, device="cpu").precision == expected
        assert ItemEncoder(model, tok, device="cpu", precision="fp32").precision == "fp32"
        assert ItemEncoder(model, tok, device="cpu", precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="'fp16'"):
        ItemEncoder(model, tok, device="cpu", precision="fp16")
    monkeypatch.undo()
    assert isinstance(runtime.native_bf16("cpu"), bool) and runtime.native_bf16("meta") is False


def test_training_resolves_auto_and_records_the_choice(tiny_run):
    """A run's saved train config holds the precision auto resolved to on this machine, never "auto"."""
    import json

    from item_embed.checkpoint import latest_good_checkpoint
    from item_embed.config import TrainConfig
    from item_embed.train.engine import resolve

    saved = json.loads((tiny_run / "config.json").read_text())["train"]["precision"]
    assert saved == "fp32"  # tiny_run asks for fp32
    assert latest_good_checkpoint(tiny_run)[2]["train"]["precision"] == "fp32"
    auto = resolve(TrainConfig(), torch.device("cpu"), 1.0).precision
    assert auto == resolve_precision("auto", "cpu") and auto in ("bf16", "fp32")
