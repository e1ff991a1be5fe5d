"""Run folders: a corrupted model is refused."""

from __future__ import annotations

import shutil

import pytest

from item_embed.checkpoint import CheckpointError, load_model


def test_corrupted_model_is_refused(tiny_run, tmp_path):
    run = tmp_path / "bad"
    shutil.copytree(tiny_run, run)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(run)
