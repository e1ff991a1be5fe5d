"""HTTP search service: a trained encoder + a product index (+ optionally a classifier) behind FastAPI.

``create_app(encoder, index, ...)`` builds the app from loaded objects (what the tests use);
``load_service(model_dir, index_dir, ...)`` loads them from folders, refusing an index built by
another model. Endpoints::

    POST /search               multipart image and/or title, k -> nearest products
    GET  /similar/{id}?k=      nearest products to an indexed product (itself excluded)
    POST /embed                multipart image and/or title -> the embedding
    POST /classify             multipart image and/or title, k -> top-k labels (needs a classifier)
    GET  /products/{id}        carried metadata of an indexed product
    GET  /products/{id}/image  the product's catalog image as a JPEG thumbnail
    GET  /health               model id, index size, dimension, limits
    GET  /                     the search page (static/index.html); /docs and /openapi.json

Model calls are CPU-bound and run in worker threads (torch releases the GIL); a semaphore caps
how many image decodes and forward passes run at once, so that concurrent requests do not
oversubscribe the cores. Decode memory is bounded separately (``serve.memory``): each decode
reserves its estimated bytes (pixels x bytes per pixel of the decoded mode and its conversions,
read from the header) from one budget, an upload that needs more than the whole budget or has
more pixels than the upload cap is refused with 413, and large images are reduced as they are
decoded.
Every client error is a 4xx with ``{"detail": message}``; anything unexpected is logged and
answered with a generic 500.

The index can be swapped while requests run (``SearchService.reload_index``; ``item-embed serve``
does it on SIGHUP): the new index is loaded and checked against the model first, then the index
and everything derived from it are replaced by one attribute assignment. A request works with the
state it started with, so in-flight requests finish on the old index and none fails; a refused
index is logged and the old one stays in service.
"""

from __future__ import annotations

import io
import keyword
import itertools
import logging
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
import pandas as pd
from fastapi import HTTPException
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, ImageError, ImageLimits
from ..encode import ItemEncoder
from ..index.filters import BOOL, INT, OTHER, STRING, Filter, FilterError, column_kinds, parse_filter
from ..index.milvus_index import MilvusSource, load_index
from ..index.product_index import IndexLoadError, ProductIndex
from .memory import DEFAULT_DECODE_MEMORY_MB, DEFAULT_UPLOAD_MAX_PIXELS, MIB, DecodeBudget, DecodeRefused, decode_bounded
from .product_images import ProductImages
from .schemas import (ClassifyOut, FacetColumn, FacetsOut, FacetValue, HealthOut, HitOut, Prediction, ProductOut,
                      QueryOut, SearchOut)

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10_000_000
MAX_K = 100
MAX_OFFSET = 1000  # paging ("load more") goes this deep: a page asks the index for offset + k + 1 hits
REFERENCE_SAMPLE = 1000  # random indexed products a hit's relevance is measured against
MAX_FACET_VALUES = 50  # /facets lists a column's values when it has at most this many
PHOTO_ONLY_NOTE = ("Matched by shape only: the model's photo understanding is limited, so raw photo-only "
                   "scores stay low (near 0.1 at best). Relevance is relative: the share of the catalog "
                   "each hit is closer to the photo than.")
PREDICTION_CACHE = 50_000  # fine-tuned classifier: predicted labels of catalog products kept


class ServiceLoadError(ValueError):
    """The model, index, classifier or catalog given to the service do not go together."""


@dataclass
class SearchQuery:
    """A validated request: image bytes and/or a title."""

    image: bytes | None
    title: str | None

    @property
    def modalities(self) -> list[str]:
        return [name for name, v in (("image", self.image), ("title", self.title)) if v is not None]


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])(?:/|[A-Za-z]:[\\/]|\\\\)[^\s'\"()]*")
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"()]*")


def without_locations(message: str) -> str:
    """``message`` with absolute paths and URIs replaced by placeholders: what a client may see of
    an error about the server's files (the full message goes to the log)."""
    return _ABSOLUTE_PATH.sub("<server path>", _URI.sub("<location>", message))


