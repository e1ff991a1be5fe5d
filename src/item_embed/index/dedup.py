"""Near-duplicate products: connected components of the thresholded k-nearest-neighbour graph.

Two products are linked when either is among the other's k nearest neighbours with cosine >=
threshold; duplicate groups are the connected components of those links. Limiting links to
the k nearest keeps the graph sparse (n * k edges) whatever the threshold, so one exact search
serves a whole threshold sweep.
Pair metrics compare groupings by the pairs of products they put together, counted from group
sizes rather than by enumerating pairs.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import faiss
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DEFAULT_K = 10
# 0.50, 0.51, ..., 0.99, then finer steps: near-identical listings of one product often differ only there.
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.50, 0.995, 0.01), 2).tolist()) + (0.995, 0.999)


def knn_graph(emb: np.ndarray, k: int = DEFAULT_K) -> tuple[np.ndarray, np.ndarray]:
    """Each product's k nearest other products by cosine (exact FAISS search).

    emb: (n, d). Returns (scores float32 (n, k'), neighbours int64 (n, k')), k' = min(k, n - 1);
    the product itself is left out even when exact duplicates tie with it.
    """
    x = np.array(np.atleast_2d(emb), dtype=np.float32, order="C", copy=True)
    n = len(x)
    k = max(0, min(int(k), n - 1))
    if k == 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    faiss.normalize_L2(x)
    scores, nbrs = faiss.knn(x, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)  # (n, k + 1): a spare for itself
    keep = nbrs != np.arange(n)[:, None]
    # k + 1 results hold at most one self-match: the first k others, in rank order, remain.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(nbrs, order, axis=1)


def groups_from_graph(scores: np.ndarray, nbrs: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the links with score >= threshold: (n,) int64 labels in order of first appearance."""
    n = len(nbrs)
    rows, cols = np.nonzero(scores >= threshold)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, nbrs[rows, cols])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.factorize(labels)[0].astype(np.int64)


def duplicate_groups(emb: np.ndarray, ids: Sequence, threshold: float, k: int = DEFAULT_K) -> np.ndarray:
    """Duplicate group of every product: (n,) int64; a product with no duplicate is its own group.

    emb: (n, d) embeddings (normalised here); ids: (n,) product ids, which must be unique.
    """
    _check(emb, ids)
    scores, nbrs = knn_graph(emb, k)
    return groups_from_graph(scores, nbrs, threshold)


def _check(emb: np.ndarray, ids: Sequence) -> None:
    if len(emb) != len(ids):
        raise ValueError(f"{len(emb)} embeddings but {len(ids)} ids")
    dup = pd.Index([str(i) for i in ids])
    if dup.has_duplicates:
        raise ValueError(f"duplicate product ids: {list(dup[dup.duplicated()].unique()[:10])}")


def _codes(groups: Iterable) -> np.ndarray:
    """Integer codes of group labels; a missing label is a group of its own, not one shared group."""
    codes = pd.factorize(pd.Series(list(groups), dtype=object))[0].astype(np.int64)
    missing = codes < 0
    codes[missing] = codes.max(initial=-1) + 1 + np.arange(missing.sum())
    return codes


def _pairs(sizes: np.ndarray) -> int:
    sizes = sizes.astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def pair_metrics(predicted_groups: Iterable, true_groups: Iterable) -> dict[str, float | int]:
    """Pair precision / recall / F1 of a grouping: a pair is a duplicate pair when both share a group.

    Pairs are counted from the contingency table (n_ij per predicted x true group), not enumerated:
    correct = sum C(n_ij, 2), predicted = sum C(a_i, 2), true = sum C(b_j, 2). With no predicted
    (or no true) pairs, precision (or recall) is 0.
    """
    p, t = _codes(predicted_groups), _codes(true_groups)
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predicted groups but {len(t)} true groups")
    cells = np.unique(p * (t.max(initial=0) + 1) + t, return_counts=True)[1]
    correct = _pairs(cells)
    predicted, true = _pairs(np.bincount(p)), _pairs(np.bincount(t))
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
            "predicted_pairs": predicted, "true_pairs": true, "correct_pairs": correct}


def sweep(emb: np.ndarray, ids: Sequence, true_groups: Iterable, thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
          k: int = DEFAULT_K) -> list[dict[str, float | int]]:
    """Pair metrics at every threshold (the kNN graph is searched once): one dict per threshold,
    with ``threshold`` and ``groups`` (number of groups of 2 or more) added."""
    _check(emb, ids)
    true_groups = list(true_groups)
    scores, nbrs = knn_graph(emb, k)
    out = []
    for threshold in thresholds:
        labels = groups_from_graph(scores, nbrs, float(threshold))
        multi = int((np.bincount(labels) >= 2).sum())
        out.append({"threshold": float(threshold), **pair_metrics(labels, true_groups), "groups": multi})
    return out


def suggest_threshold(results: Sequence[dict]) -> float:
    """The threshold with the best F1 in ``sweep`` results; among equals, the highest (fewest wrong merges)."""
    if not results:
        raise ValueError("no sweep results to choose from")
    best = max(results, key=lambda r: (r["f1"], r["threshold"]))
    return float(best["threshold"])
