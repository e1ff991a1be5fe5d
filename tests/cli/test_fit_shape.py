"""`item-embed fit-shape`: a slice for a model trained without one, from a catalog or a cache."""

from __future__ import annotations

import numpy as np
import torch

from item_embed.encode import ItemEncoder


def _photos(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random blocky photos: coarse random fields upsampled, so gradients vary between photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    return coarse.repeat(4, axis=1).repeat(4, axis=2)


def test_fit_shape_gives_a_model_without_a_slice_one_and_keeps_cls(tiny_catalog, tmp_path, capsys):
    from PIL import Image

    from item_embed.cli import main

    plain = tmp_path / "plain"
    assert main(["train", str(tiny_catalog), "--out", str(plain), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "8", "--no-progress", "--precision", "fp32", "--shape-dims", "0"]) == 0
    before = ItemEncoder.from_pretrained(plain, device="cpu")
    assert before.model.shape is None and before.dim == 64
    shaped = tmp_path / "shaped"
    assert main(["fit-shape", str(tiny_catalog), "--model", str(plain), "--out", str(shaped), "--shape-dims", "16",
                 "--no-progress"]) == 0
    after = ItemEncoder.from_pretrained(shaped, device="cpu")
    assert after.model.shape.fitted and after.dim == 64 + 16 and after.model_id != before.model_id
    photo = Image.open(tiny_catalog.parent / "images" / sorted((tiny_catalog.parent / "images").iterdir())[0].name)
    recs = [{"title": "blue striped mug", "image": photo}, {"title": "blue striped mug"}]
    old, new = before.encode(recs), after.encode(recs)
    # Same transformer: the [CLS] part is the old embedding, scaled by the slice's share of the norm.
    np.testing.assert_allclose(new[0, :64] / np.linalg.norm(new[0, :64]), old[0], atol=1e-5)
    np.testing.assert_allclose(new[1, :64], old[1], atol=1e-5)
    capsys.readouterr()
    assert main(["fit-shape", str(tiny_catalog), "--model", str(plain), "--out", str(plain)]) == 2
    assert "must be a new folder" in capsys.readouterr().err


def test_fit_shape_from_a_cache_and_a_cache_of_another_size(tiny_catalog, tiny_run, tmp_path, capsys):
    from item_embed.cli import main

    cache = tmp_path / "cache"
    assert main(["prepare", str(tiny_catalog), "--out", str(cache), "--preset", "tiny", "--no-progress"]) == 0
    out = tmp_path / "refit"
    assert main(["fit-shape", str(cache), "--model", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    refit = ItemEncoder.from_pretrained(out, device="cpu")
    assert refit.model.shape.fitted and int(refit.model.shape.photos) == 121
    # The catalog file streams through the same fit: the same photos give the same slice.
    streamed = tmp_path / "streamed"
    assert main(["fit-shape", str(tiny_catalog), "--model", str(tiny_run), "--out", str(streamed), "--no-progress"]) == 0
    from_file = ItemEncoder.from_pretrained(streamed, device="cpu").model.shape
    torch.testing.assert_close(from_file.mean, refit.model.shape.mean)
    torch.testing.assert_close(from_file.proj, refit.model.shape.proj)
    wrong = tmp_path / "cache48"
    assert main(["prepare", str(tiny_catalog), "--out", str(wrong), "--preset", "tiny", "--image-size", "48",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["fit-shape", str(wrong), "--model", str(tiny_run), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "prepared at 48 px, the model reads 32 px" in capsys.readouterr().err


def test_fit_shape_from_a_catalog_keeps_every_kth_photo_past_the_cap(tiny_catalog, tiny_run, tmp_path, monkeypatch):
    import item_embed.model.shape as shape_module
    from item_embed.cli import main
    from item_embed.data.catalog import Catalog

    monkeypatch.setattr(shape_module, "FIT_MAX_PHOTOS", 50)
    out = tmp_path / "capped"
    assert main(["fit-shape", str(tiny_catalog), "--model", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    step = -(-len(Catalog.open(tiny_catalog)) // 50)
    assert step > 1 and int(ItemEncoder.from_pretrained(out, device="cpu").model.shape.photos) == -(-121 // step) <= 50


def test_fit_shape_refuses_a_catalog_with_one_photo_naming_it(tiny_run, tmp_path, capsys):
    import io

    import pandas as pd
    from PIL import Image

    from item_embed.cli import main

    buf = io.BytesIO()
    Image.fromarray(_photos(1)[0]).save(buf, format="PNG")
    catalog = tmp_path / "one_photo.parquet"
    pd.DataFrame({"id": ["a", "b"], "title": ["blue mug", "red mug"], "image": [buf.getvalue(), None]}).to_parquet(catalog)
    capsys.readouterr()
    assert main(["fit-shape", str(catalog), "--model", str(tiny_run), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(catalog) in err and "at least 2 photos to fit, got 1" in err
