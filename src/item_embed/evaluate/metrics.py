"""Evaluators on frozen embeddings; each returns a dict of metrics.

Same-product retrieval: every product of a group with at least 2 members queries all other
products (itself excluded); R@1, R@10, MAP@R (Musgrave et al., 2020). Ranking is by cosine
similarity, ties broken by gallery order (a stable sort), so results are deterministic. Category
prediction: linear probe and kNN on the reference 80/20 split (:func:`split_test_mask`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RETRIEVAL_CHUNK = 1024


def group_codes(groups) -> np.ndarray:
    """Integer code per product of its group (any hashable values)."""
    return pd.factorize(pd.Series(groups).astype(str))[0]


def retrieval_metrics(queries: np.ndarray, gallery: np.ndarray, groups, query_rows: np.ndarray | None = None,
                      ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Same-product retrieval.

    queries: (q, d) embeddings of the query products, L2-normalised; gallery: (n, d) embeddings of
    every product; groups: (n,) group of each gallery product; query_rows: (q,) the gallery row of
    each query (excluded from its own ranking). With ``query_rows`` None, queries are
    ``gallery[rows]`` for every row whose group has >= 2 members, and ``queries`` may be the
    full (n, d) array of query-mode embeddings.
    """
    codes = group_codes(groups)
    sizes = np.bincount(codes)
    if query_rows is None:
        query_rows = np.nonzero(sizes[codes] >= 2)[0]
        queries = queries[query_rows]
    if len(query_rows) == 0:
        return {"queries": 0}
    r_per_query = sizes[codes[query_rows]] - 1
    depth = int(min(len(gallery) - 1, max(max(ks), r_per_query.max())))
    hits_at = {k: 0.0 for k in ks}
    map_sum = 0.0
    for start in range(0, len(query_rows), RETRIEVAL_CHUNK):
        rows = query_rows[start : start + RETRIEVAL_CHUNK]
        sims = queries[start : start + len(rows)] @ gallery.T  # (c, n)
        sims[np.arange(len(rows)), rows] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]  # (c, depth)
        rel = codes[order] == codes[rows][:, None]  # (c, depth) bool
        for k in ks:
            hits_at[k] += rel[:, :k].any(axis=1).sum()
        r = r_per_query[start : start + len(rows)]
        prec = np.cumsum(rel, axis=1) / np.arange(1, depth + 1)  # precision at each rank
        within_r = np.arange(depth)[None, :] < r[:, None]
        map_sum += ((prec * rel * within_r).sum(axis=1) / r).sum()
    n = len(query_rows)
    out = {f"R@{k}": hits_at[k] / n for k in ks}
    out["MAP@R"] = map_sum / n
    out["queries"] = n
    return out


def cross_modal_metrics(queries: np.ndarray, gallery: np.ndarray, query_groups, gallery_groups,
                        ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Retrieval across modalities (e.g. title-only queries against photo-only embeddings).

    queries: (q, d) and gallery: (n, d), L2-normalised; query_groups: (q,), gallery_groups: (n,) the
    product group of each (the product's id where there are no groups). A gallery item is relevant
    when it shares the query's group, the query product's own photo included. R@k (a relevant item in
    the top k) and MRR (mean reciprocal rank of the first relevant item); ties by gallery order.
    """
    codes = group_codes(np.concatenate([np.asarray(query_groups, dtype=object),
                                        np.asarray(gallery_groups, dtype=object)]))
    qc, gc = codes[: len(queries)], codes[len(queries):]
    hits = {k: 0 for k in ks}
    rr = 0.0
    for start in range(0, len(queries), RETRIEVAL_CHUNK):
        sims = queries[start : start + RETRIEVAL_CHUNK] @ gallery.T  # (c, n)
        order = np.argsort(-sims, axis=1, kind="stable")
        rel = gc[order] == qc[start : start + len(sims), None]  # (c, n) bool
        first = np.where(rel.any(axis=1), rel.argmax(axis=1), np.inf)  # 0-based rank of the first relevant
        for k in ks:
            hits[k] += int((first < k).sum())
        rr += float(np.where(np.isfinite(first), 1.0 / (first + 1), 0.0).sum())
    n = len(queries)
    if n == 0:
        return {"queries": 0}
    return {**{f"R@{k}": hits[k] / n for k in ks}, "MRR": rr / n, "queries": n}


def split_test_mask(keys) -> np.ndarray:
    """The reference 80/20 split: test fold = hash of the key (group, or id) mod 5 == 0."""
    keys = np.asarray(pd.Series(keys).astype(str))
    return pd.util.hash_array(keys) % 5 == 0


def knn_classify(emb: np.ndarray, labels, test_mask: np.ndarray, k: int = 10) -> dict[str, float]:
    """kNN (cosine, majority vote, ties to the nearer neighbour) category prediction on the test fold."""
    from sklearn.metrics import f1_score

    series = pd.Series(labels)
    known = series.notna().to_numpy()
    labels = series.astype(str).to_numpy()
    train = ~test_mask & known
    test = test_mask & known
    if train.sum() == 0 or test.sum() == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "test": int(test.sum())}
    codes, names = pd.factorize(labels)
    tr_emb, tr_codes = emb[train], codes[train]
    preds = []
    k = min(k, int(train.sum()))
    for start in range(0, int(test.sum()), RETRIEVAL_CHUNK):
        q = emb[test][start : start + RETRIEVAL_CHUNK]
        sims = q @ tr_emb.T
        nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        votes = tr_codes[nn]  # (c, k)
        for row in votes:
            counts = np.bincount(row, minlength=len(names))
            best = np.flatnonzero(counts == counts.max())
            # Tie: the label among the tied ones that appears first (nearest) wins.
            preds.append(next(v for v in row if v in best))
    preds = np.asarray(preds)
    truth = codes[test]
    return {"accuracy": float((preds == truth).mean()),
            "macro_f1": float(f1_score(truth, preds, average="macro")), "test": int(test.sum())}


def linear_probe(emb: np.ndarray, labels, test_mask: np.ndarray, max_iter: int = 2000, c: float = 1.0) -> dict:
    """Linear-probe category prediction on the test fold (BENCHMARKS.md).

    emb: (n, d) frozen embeddings; labels: (n,), missing labels left out; test_mask: (n,) bool.
    Standardise with the train fold's statistics, then ``LogisticRegression(max_iter=2000, C=1.0)``.
    Returns accuracy and macro-F1 on the test fold, and its size.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    series = pd.Series(labels)
    known = series.notna().to_numpy()
    labels = series.astype(str).to_numpy()
    train = ~test_mask & known
    test = test_mask & known
    if test.sum() == 0 or len(np.unique(labels[train])) < 2:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "test": int(test.sum())}
    scaler = StandardScaler().fit(emb[train])
    clf = LogisticRegression(max_iter=max_iter, C=c).fit(scaler.transform(emb[train]), labels[train])
    preds = clf.predict(scaler.transform(emb[test]))
    truth = labels[test]
    return {"accuracy": float((preds == truth).mean()),
            "macro_f1": float(f1_score(truth, preds, average="macro")), "test": int(test.sum())}
