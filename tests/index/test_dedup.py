"""dedup.py: kNN-graph duplicate groups, pair metrics against hand-computed values, sweeps, the automatic
closeness cut on anisotropic embeddings, CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embed.cli import main
from item_embed.index.dedup import (
    Neighbourhood,
    duplicate_groups,
    find_duplicates,
    knn_graph,
    pair_metrics,
    suggest_threshold,
    sweep,
    sweep_margins,
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

    # The sweep (closeness cuts, not cosines since the automatic cut): nearest-neighbour closeness is
    # 6.6-6.7 for a, b, c, e, f and 0.41 for d, so the cut that links 90% of the products (3.53) keeps
    # d apart: F1 0.8, the best; the other rows link only the closest pairs. Six products on a circle
    # show no duplicate mode, and in one dimension close neighbours are common: auto links nothing.
    assert main(["dedup", str(emb), "--sweep", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "suggested: --margin 3.53 (best pair F1 0.8000" in text and "<- auto" in text
    assert pd.read_csv(out)["dup_group"].tolist() == [0, 0, 0, 1, 2, 2]
    assert main(["dedup", str(emb), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "auto margin" in text and "no clear duplicate mode" in text and "0 duplicate groups" in text


def test_cli_dedup_on_real_embeddings_without_group(tiny_catalog, tiny_run, tmp_path, capsys):
    emb = tmp_path / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(emb), "--no-progress"]) == 0
    frame = pd.read_parquet(emb)
    out = tmp_path / "groups.csv"
    assert main(["dedup", str(emb), "--threshold", "0.9", "--out", str(out), "--group", "category"]) == 0
    assert sorted(pd.read_csv(out, dtype={"id": str})["id"]) == sorted(frame["id"].astype(str))
    assert "against 'category'" in capsys.readouterr().out
    no_group = write_file(tmp_path / "plain.parquet", circle(), IDS)
    # No --threshold needed any more (the automatic cut); no group column: no pair metrics.
    assert main(["dedup", str(no_group), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "auto margin" in text and "pair precision" not in text
    assert main(["dedup", str(no_group), "--sweep", "--out", str(out)]) == 2
    assert "--group" in capsys.readouterr().err
    assert main(["dedup", str(no_group), "--threshold", "high", "--out", str(out)]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert main(["dedup", str(no_group), "--threshold", "0.9", "--margin", "2", "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err


# The automatic cut ------------------------------------------------------------------------------------


def planted(n_products=150, dim=32, common=6.0, noise=0.3, seed=0):
    """Anisotropic embeddings with planted duplicates: each product listed 1-4 times (its unit vector plus
    noise), every listing sharing a large common component, so every cosine exceeds 0.9.
    Returns (emb (n, dim + 1) float32, true group of each listing (n,))."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_products, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    groups = np.repeat(np.arange(n_products), rng.integers(1, 5, n_products))
    listings = base[groups] + noise * rng.normal(size=(len(groups), dim)) / np.sqrt(dim)
    return np.concatenate([listings, np.full((len(groups), 1), common)], axis=1).astype(np.float32), groups


def ids_for(n):
    return [f"p{i}" for i in range(n)]


def min_cosine(emb):
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return float((x @ x.T).min())


@pytest.mark.parametrize("noise", [0.3, 0.5])
def test_auto_cut_recovers_planted_duplicates_where_a_fixed_cosine_joins_everything(noise):
    emb, groups = planted(noise=noise)
    ids = ids_for(len(emb))
    assert min_cosine(emb) > 0.9
    # The old way: one fixed cosine; every neighbour passes, one giant group.
    old = duplicate_groups(emb, ids, 0.9)
    assert np.bincount(old).max() == len(emb) and pair_metrics(old, groups)["f1"] < 0.05
    result = find_duplicates(emb, ids)
    assert result.auto.source == "valley" and "valley" in result.auto.describe()
    assert pair_metrics(result.labels, groups)["f1"] >= 0.9
    assert np.bincount(result.labels).max() <= 8  # true groups have at most 4


