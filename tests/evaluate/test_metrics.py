"""Metrics against hand-computed tiny cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from item_embed.evaluate.metrics import (
    knn_classify,
    linear_probe,
    retrieval_metrics,
    split_test_mask,
)


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


def test_cross_modal_retrieval_hand_computed():
    """Title queries against photos: relevant = the same group, the product's own photo included."""
    from item_embed.evaluate.metrics import cross_modal_metrics

    queries = unit(0, 90, 180)  # query 0 -> photo at 10 deg (group a); query 1 -> 100 deg (group c), ...
    gallery = unit(10, 100, 80, 190)
    m = cross_modal_metrics(queries, gallery, ["a", "b", "c"], ["a", "c", "b", "c"], ks=(1, 2))
    # q0 (a): ranks g0 first -> rank 1. q1 (b): g1 (c, 100) then g2 (b, 80) tie at 10 deg: g1 first by
    # gallery order -> first relevant at rank 2. q2 (c): g3 (c, 190) first -> rank 1.
    assert m["R@1"] == 2 / 3 and m["R@2"] == 1.0 and m["queries"] == 3
    assert abs(m["MRR"] - (1 + 0.5 + 1) / 3) < 1e-9
    assert cross_modal_metrics(queries[:1], gallery, ["z"], ["a", "c", "b", "c"], ks=(1,))["MRR"] == 0.0
