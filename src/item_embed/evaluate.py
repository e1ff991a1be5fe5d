"""Evaluators on frozen embeddings; each returns a dict of metrics. And the harness that runs
them for ITEm and the baselines side by side.

Same-product retrieval follows ../shared/docs/BENCHMARKS.md: every product of a group with at
least 2 members queries all other products (itself excluded); R@1, R@10, MAP@R. Ranking is by
cosine similarity, ties broken by gallery order (a stable sort), so results are deterministic.
Query modes: ``joint`` (everything the product has), ``image`` (image only), ``title`` (title
only), each against the gallery embedded with everything; ``image2image`` embeds both sides from
the image alone. Category prediction: linear probe and kNN on the reference 80/20 split.

Anything with a ``name`` and ``embed(products, mode)`` is a :class:`Featurizer`: ITEm
(:class:`EncoderFeaturizer`), the baselines of ``baselines.py``, the dual encoder.
:func:`evaluate_all` runs every protocol for each of them on the same products and splits and
returns the ``results.json`` document (schema in :func:`evaluate_all`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

RETRIEVAL_CHUNK = 1024


def _group_codes(groups) -> np.ndarray:
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
    codes = _group_codes(groups)
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


# --------------------------------------------------------------------------------------------
# Products under evaluation, featurizers
# --------------------------------------------------------------------------------------------

MODES = ("joint", "image", "title", "image2image")
EMBED_MODES = ("joint", "image", "title")  # what a featurizer is asked for; image2image uses "image"
_KEYS = itertools.count()


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _clean(value: Any) -> str | None:
    """Whitespace-collapsed text, None when absent or blank (as the catalog reader does)."""
    if _missing(value):
        return None
    text = " ".join(str(value).split())
    return text or None


@dataclass(eq=False)
class RawProducts:
    """The products under evaluation as the catalog holds them, before any model's preprocessing.

    Every featurizer prepares them its own way (ITEm pads and resizes to its image size, pixels16
    thumbnails the raw photo, tfidf reads the raw text), so all see exactly the same products.
    ``frame`` holds the catalog's other columns (id, group, labels), row-aligned.
    """

    ids: list[str]
    titles: list[str | None]
    descriptions: list[str | None]  # all None when the catalog has no description column
    images: list[Any]  # raw image values (bytes, path or PIL image), None where absent
    frame: pd.DataFrame
    image_root: Path | None = None
    has_description: bool = False  # whether the catalog has a description column at all
    key: int = field(default_factory=lambda: next(_KEYS))  # identity for featurizers' caches

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_image(self) -> np.ndarray:
        return np.array([v is not None for v in self.images], dtype=bool)

    @property
    def has_title(self) -> np.ndarray:
        return np.array([t is not None for t in self.titles], dtype=bool)

    def texts(self, mode: str, use_description: bool) -> list[str]:
        """Text per product as a text model reads it: ``title. description`` (joint mode, when
        ``use_description``; either part may be absent), the title (title mode), "" (image mode)."""
        if mode == "image":
            return [""] * len(self)
        if mode == "title" or not use_description:
            return [t or "" for t in self.titles]
        return [". ".join(x for x in (t, d) if x) for t, d in zip(self.titles, self.descriptions)]

    def records(self, mode: str = "joint") -> list[dict[str, Any]]:
        """One dict per product for ``ItemEncoder.to_product``, holding only the mode's inputs."""
        out = []
        for pid, t, d, im in zip(self.ids, self.titles, self.descriptions, self.images):
            rec: dict[str, Any] = {"id": pid}
            if mode in ("joint", "title"):
                rec["title"] = t
            if mode == "joint":
                rec["description"] = d
            if mode in ("joint", "image"):
                rec["image"] = im
            out.append(rec)
        return out

    def map_images(self, fn: Callable, workers: int = 4) -> list:
        """``fn(decoded RGB PIL image or None)`` for every product, decoding in a thread pool."""
        from concurrent.futures import ThreadPoolExecutor

        from .images import decode_image

        def one(value):
            return fn(None if value is None else decode_image(value, self.image_root))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, self.images, chunksize=64))

    def subset(self, rows) -> "RawProducts":
        rows = np.asarray(rows, dtype=int)
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return RawProducts(pick(self.ids), pick(self.titles), pick(self.descriptions), pick(self.images),
                           self.frame.iloc[rows].reset_index(drop=True), self.image_root, self.has_description)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, columns=None, image_root: str | Path | None = None) -> "RawProducts":
        """Products straight from a DataFrame, unvalidated (``from_catalog`` validates a file)."""
        from .catalog import Columns

        c = columns or Columns()
        n = len(frame)
        col = lambda name: frame[name].tolist() if name in frame else [None] * n  # noqa: E731
        images = [None if _missing(v) or (isinstance(v, str) and not v.strip()) else v for v in col(c.image)]
        rest = frame.drop(columns=[c.image] if c.image in frame else []).reset_index(drop=True)
        return cls([str(x) for x in frame[c.id].tolist()], [_clean(t) for t in col(c.title)],
                   [_clean(d) for d in col(c.description)], images, rest,
                   Path(image_root) if image_root is not None else None, c.description in frame)

    @classmethod
    def from_catalog(cls, catalog, strict: bool = False, report=None) -> "RawProducts":
        """The usable products of a ``Catalog``: the rows ``item-embed embed`` keeps (rows with a
        bad image, a duplicate id or nothing usable are skipped into ``report``, or fatal if strict)."""
        # Validating decodes every image once; a tiny target size keeps that cheap (JPEG draft).
        rows = [p.row for chunk in catalog.iter_chunks(16, strict=strict, report=report) for p in chunk]
        return cls.from_frame(catalog.frame.iloc[rows].reset_index(drop=True), catalog.columns, catalog.image_root)


