"""dedup.py: kNN-graph duplicate groups, pair metrics against hand-computed values, sweep, CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embed.cli import main
from item_embed.index.dedup import (
    duplicate_groups,
    knn_graph,
    pair_metrics,
    suggest_threshold,
    sweep,
)

# Six products on a circle, angles in degrees. True groups {a, b, c} and {d, e, f}, but d sits
# nearer to c (26 deg, cos 0.899) than to e (30 deg, cos 0.866). Pairwise cosines that matter:
# a-b, b-c, e-f: cos 2 = 0.9994; a-c: cos 4 = 0.9976; b-d: cos 28 = 0.8829; a-d, d-e: cos 30 = 0.8660.
ANGLES = [0, 2, 4, 30, 60, 62]
IDS = list("abcdef")
TRUE = ["x", "x", "x", "y", "y", "y"]


def circle() -> np.ndarray:
    t = np.deg2rad(ANGLES)
    return np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], axis=1).astype(np.float32)


def test_pair_metrics_hand_computed():
    # One wrong merge: d joins {a, b, c}. Predicted pairs: C(4,2) + C(2,2) = 7; true pairs: 3 + 3 = 6;
    # correct: ab ac bc (3) + ef (1) = 4. Precision 4/7, recall 4/6, F1 = 2PR/(P+R) = 8/13.
    m = pair_metrics([0, 0, 0, 0, 1, 1], TRUE)
    assert (m["predicted_pairs"], m["true_pairs"], m["correct_pairs"]) == (7, 6, 4)
    assert m["precision"] == pytest.approx(4 / 7) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(8 / 13)
    # Label values do not matter, only the partition.
    assert pair_metrics(["q", "q", "q", "q", "r", "r"], [5, 5, 5, 6, 6, 6]) == m
    # Nothing predicted: 0 precision and recall, not a division by zero.
    assert pair_metrics(range(6), TRUE)["f1"] == 0.0


def test_pair_metrics_match_pair_enumeration():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 15, 120)
    true = rng.integers(0, 10, 120).astype(object)
    true[::9] = None  # unknown group: its own group, never paired

    def brute(p, t):
        pairs = list(itertools.combinations(range(len(p)), 2))
        same_p = {(i, j) for i, j in pairs if p[i] == p[j]}
        same_t = {(i, j) for i, j in pairs if t[i] is not None and t[i] == t[j]}
        return len(same_p), len(same_t), len(same_p & same_t)

    m = pair_metrics(pred, true)
    assert (m["predicted_pairs"], m["true_pairs"], m["correct_pairs"]) == brute(pred, true)


def test_duplicate_groups_at_thresholds():
    emb = circle()
    # 0.88: a-b-c linked, and c-d (0.899), b-d (0.883): d merged wrongly; e-f together.
    assert duplicate_groups(emb, IDS, 0.88).tolist() == [0, 0, 0, 0, 1, 1]
    # 0.95: d left alone as a singleton with its own group.
    assert duplicate_groups(emb, IDS, 0.95).tolist() == [0, 0, 0, 1, 2, 2]
    # 0.85: d-e (0.866) joins everything.
    assert duplicate_groups(emb, IDS, 0.85).tolist() == [0] * 6
    # Above every pair: all singletons.
    assert duplicate_groups(emb, IDS, 0.9999).tolist() == [0, 1, 2, 3, 4, 5]


def test_k_limits_the_links():
    emb = circle()
    # With k=1 each product links only its nearest: d's nearest is c, e's is f, so d-e (0.866) never
    # becomes a link even at a threshold below it.
    assert duplicate_groups(emb, IDS, 0.5, k=1).tolist() == [0, 0, 0, 0, 1, 1]
    # Exact duplicates: the product itself is dropped, not one of its copies.
    same = np.repeat(circle()[:1], 3, axis=0)
    _, nbrs = knn_graph(same, k=2)
    assert [sorted(r) for r in nbrs.tolist()] == [[1, 2], [0, 2], [0, 1]]
    with pytest.raises(ValueError, match="duplicate product ids"):
        duplicate_groups(emb, list("abcdea"), 0.9)


def test_sweep_suggests_best_f1():
    results = sweep(circle(), IDS, TRUE, [0.85, 0.88, 0.95, 0.9999])
    assert [r["threshold"] for r in results] == [0.85, 0.88, 0.95, 0.9999]
    # 0.85: one group, 6 of 15 pairs right: P 0.4, R 1. 0.88: 8/13. 0.95: P 1, R 4/6 -> F1 0.8. 0.9999: 0.
    assert [r["f1"] for r in results] == pytest.approx([2 * 0.4 / 1.4, 8 / 13, 0.8, 0.0])
    assert [r["groups"] for r in results] == [1, 2, 2, 0]
    assert suggest_threshold(results) == 0.95


def write_file(path, emb, ids, groups=None):
    frame = pd.DataFrame({"id": ids})
    if groups is not None:
        frame["group"] = groups
    table = pa.Table.from_pandas(frame, preserve_index=False)
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    pq.write_table(table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])), path)
    return path


def test_cli_dedup_writes_groups_and_metrics(tmp_path, capsys):
    emb = write_file(tmp_path / "emb.parquet", circle(), IDS, TRUE)
    out = tmp_path / "sub" / "groups.csv"
    assert main(["dedup", str(emb), "--threshold", "0.88", "--out", str(out)]) == 0
    groups = pd.read_csv(out, dtype={"id": str})
    assert list(groups.columns) == ["id", "dup_group"] and groups["id"].tolist() == IDS
    assert groups["dup_group"].tolist() == [0, 0, 0, 0, 1, 1]
    text = capsys.readouterr().out
    assert "pair precision 0.5714  recall 0.6667  F1 0.6154" in text and "2 duplicate groups covering 6" in text

    assert main(["dedup", str(emb), "--sweep", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # Every threshold from 0.90 to 0.999 gives F1 0.8; the highest of them is the suggestion.
    assert "suggested threshold: 0.999 " in text and "F1 0.8000" in text
    assert pd.read_csv(out)["dup_group"].tolist() == [0, 0, 0, 1, 2, 2]


def test_cli_dedup_on_real_embeddings_without_group(tiny_catalog, tiny_run, tmp_path, capsys):
    emb = tmp_path / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(emb), "--no-progress"]) == 0
    frame = pd.read_parquet(emb)
    out = tmp_path / "groups.csv"
    assert main(["dedup", str(emb), "--threshold", "0.9", "--out", str(out), "--group", "category"]) == 0
    assert sorted(pd.read_csv(out, dtype={"id": str})["id"]) == sorted(frame["id"].astype(str))
    assert "against 'category'" in capsys.readouterr().out
    no_group = write_file(tmp_path / "plain.parquet", circle(), IDS)
    assert main(["dedup", str(no_group), "--out", str(out)]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert main(["dedup", str(no_group), "--sweep", "--out", str(out)]) == 2
    assert "--group" in capsys.readouterr().err