def _jsonable(value: Any) -> Any:
    """A metadata cell as plain JSON (numpy scalars unwrapped, NaN -> null)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return None  # binary columns are not metadata to show
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return str(value)


@dataclass(frozen=True)
class _Served:
    """The index in service and what is derived from it: replaced as one object on reload, so a
    request that took it at its start sees one consistent index to the end."""

    index: ProductIndex
    row_of: dict[str, int]
    images: ProductImages | None
    loaded: str
    predictions: dict[str, Prediction | None] = field(default_factory=dict)  # fine-tuned classifier cache
    reference: "_Reference | None" = None  # what relevance is measured against
    facets: list[FacetColumn] = field(default_factory=list)  # /facets of this index

    @classmethod
    def of(cls, index: ProductIndex, images: ProductImages | None) -> "_Served":
        # A Milvus index is not read through to list its ids: its products are looked up by id.
        row_of = {pid: i for i, pid in enumerate(index.ids)} if isinstance(index, ProductIndex) else {}
        return cls(index, row_of, images,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   reference=_Reference.sample(index), facets=_facets(index))

    @property
    def frame(self) -> pd.DataFrame | None:
        """The index's metadata as a frame, when it keeps one (FAISS does; a remote index may not)."""
        meta = getattr(self.index, "metadata", None)
        return meta if isinstance(meta, pd.DataFrame) else None


@dataclass(frozen=True)
class _Reference:
    """A fixed sample of indexed products (up to REFERENCE_SAMPLE; random, seed 0, drawn once per
    loaded index): a hit's relevance is the share of it the hit is closer to the query than."""

    ids: tuple[str, ...]
    vectors: np.ndarray  # (m, d) float32, unit rows

    @classmethod
    def sample(cls, index) -> "_Reference | None":
        try:
            if isinstance(index, ProductIndex):
                ids = index.ids
                rng = np.random.default_rng(0)
                pick = sorted(rng.choice(len(ids), size=min(REFERENCE_SAMPLE, len(ids)), replace=False).tolist())
                chosen = tuple(ids[i] for i in pick)
            else:  # a remote collection: listing every id would read all of it, so the first ones listed
                chosen = tuple(itertools.islice(index.iter_ids(), REFERENCE_SAMPLE))
            if not chosen:
                return None
            vectors = np.stack([np.asarray(index.vector(i), dtype=np.float32) for i in chosen])
        except Exception as e:  # an index that cannot list or give back vectors: no relevance
            logger.warning("no relevance scale for this index (%s: %s)", type(e).__name__, e)
            return None
        return cls(chosen, vectors)

    def relevance(self, query: np.ndarray, scores: list[float], exclude: str | None = None) -> list[float]:
        """Per score: the share of the sample (``exclude`` left out) whose cosine to ``query`` is
        lower, ties counted half. Monotone in the score for one query."""
        ref = self.vectors @ np.asarray(query, dtype=np.float32)
        if exclude is not None and exclude in self.ids:
            ref = np.delete(ref, self.ids.index(exclude))
        if not len(ref):
            return [1.0 for _ in scores]
        ref = np.sort(ref)
        s = np.asarray(scores, dtype=np.float32)
        below = np.searchsorted(ref, s, side="left")
        not_above = np.searchsorted(ref, s, side="right")
        return [round(float(v), 4) for v in np.clip((below + not_above) / (2 * len(ref)), 0.0, 1.0)]


def _facets(index) -> list[FacetColumn]:
    """The index's metadata columns: kind, distinct count and, for up to MAX_FACET_VALUES distinct
    values, each value with its product count (what the page builds its filter menus from)."""
    frame = getattr(index, "metadata", None)
    if not isinstance(frame, pd.DataFrame):
        return []
    out = []
    for name, kind in column_kinds(frame).items():
        col = frame[name]
        try:
            counts = col.dropna().value_counts(sort=False) if kind != OTHER else None
        except TypeError:  # unhashable cells (lists)
            counts, kind = None, OTHER
        distinct = int(len(counts)) if counts is not None else 0
        values = []
        if counts is not None and kind in (STRING, INT, BOOL) and distinct <= MAX_FACET_VALUES:
            pairs = [(_jsonable(v), int(c)) for v, c in counts.items()]
            pairs.sort(key=lambda vc: (-vc[1], str(vc[0])))
            values = [FacetValue(value=v, count=c) for v, c in pairs if v is not None]
        named = str(name).isidentifier() and not keyword.iskeyword(str(name)) and str(name) not in ("true", "false", "True", "False", "None", "null")
        out.append(FacetColumn(name=str(name), kind=kind, distinct=distinct, values=values,
                               filterable=named and kind != OTHER))
    return out


RELOAD_ATTEMPTS = 3  # an index being saved is briefly absent (two renames): try again shortly
RELOAD_RETRY_S = 0.2


