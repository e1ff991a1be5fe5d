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


def test_title_only_views_survive_the_cache(tmp_path):
    """A product whose text holds a description keeps its title alone too (title-only training views)."""
    from item_embed.data.arrays import ProductArrays, load_tokenizer
    from item_embed.data.cache import load_cache, write_cache
    from item_embed.data.catalog import Product

    tok = load_tokenizer()
    products = [Product(0, "a", "Tank top. Soft cotton jersey", None, "Tank top"), Product(1, "b", "Mug", None)]
    write_cache([products], tmp_path / "c", tok, 32, 16)
    arrays, _ = load_cache(tmp_path / "c")
    fresh = ProductArrays.build(products, tok, 16, 32)
    for a in (arrays, fresh):
        assert list(a.title_lengths) == [4, 3] and list(a.lengths) == [8, 3]
        title = a.batch([0], title_only=True).input_ids[0].tolist()
        assert tok.decode(title) == "[CLS] tank top [SEP]"
