"""Metrics against hand-computed tiny cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from item_embed.evaluate import knn_classify, retrieval_metrics, split_test_mask


def unit(*angles_deg):
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_retrieval_hand_computed():
    # Points on a circle. Groups: A = {0, 1} (size 2), B = {2, 3, 4} (size 3), C = {5} (singleton distractor).
    emb = unit(0, 10, 100, 120, 25, 5)
    groups = ["A", "A", "B", "B", "B", "C"]
    m = retrieval_metrics(emb, emb, groups)
    # Queries: rows 0-4 (C is a singleton). Nearest other points:
    # 0 -> 5 (5 deg, C) miss; 1 -> 5 (5 deg) miss; 2 -> 3 (20 deg) hit; 3 -> 2 hit; 4 -> 1 (15 deg, A) miss.
    assert m["queries"] == 5
    assert m["R@1"] == pytest.approx(2 / 5)
    assert m["R@10"] == pytest.approx(1.0)
    # MAP@R: R=1 for A, 2 for B.
    # q0: ranking 5,1,... first result miss -> AP@1 = 0.   q1: 5,0 -> 0.
    # q2: ranking 3 (hit, P=1), 4 (75 deg) vs 1 (90 deg): 4 hit, P=1 -> AP = (1+1)/2 = 1.
    # q3: ranking 2 (hit), then 4 (95 deg) vs 1 (110 deg): 4 hit -> 1.
    # q4 (25 deg): ranking 1 (15 deg away), 5 (20), 0 (25): top R=2 are both misses -> 0.
    assert m["MAP@R"] == pytest.approx((0 + 0 + 1 + 1 + 0) / 5)


def test_retrieval_ties_break_by_gallery_order():
    # Query 0 has two gallery items at exactly the same similarity: row 1 (other group) before row 2 (its group).
    emb = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=np.float32)
    groups = ["g", "h", "g", "h"]
    m = retrieval_metrics(emb, emb, groups)
    # q0 (g): 3 (sim 1, h) miss first.  q1 (h): 2 (sim 1, g) first: miss.  q2 (g): 1 (sim 1, h) miss.  q3 (h): 0 miss.
    assert m["R@1"] == 0.0
    assert m["R@10"] == 1.0
    # Swap the order of the tied rows: now the hit comes first for every query.
    reordered = emb[[0, 3, 1, 2]]  # rows: g, g, h, h -> each query's tied partner now comes first
    m2 = retrieval_metrics(reordered, reordered, ["g", "g", "h", "h"])
    assert m2["R@1"] == 1.0 and m2["MAP@R"] == 1.0


def test_separate_query_embeddings_with_query_rows():
    gallery = unit(0, 90, 180, 270)
    groups = ["a", "b", "a", "b"]
    # Image-only queries that sit next to their own group's other member.
    queries = unit(175, 265)  # query for row 0 (a) is near row 2 (a); for row 1 (b) near row 3 (b)
    m = retrieval_metrics(queries, gallery, groups, query_rows=np.array([0, 1]))
    assert m["R@1"] == 1.0 and m["queries"] == 2


def test_split_never_puts_a_group_on_both_sides():
    groups = np.repeat([f"g{i}" for i in range(200)], 3)
    test = split_test_mask(groups)
    frame = pd.DataFrame({"g": groups, "t": test})
    assert (frame.groupby("g")["t"].nunique() == 1).all()
    assert 0.1 < test.mean() < 0.3
    # The reference split of BENCHMARKS.md.
    assert np.array_equal(test, pd.util.hash_array(groups.astype(str)) % 5 == 0)


def test_knn_hand_computed():
    emb = unit(0, 2, 4, 90, 92, 94, 1, 91)
    labels = ["x", "x", "x", "y", "y", "y", "x", "x"]  # row 7 is mislabelled relative to its neighbours
    test = np.array([False] * 6 + [True, True])
    m = knn_classify(emb, labels, test, k=3)
    assert m["accuracy"] == 0.5 and m["test"] == 2  # row 6 -> x (right), row 7 -> y (wrong)


# ---------------------------------------------------------------------------------------------
# Linear probe, query-mode plumbing, diagnostics, the CLI's full form
# ---------------------------------------------------------------------------------------------

from item_embed.evaluate import (  # noqa: E402
    MODES,
    CachedFeaturizer,
    ClsAttentionMeter,
    EncoderFeaturizer,
    RawProducts,
    cls_attention_shares,
    evaluate_all,
    evaluate_featurizer,
    linear_probe,
    results_markdown,
)


def test_linear_probe_separable_is_perfect_and_noise_is_not():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    centres = {"a": [5, 0, 0], "b": [0, 5, 0], "c": [0, 0, 5]}
    emb = np.array([centres[x] for x in labels], dtype=np.float32) + rng.normal(0, 0.3, (120, 3)).astype(np.float32)
    test = np.arange(120) % 5 == 0
    m = linear_probe(emb, labels, test)
    assert m == {"accuracy": 1.0, "macro_f1": 1.0, "test": 24}
    # Labels that the features do not carry: the probe cannot be right everywhere.
    shuffled = rng.permutation(labels)
    assert linear_probe(emb, shuffled, test)["accuracy"] < 0.8


def test_linear_probe_leaves_out_missing_labels():
    emb = np.array([[0.0], [0.1], [1.0], [1.1], [0.05], [1.05]], dtype=np.float32)
    labels = ["x", "x", "y", "y", None, "y"]
    test = np.array([False, False, False, False, True, True])
    m = linear_probe(emb, labels, test)
    assert m["test"] == 1 and m["accuracy"] == 1.0


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


def test_cls_attention_shares_hand_computed():
    import torch
    from torch import nn

    class SelfAttn(nn.Module):
        num_attention_heads, attention_head_size = 1, 2

        def __init__(self):
            super().__init__()
            self.query, self.key = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
            nn.init.eye_(self.query.weight)
            nn.init.eye_(self.key.weight)

    # CLS = (1, 0). Scores = q.k / sqrt(2): token 1 (text) (1,0) -> 1/sqrt2; token 2 (image) (0,0) -> 0;
    # token 3 (image, padded out) must not count.
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 0.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    shares = cls_attention_shares(SelfAttn(), hidden, mask, text_len=2)
    s = np.exp(1 / np.sqrt(2))
    expected_image = 1 / (2 * s + 1)
    np.testing.assert_allclose(shares.numpy(), [[1 - expected_image, expected_image]], rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_products(tiny_catalog):
    from item_embed.catalog import Catalog

    return RawProducts.from_catalog(Catalog.open(tiny_catalog))


def test_diagnostics_on_the_tiny_model(tiny_run, tiny_products):
    feat = EncoderFeaturizer.from_pretrained(tiny_run, device="cpu")
    d = feat.diagnostics(tiny_products)
    assert set(d) == {"cls_attention_image", "cls_attention_text", "cos_joint_image", "cos_joint_title"}
    assert 0.0 <= d["cls_attention_image"] <= 1.0 and 0.0 <= d["cls_attention_text"] <= 1.0
    assert d["cls_attention_image"] + d["cls_attention_text"] == pytest.approx(1.0, abs=1e-5)
    # The tiny model's image tokens outnumber its text tokens; an untrained-ish model attends to both.
    assert 0.0 < d["cls_attention_image"] < 1.0
    assert -1.0 <= d["cos_joint_image"] <= 1.0 and -1.0 <= d["cos_joint_title"] <= 1.0
    # The cosines are those of the three embeddings the featurizer returns.
    j, i, t = (feat.embed(tiny_products, m) for m in ("joint", "image", "title"))
    assert d["cos_joint_image"] == pytest.approx(float(np.sum(j * i, 1).mean()), abs=1e-6)
    assert d["cos_joint_title"] == pytest.approx(float(np.sum(j * t, 1).mean()), abs=1e-6)
    assert not np.allclose(j, i) and not np.allclose(j, t)  # the modes really left something out


def test_cls_attention_matches_eager_attention_weights(tiny_run, tiny_products):
    """The recomputed last-layer [CLS] attention equals what eager attention returns."""
    import torch
    from transformers.models.bert.modeling_bert import eager_attention_forward

    from item_embed.data import make_batch
    from item_embed.encode import ItemEncoder

    enc = ItemEncoder.from_pretrained(tiny_run, device="cpu")
    products = [enc.to_product(r, i, tiny_products.image_root) for i, r in enumerate(tiny_products.records()[:6])]
    products[1].image = None  # one product without an image: its image share must be 0 and not counted
    batch = make_batch(products, enc.tokenizer, enc.cfg.max_text_len, enc.cfg.image_size)
    layer = enc.model.bert.encoder.layer[-1]
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), ClsAttentionMeter(enc.model) as meter:
        out = enc.model(batch.input_ids, batch.text_mask, batch.images, batch.has_image)
    hook.remove()
    sa = layer.attention.self
    h = captured["h"].detach()
    b, length, _ = h.shape
    with torch.no_grad():
        q = sa.query(h).view(b, length, sa.num_attention_heads, -1).transpose(1, 2)
        k = sa.key(h).view(b, length, sa.num_attention_heads, -1).transpose(1, 2)
        additive = (1.0 - out.attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        _, weights = eager_attention_forward(sa, q, k, k, additive, scaling=sa.scaling, dropout=0.0)
    cls = weights[:, :, 0].mean(1)  # (B, L)
    image_share = cls[:, out.text_len:].sum(1)
    assert float(image_share[1]) == pytest.approx(0.0, abs=1e-6)
    both = [0, 2, 3, 4, 5]
    assert meter.count == 5
    assert meter.result()["cls_attention_image"] == pytest.approx(float(image_share[both].mean()), abs=1e-5)


def test_cli_full_form_writes_results_json(tiny_catalog, tiny_run, tmp_path, capsys):
    import json

    from item_embed.cli import main

    out = tmp_path / "eval"
    rc = main(["evaluate", str(tiny_catalog), "--model", str(tiny_run), "--group", "group",
               "--labels", "category,colour", "--baselines", "tfidf,minilm,pixels16,phash,fusion",
               "--out-dir", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"catalog", "model", "n_products", "features", "diagnostics", "commands", "seconds"}
    assert res["catalog"] == str(tiny_catalog) and res["model"] == str(tiny_run)
    assert res["n_products"] == len(pd.read_csv(tiny_catalog))
    assert list(res["features"]) == ["item", "tfidf", "minilm", "pixels16", "phash", "fusion"]
    item = res["features"]["item"]
    assert list(item["retrieval"]) == list(MODES)
    for mode, m in item["retrieval"].items():
        assert set(m) == {"R@1", "R@10", "MAP@R", "queries"} and 0.0 <= m["R@1"] <= m["R@10"] <= 1.0
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
    from item_embed.catalog import Product
    from item_embed.evaluate import load_featurizer

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
