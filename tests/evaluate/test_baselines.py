"""The BENCHMARKS.md baselines as featurizers: definitions on the built-in catalog, and (slow) the
reproduction of the reference numbers on the real catalogs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from item_embed.data.catalog import Catalog
from item_embed.evaluate.baselines import (
    BASELINES,
    DEFAULT_BASELINES,
    FusionBaseline,
    MiniLMBaseline,
    PHashBaseline,
    Pixels16Baseline,
    TfidfBaseline,
    make_baselines,
)
from item_embed.evaluate.featurizers import MODES, RawProducts
from item_embed.evaluate.harness import evaluate_featurizer

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def products(tiny_catalog) -> RawProducts:
    return RawProducts.from_catalog(Catalog.open(tiny_catalog))


@pytest.fixture(scope="module")
def baselines(products):
    feats = {f.name: f for f in make_baselines(BASELINES)}
    for f in feats.values():
        if hasattr(f, "fit"):
            f.fit(products)
    return feats


def test_make_baselines_shares_fusion_parts_and_rejects_unknown():
    feats = {f.name: f for f in make_baselines(DEFAULT_BASELINES)}
    assert list(feats) == ["tfidf", "minilm", "pixels16", "phash", "fusion"]
    assert feats["fusion"].text is feats["minilm"] and feats["fusion"].image is feats["pixels16"]
    feats = {f.name: f for f in make_baselines(["hog", "fusion_hog", "minilm"])}
    assert feats["fusion_hog"].text is feats["minilm"] and feats["fusion_hog"].image is feats["hog"]
    with pytest.raises(ValueError, match="clip"):
        make_baselines(["tfidf", "clip"])


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_embeds_every_mode_unit_rows(baselines, products, name):
    f = baselines[name]
    for mode in ("joint", "image", "title"):
        e = f.embed(products, mode)
        assert e.shape[0] == len(products) and e.dtype == np.float32
        norms = np.linalg.norm(e, axis=1)
        assert np.all((np.abs(norms - 1) < 1e-4) | (norms == 0)), f"{name} {mode} rows not unit length"
    res = evaluate_featurizer(f, products, group="group", labels=["category"], modes=MODES)
    joint = res["retrieval"]["joint"]
    assert joint["queries"] == len(products)  # every synthetic product is listed 2-4 times
    # Far above chance (~2.5 same-group items among 120): every baseline finds some duplicates.
    assert joint["R@10"] > 0.3, f"{name}: {joint}"
    assert 0.0 <= res["probe"]["category"]["linear"]["accuracy"] <= 1.0
    assert ("image2image" in res["retrieval"]) == ("image" in f.modalities)


def test_text_baselines_answer_image_queries_with_blank_text(baselines, products):
    for name in ("tfidf", "minilm", "minilm_title"):
        e = baselines[name].embed(products, "image")
        assert np.allclose(e, e[0]), f"{name}: image-only queries should all be the blank-text vector"
    # TF-IDF of blank text is the zero vector; MiniLM of "" is some fixed unit vector.
    assert np.all(baselines["tfidf"].embed(products, "image") == 0)


def test_text_is_title_dot_description_when_the_catalog_has_one():
    frame = pd.DataFrame({"id": ["a", "b", "c"], "title": ["Red  shirt", "Blue mug", None],
                          "description": ["Cotton.", None, "Just a description"]})
    p = RawProducts.from_frame(frame)
    assert p.has_description
    assert p.texts("joint", True) == ["Red shirt. Cotton.", "Blue mug", "Just a description"]
    assert p.texts("joint", False) == ["Red shirt", "Blue mug", ""]
    assert p.texts("title", True) == ["Red shirt", "Blue mug", ""]
    assert p.texts("image", True) == ["", "", ""]
    assert not RawProducts.from_frame(frame.drop(columns="description")).has_description


def test_tfidf_title_queries_differ_from_joint_when_there_is_a_description():
    frame = pd.DataFrame({"id": list("abcd"), "title": ["red shirt", "red shirt", "blue mug", "green mug"],
                          "description": ["soft cotton tee", "soft cotton tee", "stoneware", "porcelain cup"]})
    p = RawProducts.from_frame(frame)
    f = TfidfBaseline().fit(p)
    assert not np.allclose(f.embed(p, "joint"), f.embed(p, "title"))
    assert f.embed(p, "joint").shape == (4, 3)  # 256 clipped to what 4 products allow


def test_pixels16_is_a_bilinear_16px_thumbnail_of_the_raw_photo(products, baselines, tiny_catalog):
    from sklearn.decomposition import PCA

    f = baselines["pixels16"]
    thumbs = np.stack([
        np.asarray(Image.open(tiny_catalog.parent / v).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR),
                   dtype=np.float32).reshape(-1) / 255.0 for v in products.images])
    z = PCA(min(128, len(products)), random_state=0).fit_transform(thumbs)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(np.abs(f.embed(products, "joint")), np.abs(z), atol=1e-4)  # PCA signs may flip
    # Title-only queries: one blank (white) picture for everyone.
    t = f.embed(products, "title")
    assert np.allclose(t, t[0])


def test_phash_cosine_is_hamming(products, baselines):
    import imagehash

    e = baselines["phash"].embed(products, "joint")
    assert e.shape[1] == 64 and np.allclose(np.abs(e), 1 / 8)
    bits = np.stack([imagehash.phash(Image.open(products.image_root / v)).hash.reshape(-1)
                     for v in products.images[:10]])
    np.testing.assert_array_equal(e[:10] > 0, bits)
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.testing.assert_allclose(e[:10] @ e[:10].T, 1 - 2 * hamming / 64, atol=1e-6)


def test_fusion_is_minilm_and_half_pixels(products, baselines):
    t = baselines["minilm"].embed(products, "joint")
    p = baselines["pixels16"].embed(products, "joint")
    expected = np.hstack([t, 0.5 * p]) / np.sqrt(1 + 0.25)
    np.testing.assert_allclose(baselines["fusion"].embed(products, "joint"), expected, atol=1e-5)


def test_fusion_hog_is_minilm_and_half_hog(products, baselines):
    for mode in ("joint", "image"):  # image mode: blank text beside the photo's HOG
        t = baselines["minilm"].embed(products, mode)
        h = baselines["hog"].embed(products, mode)
        expected = np.hstack([t, 0.5 * h]) / np.sqrt(1 + 0.25)
        np.testing.assert_allclose(baselines["fusion_hog"].embed(products, mode), expected, atol=1e-5)


def test_minilm_without_sentence_transformers_gives_the_same_vectors():
    from item_embed.evaluate.baselines import _load_minilm, _plain_minilm
    from item_embed.model.encoder import minilm_path

    pytest.importorskip("sentence_transformers")
    texts = ["Red cotton shirt. Soft jersey.", "blue mug", "", "a much longer title " * 20]
    st = _load_minilm("cpu")(texts, 2)
    plain = _plain_minilm(minilm_path(), "cpu")(texts, 2)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    np.testing.assert_allclose(plain, st, atol=2e-5)


def test_minilm_title_ignores_the_description():
    frame = pd.DataFrame({"id": ["a", "b"], "title": ["red shirt", "red shirt"],
                          "description": ["cotton tee", "wool jumper for winter"]})
    p = RawProducts.from_frame(frame)
    title_only = MiniLMBaseline(title_only=True).embed(p, "joint")
    np.testing.assert_allclose(title_only[0], title_only[1], atol=1e-6)
    full = MiniLMBaseline().embed(p, "joint")
    assert float(full[0] @ full[1]) < 0.99


def test_baseline_classes_are_named_as_in_the_cli():
    assert [c().name for c in (TfidfBaseline, PHashBaseline, Pixels16Baseline)] == ["tfidf", "phash", "pixels16"]
    assert FusionBaseline(MiniLMBaseline(), Pixels16Baseline()).name == "fusion"


# ---------------------------------------------------------------------------------------------
# Real data: the BENCHMARKS.md numbers, within 0.01
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "hm-dev.parquet").is_file(), reason="../shared/data/hm-dev.parquet absent")
@pytest.mark.parametrize("catalog", ["hm-dev", "fashion-small"])
def test_reproduces_benchmarks_md(catalog):
    sys.path.insert(0, str(BENCH_DIR))
    import bench_baselines

    rows = bench_baselines.reproduce(catalog)
    assert rows, "nothing compared"
    off = [r for r in rows if abs(r.got - r.reference) > bench_baselines.TOLERANCE]
    assert not off, "off the reference by more than 0.01: " + "; ".join(map(str, off))


def test_hog_is_the_patch_hog_of_the_96px_photo(products, tiny_catalog):
    import torch

    from item_embed.evaluate.baselines import HogBaseline, _hog
    from item_embed.data.images import patch_hog

    f = HogBaseline()
    raw = np.stack([patch_hog(torch.from_numpy(np.asarray(
        Image.open(tiny_catalog.parent / v).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)).copy())[None],
        16).reshape(-1).numpy() for v in products.images])
    expected = raw - raw.mean(axis=0)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(f.embed(products, "joint"), expected, atol=1e-5)
    assert expected.shape[1] == 36 * 36  # 6x6 blocks of 2x2 cells x 9 orientations
    t = f.embed(products, "title")  # no picture: one blank (white) picture for everyone
    assert np.allclose(t, t[0])
    # Colour-free: the same photo with its channels swapped embeds the same.
    im = Image.open(tiny_catalog.parent / products.images[0]).convert("RGB")
    swapped = Image.merge("RGB", im.split()[::-1])
    a, b = _hog(im), _hog(swapped)
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.95