@runtime_checkable
class Featurizer(Protocol):
    """Anything that embeds products: ITEm, a baseline, the dual encoder.

    ``embed(products, mode)`` returns float32 (n, d), rows L2-normalised (a product that has
    nothing for the mode may get a zero row), for mode ``joint`` (everything the product has),
    ``image`` (image only) or ``title`` (title only), or None for a mode it cannot embed at all.
    ``modalities`` names the inputs it reads ("text", "image"); image2image is skipped for a
    featurizer that reads no images. An optional ``fit(products)`` is called once with the whole
    catalog before any ``embed`` (the unsupervised baselines fit TF-IDF / PCA there); an optional
    ``diagnostics(products)`` returns the modality diagnostics of a joint model.
    """

    name: str
    modalities: frozenset[str]

    def embed(self, products: RawProducts, mode: str) -> np.ndarray | None: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class CachedFeaturizer:
    """Base for featurizers: each (products, mode) is embedded once, whichever protocol asks."""

    name = "features"
    modalities: frozenset[str] = frozenset({"text", "image"})

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], np.ndarray | None] = {}

    def embed(self, products: RawProducts, mode: str) -> np.ndarray | None:
        if mode not in EMBED_MODES:
            raise ValueError(f"mode must be one of {', '.join(EMBED_MODES)}, not {mode!r}")
        key = (products.key, mode)
        if key not in self._cache:
            self._cache[key] = self._embed(products, mode)
        return self._cache[key]

    def cached(self, products: RawProducts, mode: str) -> bool:
        return (products.key, mode) in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray | None:
        raise NotImplementedError


