"""The products under evaluation and what embeds them.

Anything with a ``name`` and ``embed(products, mode)`` is a :class:`Featurizer`: ITEm
(:class:`EncoderFeaturizer`), the baselines of ``baselines``, the dual encoder (``dual``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from .diagnostics import ClsAttentionMeter

MODES = ("joint", "image", "title", "image2image", "title2image")
EMBED_MODES = ("joint", "image", "title")  # what a featurizer is asked for; image2image / title2image use these
PROBE_MODES = ("joint", "image")  # which embeddings a probe reads: the whole product, or its photo alone
_KEYS = itertools.count()


def missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def clean_text(value: Any) -> str | None:
    """Whitespace-collapsed text, None when absent or blank (as the catalog reader does)."""
    if missing(value):
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
    image_root: str | Path | None = None  # a folder, or a URI (kept as given: a Path would fold "s3://")
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

        from ..data.images import decode_image

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
        from ..data.catalog import Columns

        c = columns or Columns()
        n = len(frame)
        col = lambda name: frame[name].tolist() if name in frame else [None] * n  # noqa: E731
        images = [None if missing(v) or (isinstance(v, str) and not v.strip()) else v for v in col(c.image)]
        rest = frame.drop(columns=[c.image] if c.image in frame else []).reset_index(drop=True)
        return cls([str(x) for x in frame[c.id].tolist()], [clean_text(t) for t in col(c.title)],
                   [clean_text(d) for d in col(c.description)], images, rest,
                   image_root, c.description in frame)

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
                        batch_size: int = 64, progress: bool = False, precision: str = "auto",
                        shape_slice: bool = True) -> "EncoderFeaturizer":
        from ..encode import ItemEncoder

        encoder = ItemEncoder.from_pretrained(run_dir, device=device, precision=precision, shape_slice=shape_slice)
        return cls(encoder, name, batch_size, progress=progress)

    @property
    def precision(self) -> str | None:
        """The precision the encoder runs at (recorded in results.json)."""
        return getattr(self.encoder, "precision", None)

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
                    progress: bool = False, precision: str = "auto") -> Featurizer:
    """A featurizer from ``KIND:DIR``: ``item:RUN_DIR`` (an ITEm run), ``item-cls:RUN_DIR`` (its [CLS] alone,
    without the shape slice) or ``dual:DIR`` (the dual encoder). Named ``KIND:<folder name>``."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"featurizer {spec!r}: expected KIND:DIR, e.g. item:runs/a or dual:runs/b")
    name = f"{kind}:{Path(path).name}"
    if kind in ("item", "item-cls"):
        return EncoderFeaturizer.from_pretrained(path, name, device, batch_size, progress, precision,
                                                 shape_slice=kind == "item")
    if kind == "dual":
        from .dual import DualEncoder

        encoder = DualEncoder.from_pretrained(path, device=device, precision=precision)
        return EncoderFeaturizer(encoder, name, batch_size, pass_mode=True, progress=progress)
    raise ValueError(f"featurizer {spec!r}: unknown kind {kind!r} (item, item-cls, dual)")