def test_auto_cut_links_almost_nothing_without_duplicates():
    rng = np.random.default_rng(1)
    for emb in (rng.normal(size=(600, 32)) + 4.0,  # anisotropic: all cosines high
                rng.normal(size=(20, 32))[rng.integers(0, 20, 600)] * 2 + rng.normal(size=(600, 32))):  # clusters
        result = find_duplicates(emb, ids_for(600))
        assert result.auto.source == "chance" and "no clear duplicate mode" in result.auto.describe()
        sizes = np.bincount(result.labels)
        assert sizes[sizes >= 2].sum() <= 6, "more than 1% of duplicate-free products grouped"


def test_closeness_ignores_a_common_component():
    # Unit vectors plus the same orthogonal component: every 1 - cos shrinks by one factor (26 here),
    # so closeness, the automatic cut and the groups stay the same.
    emb, _ = planted(common=0.0, noise=0.5)
    flat = emb[:, :-1] / np.linalg.norm(emb[:, :-1], axis=1, keepdims=True)
    shifted = np.concatenate([flat, np.full((len(flat), 1), 5.0)], axis=1).astype(np.float32)
    a, b = Neighbourhood(flat), Neighbourhood(shifted)
    assert np.array_equal(a.nbrs, b.nbrs)
    np.testing.assert_allclose(a.closeness, b.closeness, atol=0.02)
    ids = ids_for(len(flat))
    assert find_duplicates(flat, ids).labels.tolist() == find_duplicates(shifted, ids).labels.tolist()


def test_exact_copies_are_always_linked():
    # 60 copies of one product (more than the background rank R = 50, so their R-th neighbour is a copy
    # too) and 200 distinct products.
    rng = np.random.default_rng(2)
    emb = np.concatenate([np.repeat(rng.normal(size=(1, 16)), 60, axis=0), rng.normal(size=(200, 16))])
    labels = find_duplicates(emb, ids_for(260)).labels
    assert (labels[:60] == labels[0]).all() and np.bincount(labels)[labels[0]] == 60
    # Tiny catalogs: one product; two copies; two different products.
    assert find_duplicates(emb[:1], ["a"]).labels.tolist() == [0]
    assert find_duplicates(emb[:2], ["a", "b"]).labels.tolist() == [0, 0]
    assert find_duplicates(emb[59:61], ["a", "b"]).labels.tolist() == [0, 1]


def test_sweep_margins_is_short_and_contains_the_auto_cut():
    emb, groups = planted(noise=0.5)
    rows, auto = sweep_margins(emb, ids_for(len(emb)), groups)
    assert len(rows) <= 10 and sum(r["auto"] for r in rows) == 1
    assert [r["margin"] for r in rows] == sorted(r["margin"] for r in rows)
    linked = [r["predicted_pairs"] for r in rows]
    assert linked == sorted(linked, reverse=True)  # a higher cut never links more
    auto_row = next(r for r in rows if r["auto"])
    assert auto_row["margin"] == auto.margin and auto_row["f1"] >= 0.9
    best = suggest_threshold(rows, key="margin")
    assert max(r["f1"] for r in rows) == next(r["f1"] for r in rows if r["margin"] == best)


def test_cli_dedup_default_and_sweep_on_anisotropic_embeddings(tmp_path, capsys):
    emb, groups = planted(noise=0.5)
    path = write_file(tmp_path / "emb.parquet", emb, ids_for(len(emb)), [f"g{g}" for g in groups])
    out = tmp_path / "dups.csv"
    assert main(["dedup", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "auto margin" in text and "valley" in text
    f1 = float(text.split(" F1 ")[1].split()[0])
    assert f1 >= 0.9
    assert main(["dedup", str(path), "--sweep", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["margin", "pairs"])
    table = lines[header + 1: next(i for i, line in enumerate(lines) if line.startswith("suggested:"))]
    assert 1 <= len(table) <= 10 and sum("<- auto" in line for line in table) == 1
    assert any(line.startswith("suggested:") for line in lines)
    # The old README example, a fixed cosine of 0.9: one group of everything.
    assert main(["dedup", str(path), "--threshold", "0.9", "--out", str(out)]) == 0
    assert f"1 duplicate groups covering {len(emb)} products" in capsys.readouterr().out