def cls_attention_shares(self_attn, hidden, attention_mask, text_len: int):
    """[CLS] attention mass on text and on image tokens in one BERT layer, averaged over heads.

    self_attn: the layer's ``BertSelfAttention`` (its ``query``/``key`` projections); hidden:
    (B, L, H) the layer's input; attention_mask: (B, L), 1 for real tokens; positions
    [0, text_len) are text ([CLS] and [SEP] included), the rest image patches.
    Returns float32 (B, 2): (text share, image share), each row summing to 1.
    """
    import torch

    with torch.no_grad():
        b, length, _ = hidden.shape
        nh, hs = self_attn.num_attention_heads, self_attn.attention_head_size
        q = self_attn.query(hidden[:, :1]).float().view(b, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = self_attn.key(hidden).float().view(b, length, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * hs**-0.5  # (B, nh, L)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        p = scores.softmax(-1).mean(1)  # (B, L), averaged over heads
        return torch.stack([p[:, :text_len].sum(1), p[:, text_len:].sum(1)], dim=1).cpu()  # (B, 2)


class ClsAttentionMeter:
    """While active, each forward pass of an ``ItemModel`` adds up how the last layer's [CLS]
    attention splits between image and text tokens (mean over heads; products with both an image
    and a title only).

    The encoder runs SDPA, which returns no weights: they are recomputed for the last layer alone
    from its own query/key projections applied to its input (captured by a forward pre-hook),
    with the model's own attention mask (``EncoderOutput.attention_mask``).
    """

    def __init__(self, model) -> None:
        self.model = model
        self.layer = model.bert.encoder.layer[-1]
        self.image_sum = self.text_sum = 0.0
        self.count = 0
        self._hidden = None
        self._handles: list = []

    def __enter__(self) -> "ClsAttentionMeter":
        self._handles = [self.layer.register_forward_pre_hook(self._grab, with_kwargs=True),
                         self.model.register_forward_hook(self._measure)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hidden = [], None

    def _grab(self, module, args, kwargs) -> None:
        self._hidden = args[0] if args else kwargs["hidden_states"]

    def _measure(self, module, args, out) -> None:
        shares = cls_attention_shares(self.layer.attention.self, self._hidden, out.attention_mask, out.text_len)
        mask = out.attention_mask.bool().cpu()
        # An image, and a title beyond [CLS] [SEP].
        both = mask[:, out.text_len:].any(1) & (mask[:, : out.text_len].sum(1) > 2)
        self.text_sum += float(shares[both, 0].sum())
        self.image_sum += float(shares[both, 1].sum())
        self.count += int(both.sum())
        self._hidden = None

    def result(self) -> dict[str, float]:
        n = self.count or float("nan")
        return {"cls_attention_image": self.image_sum / n, "cls_attention_text": self.text_sum / n}


class EncoderFeaturizer(CachedFeaturizer):
    """A trained encoder as a featurizer: ITEm's ``ItemEncoder``, or the dual encoder.

    A mode leaves the other modality out of the input (``RawProducts.records(mode)``), then the
    encoder's own ``to_product`` prepares each record. With ``pass_mode`` the mode is also given to
    ``encode_products(products, mode)`` (the dual encoder embeds each side with its own tower).
    Products with nothing for a mode (no image in image mode) get a zero row.
    """

    def __init__(self, encoder, name: str = "item", batch_size: int = 64, pass_mode: bool = False,
                 progress: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.name = name
        self.batch_size = batch_size
        self.pass_mode = pass_mode
        self.progress = progress
        self.modalities = frozenset({"text", "image"})
        self._attention: dict[int, dict[str, float]] = {}

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, name: str = "item", device: str | None = None,
                        batch_size: int = 64, progress: bool = False) -> "EncoderFeaturizer":
        from .encode import ItemEncoder

        return cls(ItemEncoder.from_pretrained(run_dir, device=device), name, batch_size, progress=progress)

    @property
    def _item_model(self):
        # The module that actually runs (ItemEncoder's bf16 copy in bf16), so attention hooks see it.
        model = getattr(self.encoder, "runner", getattr(self.encoder, "model", None))
        return model if hasattr(model, "bert") and hasattr(model, "pool") else None

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        from contextlib import nullcontext

        from tqdm.auto import tqdm

        records = products.records(mode)
        usable = [i for i, r in enumerate(records) if r.get("image") is not None or r.get("title")
                  or r.get("description")]
        model = self._item_model
        meter = ClsAttentionMeter(model) if mode == "joint" and model is not None else None
        chunks = []
        with meter or nullcontext():
            for start in tqdm(range(0, len(usable), self.batch_size), disable=not self.progress,
                              desc=f"{self.name} {mode}", dynamic_ncols=True):
                rows = usable[start : start + self.batch_size]
                batch = [self.encoder.to_product(records[i], i, products.image_root) for i in rows]
                vecs = (self.encoder.encode_products(batch, mode) if self.pass_mode
                        else self.encoder.encode_products(batch))
                chunks.append(np.asarray(vecs, dtype=np.float32))
        if meter is not None:
            self._attention[products.key] = meter.result()
        dim = chunks[0].shape[1] if chunks else int(getattr(self.encoder, "dim", 1))
        out = np.zeros((len(records), dim), dtype=np.float32)
        if chunks:
            out[usable] = np.concatenate(chunks)
        return out

    def diagnostics(self, products: RawProducts, sample: int = 2000, seed: int = 0) -> dict[str, float]:
        """Modality diagnostics: the mean share of the last layer's [CLS] attention on image and on
        text tokens (over the joint pass of every product), and the mean cosine between each
        product's joint embedding and its image-only / title-only embeddings (over products with
        both; on a fixed random sample of ``sample`` products unless those modes are embedded)."""
        out: dict[str, float] = {}
        if self._item_model is not None:
            if products.key not in self._attention:
                self.embed(products, "joint")
            out.update(self._attention.get(products.key, {}))
        both = products.has_image & products.has_title
        rows = np.flatnonzero(both)
        if not (self.cached(products, "image") and self.cached(products, "title")) and len(rows) > sample:
            rows = np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
            sub = products.subset(rows)
            joint, image, title = (self._embed(sub, m) for m in EMBED_MODES)
        else:
            joint, image, title = (self.embed(products, m)[rows] for m in EMBED_MODES)
        out["cos_joint_image"] = float(np.sum(joint * image, axis=1).mean()) if len(rows) else float("nan")
        out["cos_joint_title"] = float(np.sum(joint * title, axis=1).mean()) if len(rows) else float("nan")
        return out


def load_featurizer(spec: str, device: str | None = None, batch_size: int = 64,
                    progress: bool = False) -> Featurizer:
    """A featurizer from ``KIND:DIR``: ``item:RUN_DIR`` (an ITEm run) or ``dual:DIR`` (the dual
    encoder, when ``item_embed.dual`` is installed). Named ``KIND:<folder name>``."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"featurizer {spec!r}: expected KIND:DIR, e.g. item:runs/a or dual:runs/b")
    name = f"{kind}:{Path(path).name}"
    if kind == "item":
        return EncoderFeaturizer.from_pretrained(path, name, device, batch_size, progress)
    if kind == "dual":
        try:
            from .dual import DualEncoder  # built separately; optional here
        except ImportError as e:
            raise ValueError(f"featurizer {spec!r}: the dual encoder is not available ({e})") from None
        encoder = DualEncoder.from_pretrained(path)
        missing = [m for m in ("to_product", "encode_products") if not hasattr(encoder, m)]
        if missing:
            raise ValueError(f"featurizer {spec!r}: DualEncoder lacks {', '.join(missing)}")
        return EncoderFeaturizer(encoder, name, batch_size, pass_mode=True, progress=progress)
    raise ValueError(f"featurizer {spec!r}: unknown kind {kind!r} (item, dual)")


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


def group_keys(products: RawProducts, group: str) -> np.ndarray:
    """Group per product; a product without one is its own singleton (a distractor)."""
    values = products.frame[group].tolist()
    return np.array([f"\x00{pid}" if _missing(v) else str(v) for v, pid in zip(values, products.ids)], dtype=object)


def split_keys(products: RawProducts, group: str | None) -> np.ndarray:
    """Keys of the reference split: the group, or the id where there is no group."""
    if group is None:
        return np.asarray(products.ids, dtype=object)
    values = products.frame[group].tolist()
    return np.array([pid if _missing(v) else str(v) for v, pid in zip(values, products.ids)], dtype=object)


def _floats(metrics: dict) -> dict:
    return {k: (int(v) if k in ("queries", "test") else float(v)) for k, v in metrics.items()}


def evaluate_featurizer(featurizer: Featurizer, products: RawProducts, group: str | None = None,
                        labels: Sequence[str] = (), modes: Sequence[str] = MODES, k: int = 10,
                        test_mask: np.ndarray | None = None) -> dict:
    """Every protocol for one featurizer: ``{"retrieval": {MODE: metrics}, "probe": {LABEL:
    {"linear": .., "knn": ..}}}``.

    Retrieval needs ``group``; queries are the products of groups with >= 2 members that have the
    mode's input (an image for image/image2image, a title for title). The gallery is the joint
    embedding of every product (image2image: the image embedding). A mode the featurizer cannot
    embed, or image2image for one that reads no images, is left out. Probes use joint embeddings.
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(sorted(unknown))} (use {', '.join(MODES)})")
    joint = featurizer.embed(products, "joint")
    if joint is None:
        raise ValueError(f"featurizer {featurizer.name} cannot embed products in joint mode")
    result: dict[str, dict] = {"retrieval": {}, "probe": {}}
    if group is not None:
        groups = group_keys(products, group)
        codes = _group_codes(groups)
        candidates = np.bincount(codes)[codes] >= 2
        has = {"joint": np.ones(len(products), bool), "image": products.has_image, "title": products.has_title,
               "image2image": products.has_image}
        for mode in modes:
            if mode == "image2image" and "image" not in featurizer.modalities:
                continue
            queries = joint if mode == "joint" else featurizer.embed(products, "image" if mode == "image2image" else mode)
            if queries is None:
                continue
            gallery = queries if mode == "image2image" else joint
            rows = np.flatnonzero(candidates & has[mode])
            result["retrieval"][mode] = _floats(retrieval_metrics(queries[rows], gallery, groups, query_rows=rows))
    if labels:
        test = split_test_mask(split_keys(products, group)) if test_mask is None else test_mask
        for col in labels:
            if col not in products.frame:
                raise KeyError(f"no label column {col!r}")
            values = products.frame[col].to_numpy()
            result["probe"][col] = {"linear": _floats(linear_probe(joint, values, test)),
                                    "knn": _floats(knn_classify(joint, values, test, k=k))}
    return result


def evaluate_all(products: RawProducts, featurizers: Iterable[Featurizer], group: str | None = None,
                 labels: Sequence[str] = (), modes: Sequence[str] = MODES, k: int = 10,
                 diagnostics_of: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run every protocol for each featurizer on the same products and the same split.

    Returns the ``results.json`` document (the HTML report reads it; keep it stable)::

        {"catalog": str, "model": str | None,            # filled in by the caller
         "n_products": int,
         "features": {NAME: {"retrieval": {MODE: {"R@1", "R@10", "MAP@R", "queries"}},
                             "probe": {LABEL: {"linear": {"accuracy", "macro_f1", "test"},
                                               "knn": {"accuracy", "macro_f1", "test"}}}}},
         "diagnostics": {"cls_attention_image", "cls_attention_text",
                         "cos_joint_image", "cos_joint_title"} | None,
         "commands": [str], "seconds": {NAME: float}}

    ``diagnostics`` come from the featurizer named ``diagnostics_of`` (ITEm), None without one;
    every ITEm featurizer also gets ``features[NAME]["diagnostics"]``.
    ``seconds`` per feature include its fit and embedding passes (fusion reuses minilm's and
    pixels16's cached passes, so its time is only the rest).
    """
    log = log or (lambda _msg: None)
    test = split_test_mask(split_keys(products, group)) if labels else None
    out: dict[str, Any] = {"catalog": None, "model": None, "n_products": len(products), "features": {},
                           "diagnostics": None, "commands": [], "seconds": {}}
    for f in featurizers:
        t0 = time.perf_counter()
        log(f"{f.name}: embedding and evaluating")
        if hasattr(f, "fit"):
            f.fit(products)
        out["features"][f.name] = evaluate_featurizer(f, products, group, labels, modes, k, test)
        if getattr(f, "_item_model", None) is not None:  # every ITEm model gets its own
            out["features"][f.name]["diagnostics"] = f.diagnostics(products)
        if f.name == diagnostics_of and hasattr(f, "diagnostics"):
            out["diagnostics"] = out["features"][f.name].get("diagnostics") or f.diagnostics(products)
        out["seconds"][f.name] = round(time.perf_counter() - t0, 2)
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def results_json(results: dict) -> str:
    """The results document as strict JSON: NaN (a metric that could not be computed) -> null."""
    import json

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and not np.isfinite(x):
            return None
        return x

    return json.dumps(clean(results), indent=2, allow_nan=False)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def results_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The results document as (title, headers, rows) tables: retrieval, probes, diagnostics."""
    feats = results.get("features", {})
    tables = []
    rows = [[name, mode, _fmt(m.get("R@1")), _fmt(m.get("R@10")), _fmt(m.get("MAP@R")), _fmt(m.get("queries"))]
            for name, f in feats.items() for mode, m in f.get("retrieval", {}).items()]
    if rows:
        tables.append(("Same-product retrieval", ["features", "query mode", "R@1", "R@10", "MAP@R", "queries"], rows))
    rows = [[name, label, _fmt(p["linear"]["accuracy"]), _fmt(p["linear"]["macro_f1"]),
             _fmt(p["knn"]["accuracy"]), _fmt(p["knn"]["macro_f1"])]
            for name, f in feats.items() for label, p in f.get("probe", {}).items()]
    if rows:
        tables.append(("Category prediction (test fold)", ["features", "label", "linear acc", "linear macro-F1",
                                                           "kNN acc", "kNN macro-F1"], rows))
    diag = {name: f["diagnostics"] for name, f in feats.items() if f.get("diagnostics")}
    if not diag and results.get("diagnostics"):
        diag = {"item": results["diagnostics"]}
    if diag:
        keys = list(dict.fromkeys(k for d in diag.values() for k in d))
        tables.append(("Modality diagnostics", ["features", *keys],
                       [[name, *(_fmt(d.get(k, float("nan"))) for k in keys)] for name, d in diag.items()]))
    if results.get("seconds"):
        tables.append(("Wall time (s)", ["features", "seconds"],
                       [[k, f"{v:.1f}"] for k, v in results["seconds"].items()]))
    return tables


def results_text(results: dict) -> str:
    """Plain-text tables for the terminal."""
    parts = []
    for title, headers, rows in results_tables(results):
        cells = [headers] + rows
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        parts.append("\n".join([title, line(headers), line(["-" * w for w in widths]), *map(line, rows)]))
    return "\n\n".join(parts)


def results_markdown(results: dict) -> str:
    """The results document as Markdown (results.md)."""
    lines = ["# Evaluation results", "",
             f"- Catalog: `{results.get('catalog')}` ({results.get('n_products')} products)",
             f"- Model: `{results.get('model')}`" if results.get("model")
             else f"- Features: {', '.join(f'`{n}`' for n in results.get('features', {}))}"]
    for cmd in results.get("commands", []):
        lines.append(f"- Command: `{cmd}`")
    for title, headers, rows in results_tables(results):
        lines += ["", f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
