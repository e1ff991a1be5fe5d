"""Shared tiny fixtures: a small built-in catalog and a tiny trained run (session-scoped)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Path:
    """CSV catalog with image files: 40 products x 2-4 listings at 32 px."""
    from item_embed.data.synthetic import write_catalog

    return write_catalog(tmp_path_factory.mktemp("catalog"), n_products=40, seed=0, image_size=32)


@pytest.fixture(scope="session")
def tiny_run(tiny_catalog, tmp_path_factory) -> Path:
    """A tiny-preset model trained for a few steps on the tiny catalog."""
    from item_embed.cli import main

    run = tmp_path_factory.mktemp("run")
    rc = main(["train", str(tiny_catalog), "--out", str(run), "--preset", "tiny", "--steps", "6",
               "--batch-size", "8", "--save-every", "3", "--no-progress", "--precision", "fp32"])
    assert rc == 0
    return run
