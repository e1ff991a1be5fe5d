"""Near-duplicate products: connected components of the k-nearest-neighbour graph, links cut by closeness.

Every product is linked to those of its k nearest neighbours (by cosine) that pass a cut, and duplicate
groups are the connected components of those links. Limiting links to the k nearest keeps the graph
sparse (n * k edges) whatever the cut, so one exact search serves a whole sweep.

**The cut is relative, not an absolute cosine** (the default). Embeddings are anisotropic to different
degrees: in a young model every cosine may exceed 0.9, in another the average is 0.5, so no cosine means
"duplicate" across models (a fixed 0.9 joins a whole catalog into one group in the first). A link i-j is
scored instead by its *closeness*

    closeness(i, j) = ln((1 - b) / (1 - cos(i, j))),   b = max(cos of i to its R-th neighbour, same for j)

(floored at 0). 1 - cos is half the squared distance of the unit vectors, so closeness says how many
times nearer j is than the products' R-th nearest neighbour (R = ``background``, 50: groups up to about
R products), in natural log. It is measured against the catalog's local density, so a dense region of similar (but
distinct) products does not chain into one group, and a common component added to every embedding,
which scales all the 1 - cos alike, leaves it unchanged. Exact copies (1 - cos below 1e-6) are always
linked.

The automatic cut (``margin="auto"``) is read from the catalog's own neighbours:

- *valley*, when the products' nearest-neighbour closeness is clearly bimodal (products with a duplicate
  and the rest): a two-Gaussian mixture is fitted, and when its density between the two means dips
  below 80% of its density at the lower of them (``BIMODAL_DIP``), the cut is the bottom of that dip.
- otherwise the *chance* level: the closeness that a nearest neighbour reaches by chance for about one
  product of the catalog. Around a product, other products are counted as if spread evenly in D
  dimensions (the count within 1 - cos = d grows as d^(D/2)); 2 / D is the median over products of
  ln(d_R / d_{R/2}) / ln 2. The nearest of the R - 1 products inside the R-th neighbour's distance is then
  e^t times nearer than it with chance about (R - 1) e^(-t D / 2), so the level is t = (2 / D) ln((R - 1) n).
  D tends to be underestimated in high dimension, which makes this level strict: a catalog without
  duplicates gets (almost) no groups, and an embedding that does not set duplicates apart gets few.

An absolute cosine ``threshold`` remains available (``duplicate_groups``, ``sweep``).
Pair metrics compare groupings by the pairs of products they put together, counted from group
sizes rather than by enumerating pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DEFAULT_K = 10
DEFAULT_BACKGROUND = 50
# 1 - cos at or below this is an exact copy (always linked); it also floors the distances in closeness.
EXACT = 1e-6
# Nearest-neighbour closeness counts as bimodal when the fitted mixture's density between its two means
# falls below this share of its density at the lower of them.
BIMODAL_DIP = 0.8
# The margin sweep's cuts (the automatic one is added): those that give this share of the products a
# link to their nearest neighbour, read from the catalog (closeness scales differ between catalogs).
SWEEP_LINKED = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# Absolute cosine thresholds of ``sweep``:
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


@dataclass(frozen=True)
class AutoMargin:
    """The automatic closeness cut and where it came from (module docstring)."""

    margin: float  # the cut: the valley when there is one, else the chance level
    chance: float  # closeness reached by chance by about one product's nearest neighbour
    valley: float | None  # between the modes of nearest-neighbour closeness; None when not clearly bimodal
    dip: float | None  # mixture density at its lowest between the means / at the lower mean; None: not fitted
    dimension: float  # intrinsic dimension D estimated from the neighbour distances
    products: int
    background: int  # the R actually used (less than asked in a catalog of R products or fewer)

    @property
    def source(self) -> str:
        return "chance" if self.valley is None else "valley"

    def describe(self) -> str:
        """One line: the cut and why."""
        if np.isfinite(self.chance):
            chance = (f"chance level {self.chance:.3f}: a nearest neighbour that close happens by chance for about 1 "
                      f"of {self.products} products at intrinsic dimension {self.dimension:.1f}, R {self.background}")
        else:
            chance = (f"chance level, unmeasurable with {self.products} products (R {self.background}; neighbour "
                      "distances that do not spread): only exact copies are linked")
        if self.source == "valley":
            return (f"auto margin {self.margin:.3f} = the valley between the duplicate and non-duplicate modes of "
                    f"nearest-neighbour closeness (density dips to {self.dip:.0%}; {chance})")
        if self.dip is None:
            mode = "no clear duplicate mode"
        elif self.dip >= 1:
            mode = "no clear duplicate mode: the fitted density has no dip between its modes"
        else:
            mode = f"no clear duplicate mode: the fitted density dips only to {self.dip:.0%}"
        return f"auto margin {self.margin:.3f} = the {chance} ({mode})"


class Neighbourhood:
    """One exact search serving any closeness cut: the k linked neighbours, their cosine and closeness.

    emb: (n, d), normalised here. ``scores`` / ``nbrs``: (n, k') cosine and index of the k' = min(k, n - 1)
    nearest others; ``closeness``: (n, k') (module docstring; +inf for exact copies); ``background``: the R
    used, min(R, n - 1).
    """

    def __init__(self, emb: np.ndarray, k: int = DEFAULT_K, background: int = DEFAULT_BACKGROUND):
        if k < 1 or background < 1:
            raise ValueError(f"k and background must be at least 1, got {k} and {background}")
        n = len(emb)
        scores, nbrs = knn_graph(emb, max(k, background))
        self.n, self.background = n, min(int(background), scores.shape[1])
        self.dist = np.maximum(1.0 - scores.astype(np.float64), EXACT)  # (n, m), ascending
        kk = min(int(k), scores.shape[1])
        self.scores, self.nbrs = scores[:, :kk], nbrs[:, :kk]
        if self.background == 0:
            self.closeness = np.zeros((n, 0))
            return
        reach = self.dist[:, self.background - 1]  # 1 - cos to the R-th neighbour
        d = self.dist[:, :kk]
        # Floored at 0: a neighbour beyond the R-th one (next to a cluster of exact copies) is simply not near.
        close = np.maximum(np.log(np.minimum(reach[:, None], reach[self.nbrs])) - np.log(d), 0.0)
        close[1.0 - self.scores[:, :kk] <= EXACT] = np.inf
        self.closeness = close

    def groups(self, margin: float) -> np.ndarray:
        """Duplicate group of every product at closeness cut ``margin``: (n,) int64."""
        return groups_from_graph(self.closeness, self.nbrs, margin)

    def auto_margin(self) -> AutoMargin:
        """The automatic cut: the valley when nearest-neighbour closeness is clearly bimodal, else the chance level."""
        n, r = self.n, self.background
        if r < 2:  # one or two products: only exact copies are linked
            return AutoMargin(np.inf, np.inf, None, None, float("nan"), n, r)
        half = r // 2
        # 2 / D per product from the growth of the neighbour count between ranks R/2 and R (products whose
        # R/2-th neighbour is an exact copy tell nothing about it).
        usable = self.dist[:, half - 1] > EXACT
        growth = np.log(self.dist[usable, r - 1] / self.dist[usable, half - 1]) / np.log(r / half)
        two_over_d = float(np.median(growth)) if usable.any() else 0.0
        if two_over_d > 0:
            chance, dimension = two_over_d * float(np.log((r - 1) * n)), 2.0 / two_over_d
        else:  # no spread to measure (copies everywhere): only exact copies are linked by chance's rule
            chance, dimension = np.inf, float("nan")
        valley, dip = _valley(self.closeness[:, 0])
        margin = chance if valley is None else valley
        return AutoMargin(float(margin), chance, valley, dip, dimension, n, r)


def _valley(values: np.ndarray, min_products: int = 20) -> tuple[float | None, float | None]:
    """Two-Gaussian fit of the products' nearest-neighbour closeness: (valley or None, dip or None).

    dip: the mixture's lowest density between its two means over its density at the lower of them; the
    valley, where that lowest density is, is returned only when dip < ``BIMODAL_DIP``.
    """
    v = values[np.isfinite(values)]
    if len(v) < min_products or np.ptp(v) <= 0:
        return None, None
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, random_state=0).fit(v[:, None])
    lo, hi = np.sort(gm.means_.ravel())
    grid = np.linspace(lo, hi, 2001)
    density = np.exp(gm.score_samples(grid[:, None]))
    bottom = int(np.argmin(density))
    dip = float(density[bottom] / min(density[0], density[-1]))
    return (float(grid[bottom]) if dip < BIMODAL_DIP else None), dip


@dataclass(frozen=True)
class Dedup:
    """Duplicate groups at a closeness cut: ``labels`` (n,) int64; ``auto`` when the cut was automatic."""

    labels: np.ndarray
    margin: float
    auto: AutoMargin | None


def find_duplicates(emb: np.ndarray, ids: Sequence, margin: float | str = "auto", k: int = DEFAULT_K,
                    background: int = DEFAULT_BACKGROUND, hood: Neighbourhood | None = None) -> Dedup:
    """Duplicate groups cut by closeness (module docstring): ``margin`` a number, or "auto" for the level
    chosen from the catalog's own neighbours. emb: (n, d); ids: (n,) unique product ids; hood: the
    search already made for these embeddings (then k and background are its own)."""
    _check(emb, ids)
    hood = hood or Neighbourhood(emb, k, background)
    auto = hood.auto_margin() if margin == "auto" else None
    cut = auto.margin if auto is not None else float(margin)
    return Dedup(hood.groups(cut), cut, auto)


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


def suggest_threshold(results: Sequence[dict], key: str = "threshold") -> float:
    """The cut with the best F1 in ``sweep`` (or ``sweep_margins``, key "margin") results; among equals,
    the highest (fewest wrong merges)."""
    if not results:
        raise ValueError("no sweep results to choose from")
    best = max(results, key=lambda r: (r["f1"], r[key]))
    return float(best[key])


def sweep_margins(emb: np.ndarray, ids: Sequence, true_groups: Iterable, margins: Iterable[float] | None = None,
                  k: int = DEFAULT_K, background: int = DEFAULT_BACKGROUND, hood: Neighbourhood | None = None
                  ) -> tuple[list[dict[str, float | int | bool]], AutoMargin]:
    """Pair metrics at every closeness cut and at the automatic one (one search): rows sorted by
    ``margin``, each with ``auto`` (the automatic cut), ``groups`` (groups of 2 or more) and ``largest``
    (products in the largest group) added; and the automatic cut.

    margins: the cuts; by default those that link 90%, 80%, ..., 10% of the products to their nearest
    neighbour (``SWEEP_LINKED``), rounded to 2 decimals so that ``--margin`` repeats them exactly.
    hood: as in ``find_duplicates``.
    """
    _check(emb, ids)
    true_groups = list(true_groups)
    hood = hood or Neighbourhood(emb, k, background)
    auto = hood.auto_margin()
    if margins is None:
        nearest = hood.closeness[:, 0] if hood.closeness.shape[1] else np.zeros(0)
        nearest = nearest[np.isfinite(nearest)]
        margins = np.round(np.quantile(nearest, 1 - np.array(SWEEP_LINKED)), 2) if len(nearest) else []
    cuts = {float(m): False for m in margins}
    cuts[auto.margin] = True
    out = []
    for cut in sorted(cuts):
        labels = hood.groups(cut)
        sizes = np.bincount(labels)
        out.append({"margin": cut, "auto": cuts[cut], **pair_metrics(labels, true_groups),
                    "groups": int((sizes >= 2).sum()), "largest": int(sizes.max(initial=0))})
    return out, auto
