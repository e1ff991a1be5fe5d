"""The harness: query-mode plumbing, one split for every feature, the CLI's full form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from item_embed.evaluate.featurizers import (
    MODES,
    CachedFeaturizer,
    EncoderFeaturizer,
    RawProducts,
)
from item_embed.evaluate.harness import (
    evaluate_all,
    evaluate_featurizer,
    results_markdown,
)
from item_embed.evaluate.metrics import split_test_mask


def unit(*angles_deg):
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


class FakeFeaturizer(CachedFeaturizer):
    """Known embeddings per mode; counts how often each mode is embedded."""

    def __init__(self, by_mode, modalities=("text", "image"), name="fake"):
        super().__init__()
        self.by_mode = by_mode
        self.modalities = frozenset(modalities)
        self.name = name
        self.calls = []

    def _embed(self, products, mode):
        self.calls.append(mode)
        return self.by_mode.get(mode)


def _products(n, groups=None, images=None, **labels):
    frame = pd.DataFrame({"id": [f"p{i}" for i in range(n)], **({"group": groups} if groups is not None else {}),
                          **labels})
    return RawProducts([f"p{i}" for i in range(n)], [f"title {i}" for i in range(n)], [None] * n,
                       images if images is not None else [b"img"] * n, frame)


def test_query_modes_use_the_right_embeddings():
    # Gallery (joint): a=0 deg, b=90, a=180, b=270. Joint queries find nothing of their own group at rank 1
    # (the 90-degree neighbours are the other group); image-only queries sit next to their partner.
    joint = unit(0, 90, 180, 270)
    image = unit(175, 265, 5, 85)  # row 0's image query is 5 deg from row 2 (a): hit; etc.
    groups = ["a", "b", "a", "b"]
    fake = FakeFeaturizer({"joint": joint, "image": image, "title": None})
    res = evaluate_featurizer(fake, _products(4, groups), group="group", modes=MODES)
    assert res["retrieval"]["joint"]["R@1"] == 0.0  # 0 deg -> 90 (b) and 270 (b) tie before 180 (a)
    assert res["retrieval"]["image"]["R@1"] == 1.0 and res["retrieval"]["image"]["queries"] == 4
    # image2image: both sides the image embeddings. Row 0 (175) -> nearest other image: row 1 (265, b)? no:
    # 175 vs 265 is 90, vs 5 is 170, vs 85 is 90: ties 1 (b) then 3 (b) -> miss. All four miss the same way.
    assert res["retrieval"]["image2image"]["R@1"] == 0.0
    assert "title" not in res["retrieval"]  # the featurizer cannot embed title mode
    assert sorted(set(fake.calls)) == ["image", "joint", "title"] and len(fake.calls) == 3  # each mode once


def test_image_queries_skip_products_without_an_image_and_text_features_skip_image2image():
    joint = unit(0, 10, 100, 110)
    fake = FakeFeaturizer({"joint": joint, "image": joint, "title": joint}, modalities=("text",))
    products = _products(4, ["a", "a", "b", "b"], images=[b"x", None, b"x", b"x"])
    res = evaluate_featurizer(fake, products, group="group", modes=MODES)
    assert res["retrieval"]["joint"]["queries"] == 4
    assert res["retrieval"]["image"]["queries"] == 3
    assert res["retrieval"]["title"]["queries"] == 4
    assert "image2image" not in res["retrieval"]


def test_products_without_a_group_are_singletons_not_one_group():
    joint = unit(0, 1, 2, 90)
    fake = FakeFeaturizer({"joint": joint})
    products = _products(4, ["a", None, None, "a"])
    res = evaluate_featurizer(fake, products, group="group", modes=["joint"])
    # Only the two "a" products query; the missing-group ones would form a group if lumped together.
    assert res["retrieval"]["joint"]["queries"] == 2


def test_evaluate_all_same_split_for_every_feature():
    rng = np.random.default_rng(1)
    n = 60
    groups = [f"g{i // 3}" for i in range(n)]
    labels = [f"c{i // 15}" for i in range(n)]
    e1 = rng.normal(size=(n, 4)).astype(np.float32)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    f1, f2 = FakeFeaturizer({"joint": e1}, name="one"), FakeFeaturizer({"joint": e1.copy()}, name="two")
    res = evaluate_all(_products(n, groups, cat=labels), [f1, f2], group="group", labels=["cat"], modes=["joint"])
    assert res["n_products"] == n and set(res["features"]) == {"one", "two"}
    assert res["features"]["one"] == res["features"]["two"]
    assert res["features"]["one"]["probe"]["cat"]["knn"]["test"] == sum(split_test_mask(groups))
    assert "| one | joint |" in results_markdown(res)
    assert "- Features: `one`, `two`" in results_markdown(res)  # no --model: the header names what was run


@pytest.fixture(scope="module")
def tiny_products(tiny_catalog):
    from item_embed.data.catalog import Catalog

    return RawProducts.from_catalog(Catalog.open(tiny_catalog))


def test_cli_full_form_writes_results_json(tiny_catalog, tiny_run, tmp_path, capsys):
    import json

    from item_embed.cli import main

    out = tmp_path / "eval"
    rc = main(["evaluate", str(tiny_catalog), "--model", str(tiny_run), "--group", "group",
               "--labels", "category,colour", "--baselines", "tfidf,minilm,pixels16,phash,fusion",
               "--out-dir", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"catalog", "model", "n_products", "features", "diagnostics", "commands", "seconds",
                        "precision"}
    assert res["precision"]["item"] in ("bf16", "fp32")  # what --precision auto resolved to
    assert res["catalog"] == str(tiny_catalog) and res["model"] == str(tiny_run)
    assert res["n_products"] == len(pd.read_csv(tiny_catalog))
    assert list(res["features"]) == ["item", "tfidf", "minilm", "pixels16", "phash", "fusion"]
    item = res["features"]["item"]
    assert list(item["retrieval"]) == list(MODES)
    for mode, m in item["retrieval"].items():
        rank_metric = "MRR" if mode == "title2image" else "MAP@R"
        assert set(m) == {"R@1", "R@10", rank_metric, "queries"} and 0.0 <= m["R@1"] <= m["R@10"] <= 1.0
    assert "image2image" not in res["features"]["tfidf"]["retrieval"]  # text only
    assert "image2image" in res["features"]["phash"]["retrieval"]
    for name, feat in res["features"].items():
        assert set(feat["probe"]) == {"category", "colour"}
        for probe in feat["probe"].values():
            assert set(probe) == {"linear", "knn"}
            assert set(probe["linear"]) >= {"accuracy", "macro_f1"} and set(probe["knn"]) >= {"accuracy", "macro_f1"}
    assert set(res["diagnostics"]) == {"cls_attention_image", "cls_attention_text", "cos_joint_image",
                                       "cos_joint_title"}
    assert item["diagnostics"] == res["diagnostics"]  # each ITEm model carries its own; baselines none
    assert all("diagnostics" not in f for name, f in res["features"].items() if name != "item")
    assert res["commands"][0].startswith(f"item-embed evaluate {tiny_catalog} --model {tiny_run}")
    assert set(res["seconds"]) >= set(res["features"])
    md = (out / "results.md").read_text()
    assert "| item | image2image |" in md and "cls_attention_image" in md
    printed = capsys.readouterr().out
    assert "Same-product retrieval" in printed and "fusion" in printed


def test_cli_rejects_unknown_mode_and_baseline(tiny_catalog, capsys):
    from item_embed.cli import main

    assert main(["evaluate", str(tiny_catalog), "--baselines", "tfidf", "--modes", "joint,sideways"]) == 2
    assert "sideways" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_catalog), "--baselines", "tfidf,clip"]) == 2
    assert "clip" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_catalog), "--baselines", "tfidf", "--group", "nope"]) == 2


def test_a_mode_aware_encoder_plugs_in_like_the_dual_encoder(tmp_path):
    """The dual-encoder contract: ``to_product(record, i, root)`` then ``encode_products(products, mode)``."""
    from item_embed.data.catalog import Product
    from item_embed.evaluate.featurizers import load_featurizer

    class ModeAware:
        dim = 2

        def __init__(self):
            self.seen = []

        def to_product(self, rec, index, root):
            return Product(index, rec["id"], rec.get("title"), rec.get("image"))

        def encode_products(self, products, mode):
            self.seen.append((mode, [(p.text is not None, p.image is not None) for p in products]))
            angle = {"joint": 0.0, "image": 90.0, "title": 180.0}[mode]
            return np.repeat(unit(angle), len(products), axis=0)

    enc = ModeAware()
    feat = EncoderFeaturizer(enc, "dual:x", batch_size=2, pass_mode=True)
    products = _products(3, images=[b"a", None, b"c"])
    image = feat.embed(products, "image")
    # The product without an image gets a zero row and is never sent to the encoder in image mode.
    np.testing.assert_allclose(image, [[0, 1], [0, 0], [0, 1]], atol=1e-6)
    assert [m for m, _ in enc.seen] == ["image"] and enc.seen[0][1] == [(False, True), (False, True)]
    title = feat.embed(products, "title")
    np.testing.assert_allclose(title, np.repeat(unit(180), 3, axis=0), atol=1e-6)
    assert all(flags == [(True, False)] * len(flags) for m, flags in enc.seen if m == "title")
    with pytest.raises(ValueError, match="unknown kind"):
        load_featurizer("clip:somewhere")
    with pytest.raises(ValueError, match="KIND:DIR"):
        load_featurizer("dual")


def test_title2image_asks_titles_for_photos_with_or_without_groups():
    """Title-only queries against every photo-only embedding: the product's own photo (or, with
    groups, any photo of its group) is the answer; products without a photo are neither side."""
    title = unit(0, 90, 180, 270)
    image = unit(100, 5, 265, 185)  # product 0's title (0 deg) is nearest product 1's photo (5 deg)
    fake = FakeFeaturizer({"joint": title, "title": title, "image": image})
    alone = evaluate_featurizer(fake, _products(4), modes=["title2image"])["retrieval"]["title2image"]
    assert alone["queries"] == 4 and alone["R@1"] == 0.0  # each title's nearest photo is another product's
    grouped = evaluate_featurizer(fake, _products(4, ["a", "a", "b", "b"]), group="group",
                                  modes=["title2image"])["retrieval"]["title2image"]
    assert grouped["R@1"] == 1.0 and grouped["MRR"] == 1.0  # ... of the same group
    no_photo = _products(4, images=[b"x", None, b"x", b"x"])
    assert evaluate_featurizer(fake, no_photo, modes=["title2image"])["retrieval"]["title2image"]["queries"] == 3
    text_only = FakeFeaturizer({"joint": title, "title": title}, modalities=("text",))
    assert "title2image" not in evaluate_featurizer(text_only, _products(4), modes=["title2image"])["retrieval"]


def test_probes_on_photo_only_embeddings_read_the_image_mode_of_products_with_a_photo():
    rng = np.random.default_rng(0)
    n = 80
    labels = np.array([f"c{i % 2}" for i in range(n)])
    image = np.where((labels == "c0")[:, None], [1.0, 0.0], [0.0, 1.0]) + rng.normal(0, 0.05, (n, 2))
    joint = rng.normal(size=(n, 2))  # the joint embedding knows nothing of the label
    fake = FakeFeaturizer({"joint": joint.astype(np.float32), "image": image.astype(np.float32)})
    images = [b"x"] * (n - 10) + [None] * 10
    res = evaluate_featurizer(fake, _products(n, images=images, cat=labels), labels=["cat"], modes=[],
                              probe_modes=["joint", "image"])
    assert res["probe"]["cat (image)"]["linear"]["accuracy"] == 1.0
    assert res["probe"]["cat (image)"]["linear"]["test"] < res["probe"]["cat"]["linear"]["test"]  # photos only
    assert res["probe"]["cat"]["linear"]["accuracy"] < 0.9
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate_featurizer(fake, _products(n, cat=labels), labels=["cat"], modes=[], probe_modes=["title"])


def test_item_cls_featurizer_is_the_model_without_its_shape_slice(tiny_run, tiny_products):
    from item_embed.evaluate.featurizers import load_featurizer

    whole = load_featurizer(f"item:{tiny_run}", device="cpu", precision="fp32")
    cls = load_featurizer(f"item-cls:{tiny_run}", device="cpu", precision="fp32")
    assert cls.name == f"item-cls:{tiny_run.name}" and cls.encoder.dim == whole.encoder.cfg.hidden_size
    assert cls.encoder.model_id != whole.encoder.model_id
    a, b = whole.embed(tiny_products, "title"), cls.embed(tiny_products, "title")
    # A title-only product has no shape part: its [CLS] part is the whole embedding, renormalised.
    np.testing.assert_allclose(a[:, : b.shape[1]] / np.linalg.norm(a[:, : b.shape[1]], axis=1, keepdims=True), b,
                               atol=1e-5)