class SearchService:
    """Encoder + index (+ classifier, + catalog images), with the checks the endpoints rely on.

    index_dir: where ``reload_index()`` reads a rebuilt index from; images_loader: gives the catalog
    images for a newly loaded index (None: keep the current ones). max_pixels caps every image
    (catalog and upload), max_upload_pixels uploads only; decode_memory_bytes: what image decodes
    may hold at once (an upload that would need more is refused with 413).
    """

    def __init__(self, encoder: ItemEncoder, index: ProductIndex, classifier=None, images: ProductImages | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int = 2, title_column: str = "title", *, index_dir: str | Path | None = None,
                 images_loader: Callable[[ProductIndex], ProductImages | None] | None = None,
                 max_upload_pixels: int = DEFAULT_UPLOAD_MAX_PIXELS,
                 decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_MB * MIB) -> None:
        self.encoder = encoder
        self.check_index(index)
        self.classifier = classifier
        # A fine-tuned classifier embeds with its own encoder; a linear one with the index's.
        self.clf_encoder = None
        if classifier is not None:
            self.clf_encoder = classifier.encoder or encoder
            try:
                classifier.check_model(self.clf_encoder.model_id)
            except ValueError as e:
                raise ServiceLoadError(str(e)) from None
        self.max_upload_bytes = int(max_upload_bytes)
        self.limits = ImageLimits(max_pixels=int(max_pixels), max_bytes=self.max_upload_bytes)
        self.upload_limits = ImageLimits(max_pixels=min(int(max_pixels), int(max_upload_pixels)),
                                         max_bytes=self.max_upload_bytes)
        self.decode_budget = DecodeBudget(decode_memory_bytes)
        self.title_column = title_column
        self.index_dir = index_dir if isinstance(index_dir, MilvusSource) else (
            Path(index_dir) if index_dir is not None else None)
        self._images_loader = images_loader
        self._served = _Served.of(index, images)
        self._reload_lock = threading.Lock()
        self.index_generation = 0
        self.last_reload: str | None = None
        # Cap concurrent decodes and forward passes: each pass already uses every core through
        # intra-op threads. What the decodes hold is capped by decode_budget.
        self._slots = threading.BoundedSemaphore(max(1, int(threads)))
        self._pred_lock = threading.Lock()
        self._warm_up()

    # ------------------------------------------------------------------ the index in service

    @property
    def index(self) -> ProductIndex:
        return self._served.index

    @property
    def images(self) -> ProductImages | None:
        return self._served.images

    def check_index(self, index: ProductIndex) -> None:
        """ServiceLoadError unless ``index`` was built by this encoder and can be searched with its vectors."""
        if index.model_id != self.encoder.model_id:
            raise ServiceLoadError(f"the index was built by model {index.model_id}, the encoder is "
                                   f"{self.encoder.model_id}: rebuild the index with this model")
        if index.dim != self.encoder.dim:
            raise ServiceLoadError(f"the index has dimension {index.dim}, the encoder {self.encoder.dim}")
        if len(index):  # a probe: an indexed product's own vector must come back (or an exact twin of it)
            probe = index.ids[0] if isinstance(index, ProductIndex) else next(index.iter_ids())
            hits = index.search(index.vector(probe)[None, :], 10)[0]
            if not any(h.score > 0.99 for h in hits):
                raise ServiceLoadError(f"the index does not find product {probe!r} from its own vector: damaged")

    def reload_index(self, directory: str | Path | None = None) -> bool:
        """Swap in the index saved in ``directory`` (default: the one served from) without stopping.

        The new index is loaded (checksums verified), checked against the model and probed before
        it replaces the old one in a single assignment; requests already running finish on the old
        one. Returns False, logs why and keeps serving the old index when the new one is refused.
        Reloads are serialised; one may run while requests are served.
        """
        with self._reload_lock:
            source = ((directory if isinstance(directory, MilvusSource) else Path(directory))
                      if directory is not None else self.index_dir)
            if source is None:
                raise ValueError("no index directory to reload from: the service was built from a loaded index")
            t0 = time.perf_counter()
            old = self._served
            try:
                new = self._load_checked(source)
                images = self._images_loader(new) if self._images_loader is not None else old.images
            except Exception as e:  # anything: the old index stays in service
                self.last_reload = "refused"
                logger.error("index reload from %s refused, still serving the previous index (%d products): %s",
                             source, len(old.index), e)
                return False
            self._served = _Served.of(new, images)  # the swap: one atomic attribute assignment
            self.index_generation += 1
            self.last_reload = "ok"
            logger.warning("index reloaded from %s in %.2fs: %d products (was %d), generation %d",
                           source, time.perf_counter() - t0, len(new), len(old.index), self.index_generation)
            return True

    def _load_checked(self, source: Path | MilvusSource) -> ProductIndex:
        for attempt in range(RELOAD_ATTEMPTS):
            try:
                # Milvus: the alias is read again, and the collection it names checked for the model.
                index = load_index(source, expected_model_id=self.encoder.model_id)
                break
            except IndexLoadError as e:
                # A save in progress moves the folder aside for a moment: the next try finds it.
                if attempt + 1 == RELOAD_ATTEMPTS or "was built by model" in str(e):
                    raise
                time.sleep(RELOAD_RETRY_S)
        self.check_index(index)
        return index

    def _warm_up(self) -> None:
        """One title through each encoder before serving: the fast tokenizer sets its truncation
        state on the first call (a mutation); afterwards concurrent calls only read it."""
        for enc in {id(e): e for e in (self.encoder, self.clf_encoder) if e is not None}.values():
            enc.encode_products([enc.to_product({"title": "warm up"})])

    # ------------------------------------------------------------------ queries

    def check_image_header(self, data: bytes) -> None:
        """413 for uploads whose header claims more pixels than the upload cap, before any decoding
        (and before waiting for a slot)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
        except Image.DecompressionBombError as e:
            raise HTTPException(413, f"image refused: decompression bomb ({e})") from None
        except Exception:  # not an image at all: decode_image names the problem below
            return
        cap = self.upload_limits.max_pixels
        if w * h > cap:
            raise HTTPException(413, f"image claims {w}x{h} px, over the {cap:,}-pixel cap for uploads")

    def embed(self, query: SearchQuery, encoder: ItemEncoder | None = None) -> np.ndarray:
        """The query's L2-normalised embedding (d,); 4xx HTTPException for an unusable query."""
        enc = encoder or self.encoder
        record: dict[str, Any] = {"id": "query", "title": query.title}
        if query.image is not None:
            self.check_image_header(query.image)
        with self._slots:  # the decoded image exists only inside a slot
            if query.image is not None:
                record["image"] = self._decode(query.image, enc.cfg.image_size)
            try:
                product = enc.to_product(record, 0, None, self.limits)
            except ValueError as e:  # ImageError included
                raise HTTPException(422, str(e)) from None
            return enc.encode_products([product])[0]

    def _decode(self, data: bytes, size: int) -> Image.Image:
        """The upload decoded (reduced when large) under the pixel cap and the decode memory budget."""
        try:
            return decode_bounded(data, size, self.upload_limits, self.decode_budget)
        except DecodeRefused as e:
            raise HTTPException(413, f"image refused: {e}") from None
        except ImageError as e:
            raise HTTPException(422, f"unusable image: {e}") from None
        except MemoryError:
            raise
        except Exception as e:  # a decoder tripping over hostile bytes (struct.error, IndexError, ...)
            logger.warning("image decoder failed on an upload: %s: %s", type(e).__name__, e)
            raise HTTPException(422, f"unusable image: the decoder failed ({type(e).__name__})") from None

    def predict_query(self, query: SearchQuery, vector: np.ndarray) -> Prediction | None:
        if self.classifier is None:
            return None
        if self.clf_encoder is not self.encoder:
            vector = self.embed(query, self.clf_encoder)
        (label, p), = self.classifier.top_k(vector[None, :], 1)[0]
        return Prediction(label=label, probability=p)

    def classify(self, query: SearchQuery, k: int) -> ClassifyOut:
        if self.classifier is None:
            raise HTTPException(404, "no classifier is loaded: start the service with --classifier CLF_DIR")
        vector = self.embed(query, self.clf_encoder)
        top = self.classifier.top_k(vector[None, :], k)[0]
        return ClassifyOut(labels=[Prediction(label=lab, probability=p) for lab, p in top],
                           label_column=self.classifier.label_column, model_id=self.classifier.model_id,
                           modalities=query.modalities)

    def search(self, query: SearchQuery, k: int, filter: str | None = None, offset: int = 0) -> SearchOut:
        """The query's hits ranked offset+1 .. offset+k, among the products passing ``filter``."""
        t0 = time.perf_counter()
        served = self._served  # one index for the whole request, even if a reload swaps it meanwhile
        parsed = self._parse_filter(served, filter)  # a bad filter is refused before any model work
        vector = self.embed(query)
        hits = self._search_page(served, vector[None, :], k, offset, parsed)
        q = QueryOut(modalities=query.modalities, predicted_category=self.predict_query(query, vector))
        mode = {"image+title": "joint", "image": "photo", "title": "title"}["+".join(query.modalities)]
        return self._answer(served, q, hits, k, t0, mode=mode, vector=vector, filter=parsed, offset=offset)

    def similar(self, product_id: str, k: int, filter: str | None = None, offset: int = 0) -> SearchOut:
        t0 = time.perf_counter()
        served = self._served
        if product_id not in served.index:
            raise HTTPException(404, f"product {product_id!r} is not in the index")
        parsed = self._parse_filter(served, filter)
        vector = served.index.vector(product_id)
        hits = self._search_page(served, vector[None, :], k, offset, parsed, exclude=product_id)
        q = QueryOut(modalities=["product"],
                     product=self._product_at(served, product_id, served.row_of.get(product_id, -1)))
        return self._answer(served, q, hits, k, t0, mode="product", vector=vector, filter=parsed, offset=offset,
                            exclude=product_id)

    @staticmethod
    def _parse_filter(served: _Served, text: str | None) -> Filter | str | None:
        """The request's filter checked against the index's columns (400 with the reason when unusable);
        None for no filter. Without a local metadata frame the text goes to the index as it is."""
        if text is None or not text.strip():
            return None
        frame = served.frame
        if frame is None:
            return text.strip()
        try:
            return parse_filter(text.strip(), frame)
        except FilterError as e:
            raise HTTPException(400, f"bad filter: {e}") from None

    @staticmethod
    def _search_page(served: _Served, q: np.ndarray, k: int, offset: int, filter, exclude: str | None = None):
        """Up to offset + k + 1 hits (the one past the page tells whether there are more)."""
        try:
            if exclude is not None:
                return served.index.search(q, offset + k + 1, exclude=[{exclude}], filter=filter)[0]
            return served.index.search(q, offset + k + 1, filter=filter)[0]
        except FilterError as e:  # e.g. a remote index's own check of the filter
            raise HTTPException(400, f"bad filter: {e}") from None

    def _answer(self, served: _Served, q: QueryOut, hits, k: int, t0: float, *, mode: str, vector: np.ndarray,
                filter=None, offset: int = 0, exclude: str | None = None) -> SearchOut:
        has_more = len(hits) > offset + k
        page = hits[offset:offset + k]
        relevance: list[float | None] = [None] * len(page)
        if served.reference is not None and page:
            relevance = served.reference.relevance(vector, [h.score for h in page], exclude=exclude)
        predictions = self._hit_predictions(served, [h.id for h in page])
        out = []
        for rank, (h, pred, rel) in enumerate(zip(page, predictions, relevance), start=offset + 1):
            p = self._product_at(served, h.id, h.row, getattr(h, "metadata", None))
            out.append(HitOut(**p.model_dump(), score=h.score, rank=rank, relevance=rel, predicted_category=pred))
        label_column = self.classifier.label_column if self.classifier is not None else None
        return SearchOut(query=q, k=k, mode=mode, note=PHOTO_ONLY_NOTE if mode == "photo" else None,
                         filter=str(filter) if filter is not None else None, offset=offset,
                         total=self._total(served, filter, exclude), has_more=has_more, hits=out,
                         label_column=label_column, took_ms=round((time.perf_counter() - t0) * 1000, 2))

    @staticmethod
    def _total(served: _Served, filter, exclude: str | None) -> int | None:
        """How many products the query could return (None when the index keeps no metadata frame)."""
        n = len(served.index)
        if filter is None:
            return max(0, n - (1 if exclude is not None else 0))
        frame = served.frame
        if frame is None or not isinstance(filter, Filter):
            return None
        mask = filter.mask(frame)
        row = served.row_of.get(exclude) if exclude is not None else None
        return int(mask.sum()) - (1 if row is not None and mask[row] else 0)

    def facets(self) -> FacetsOut:
        served = self._served
        return FacetsOut(columns=served.facets, max_values=MAX_FACET_VALUES, index_size=len(served.index))

    # ------------------------------------------------------------------ products

    @staticmethod
    def _image_url(served: _Served, product_id: str) -> str | None:
        if served.images is None or product_id not in served.images:
            return None
        return f"/products/{quote(product_id, safe='')}/image"

    def image_url(self, product_id: str) -> str | None:
        return self._image_url(self._served, product_id)

    def product(self, product_id: str) -> ProductOut:
        served = self._served
        row = served.row_of.get(product_id, -1)
        cells = None
        try:
            if row < 0:  # not in a FAISS index, or a Milvus index (asked for the product's cells)
                cells = served.index.product(product_id) if not isinstance(served.index, ProductIndex) else None
                if cells is None:
                    raise KeyError(product_id)
        except KeyError:
            raise HTTPException(404, f"product {product_id!r} is not in the index") from None
        return self._product_at(served, product_id, row, cells)

    def _product_at(self, served: _Served, product_id: str, row: int, cells=None) -> ProductOut:
        """A product's card: ``cells`` (its metadata, when a Milvus hit carries it), else row ``row`` of
        a FAISS index's metadata, else (row -1) the index asked by id."""
        if cells is None:
            cells = served.index.metadata.iloc[row] if row >= 0 else served.index.product(product_id)
        cells = {str(k): _jsonable(v) for k, v in cells.items()}
        title = cells.pop(self.title_column, None)
        return ProductOut(id=product_id, title=title if isinstance(title, str) else None,
                          image_url=self._image_url(served, product_id), metadata=cells)

    def thumbnail(self, product_id: str) -> bytes:
        served = self._served
        if product_id not in served.index:
            raise HTTPException(404, f"product {product_id!r} is not in the index")
        if served.images is None:
            raise HTTPException(404, "no catalog loaded: product images are not available")
        if product_id not in served.images:
            raise HTTPException(404, f"product {product_id!r} has no image in the catalog")
        try:
            with self._slots:  # decoding a catalog image takes memory like an upload does
                return served.images.thumbnail(product_id, budget=self.decode_budget)
        except ImageError as e:
            # The reason may name server paths or storage URIs: those stay in the log.
            logger.warning("image of product %r is not available: %s", product_id, e)
            raise HTTPException(404, f"image of product {product_id!r} is not available: "
                                     f"{without_locations(str(e))}") from None

    # ------------------------------------------------------------------ classifier on results

    def _hit_predictions(self, served: _Served, ids: list[str]) -> list[Prediction | None]:
        """Top label of each listed indexed product (None without a classifier)."""
        if self.classifier is None or not ids:
            return [None] * len(ids)
        if self.clf_encoder is self.encoder:
            vectors = np.stack([served.index.vector(i) for i in ids])  # (n, d)
            return [Prediction(label=t[0][0], probability=t[0][1]) for t in self.classifier.top_k(vectors, 1)]
        # Fine-tuned: the products have to go through the classifier's own encoder (cached per index).
        cache = served.predictions
        with self._pred_lock:
            missing = [i for i in ids if i not in cache]
        if missing:
            found = self._predict_products(served, missing)
            with self._pred_lock:
                if len(cache) > PREDICTION_CACHE:
                    cache.clear()
                cache.update(found)
        with self._pred_lock:
            return [cache.get(i) for i in ids]

    def _predict_products(self, served: _Served, ids: list[str]) -> dict[str, Prediction | None]:
        enc = self.clf_encoder
        products, owners = [], []
        for i in ids:
            cells = served.index.metadata.iloc[served.row_of[i]] if i in served.row_of else served.index.product(i)
            title = cells.get(self.title_column)
            record: dict[str, Any] = {"id": i, "title": title if isinstance(title, str) else None}
            if served.images is not None and i in served.images:
                try:
                    record["image"] = served.images.source(i)
                except ImageError:
                    pass
            try:
                products.append(enc.to_product(record, 0, None, self.limits))
                owners.append(i)
            except ValueError:
                continue  # neither a usable image nor a title: no prediction
        out: dict[str, Prediction | None] = {i: None for i in ids}
        if products:
            with self._slots:
                vectors = enc.encode_products(products)
            for i, top in zip(owners, self.classifier.top_k(vectors, 1)):
                out[i] = Prediction(label=top[0][0], probability=top[0][1])
        return out

    def health(self) -> HealthOut:
        served = self._served
        return HealthOut(status="ok", model_id=self.encoder.model_id, precision=self.encoder.precision,
                         index_size=len(served.index),
                         dim=served.index.dim, index_kind=getattr(served.index, "kind", None),
                         classifier=(self.classifier.label_column or "label") if self.classifier is not None else None,
                         images=served.images is not None and len(served.images) > 0,
                         max_upload_bytes=self.max_upload_bytes,
                         max_upload_pixels=self.upload_limits.max_pixels,
                         decode_memory_mb=round(self.decode_budget.total / MIB, 1), max_k=MAX_K,
                         index_generation=self.index_generation,
                         index_loaded=served.loaded, last_reload=self.last_reload)
