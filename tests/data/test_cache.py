"""The preprocessing cache: trains exactly like the catalog it was made from."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file

from item_embed.cli import main

TRAIN = ["--preset", "tiny", "--batch-size", "8", "--no-progress", "--precision", "fp32"]


def test_prepare_cache_trains_exactly_like_the_catalog(tiny_catalog, tiny_run, tmp_path):
    """`prepare` decodes once into a memory-mapped cache; training from it gives the same weights."""
    cache = tmp_path / "cache"
    assert main(["prepare", str(tiny_catalog), "--out", str(cache), "--preset", "tiny"]) == 0
    report = json.loads((cache / "catalog_report.json").read_text())
    assert report["rows_in"] == report["rows_used"] + report["rows_reported"]
    run = tmp_path / "from-cache"
    assert main(["train", str(cache), "--out", str(run), "--steps", "6", "--save-every", "3", *TRAIN]) == 0
    a, b = load_file(str(tiny_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # A cache fixes the preprocessing: asking for another image size is refused, not silently ignored.
    assert main(["train", str(cache), "--out", str(tmp_path / "x"), "--image-size", "64", "--steps", "1",
                 *TRAIN]) == 2
