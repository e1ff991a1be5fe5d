"""Product images from the catalog the embeddings came from, served as thumbnails."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from ..data import remote
from ..data.catalog import Catalog
from ..data.ids import IdError, product_id
from ..data.images import ImageError, ImageLimits, decode_image, path_error, read_image_file
from ..data.remote import FetchOptions, fetch_bytes
from .memory import DecodeBudget, decode_bounded

THUMBNAIL_PX = 256


def clean_id(value: Any) -> str | None:
    """A catalog id cell as the index spells it (``data.ids.product_id``, the one rule); None when it
    is missing or refused (a refused id was never indexed, so it has no image to serve)."""
    try:
        return product_id(value)
    except IdError:
        return None


class ProductImages:
    """Catalog images of indexed products: encoded bytes, or paths that must stay under ``root``.

    A path that resolves outside the root (``../``, an absolute path, a symlink pointing out) is
    refused, so the service can never be made to read an arbitrary file.
    """

    def __init__(self, sources: dict[str, bytes | str], root: Path | str | None, limits: ImageLimits,
                 fetch: FetchOptions | None = None) -> None:
        self._sources = sources
        # A remote root (s3://, https://) stays a URI; relative paths join it and may not climb out.
        self.root = root if isinstance(root, str) and remote.is_remote(root) else (
            Path(root).resolve() if root is not None else None)
        self.fetch = fetch
        self.limits = limits
        self._lock = threading.Lock()
        self._thumbs: dict[str, bytes] = {}  # small LRU by insertion order

    @classmethod
    def from_catalog(cls, catalog: Catalog, ids: Iterable[str] | None = None,
                     limits: ImageLimits | None = None) -> "ProductImages":
        """Map product id -> image value for the rows of ``catalog`` (first row wins on duplicates)."""
        col_id, col_image = catalog.columns.id, catalog.columns.image
        wanted = set(ids) if ids is not None else None
        sources: dict[str, bytes | str] = {}
        if col_image in catalog.frame:
            for raw_id, value in zip(catalog.frame[col_id], catalog.frame[col_image]):
                pid = clean_id(raw_id)
                if pid is None or pid in sources or (wanted is not None and pid not in wanted):
                    continue
                if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
                    sources[pid] = bytes(value)
                elif isinstance(value, str) and value.strip():
                    sources[pid] = value.strip()
        return cls(sources, catalog.image_root, limits or ImageLimits(), catalog.fetch)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._sources

    def __len__(self) -> int:
        return len(self._sources)

    def source(self, product_id: str) -> bytes | Path | str:
        """The product's image bytes, confined path or URI; KeyError when it has none, ImageError when refused."""
        value = self._sources[product_id]
        if isinstance(value, bytes):
            return value
        if remote.is_remote(value):
            return value  # the catalog names the remote image itself
        if isinstance(self.root, str):
            return remote.join(self.root, value)
        if self.root is None:
            raise ImageError("no image root to resolve the catalog path against")
        try:
            path = (self.root / value).resolve()  # an absolute value replaces the root: checked below
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte, a name too long
            raise path_error(e, value) from None
        if not path.is_relative_to(self.root):
            raise ImageError(f"image path {value!r} is outside the image root")
        return path

    def encoded(self, product_id: str) -> bytes:
        """The product image's encoded bytes (read from its confined path or fetched); ImageError
        without the server's paths in the message when it cannot be had."""
        src = self.source(product_id)
        if isinstance(src, bytes):
            return src
        if isinstance(src, str):
            return fetch_bytes(src, self.limits.max_bytes, self.fetch)
        try:
            return read_image_file(src, self.limits.max_bytes)
        except ImageError as e:  # name the catalog's own path, not the server's
            raise ImageError(str(e).replace(str(src), repr(str(self._sources[product_id])))) from None

    def thumbnail(self, product_id: str, size: int = THUMBNAIL_PX, budget: DecodeBudget | None = None) -> bytes:
        """The product image decoded under the limits and re-encoded as a JPEG of at most ``size`` px.

        budget: the service's decode memory budget (a catalog image needing more than all of it
        waits to decode alone rather than being refused: the catalog is the operator's).
        """
        with self._lock:
            cached = self._thumbs.get(product_id)
        if cached is not None:
            return cached
        if budget is not None:
            im = decode_bounded(self.encoded(product_id), size, self.limits, budget, refuse_over_budget=False)
        else:
            im = decode_image(self.source(product_id), None, self.limits, draft_size=size, fetch=self.fetch)
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=88)
        data = buf.getvalue()
        with self._lock:
            self._thumbs[product_id] = data
            while len(self._thumbs) > 4096:
                self._thumbs.pop(next(iter(self._thumbs)))
        return data
