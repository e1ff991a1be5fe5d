"""Locations that are URIs (``s3://``, ``gs://``, ``http(s)://``, ``file://`` ...), read through fsspec.

Storage options come from the environment and the standard configuration files only: fsspec's own
(``FSSPEC_S3_...`` variables, ``~/.config/fsspec/``), then each backend's (AWS variables and
``~/.aws``, ``gcloud`` credentials). Nothing here takes or stores credentials, and every location
that reaches a message, a report or an output file goes through :func:`redact` first: presigned URLs
carry their signature in the query string, and ``user:password@`` may sit in the authority.

Image fetching (:func:`fetch_bytes`) has a deadline per try, bounded retries with backoff for
transient failures, and a size cap enforced while the body streams in.
"""

from __future__ import annotations

import posixpath
import random
import re
import time
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from .images import ImageError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# What pathlib makes of a URI ("https://cdn/x" -> "https:/cdn/x"): undone where a root arrives as a Path.
_MANGLED = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/(?!/)")
HTTP = ("http", "https")
# Worth another try: the server or the network may do better in a moment.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def scheme(location: Any) -> str | None:
    """The URI scheme of ``location`` (lower case), or None for a plain path or a non-string."""
    if not isinstance(location, str):
        return None
    m = _SCHEME.match(location.strip())
    return m.group(1).lower() if m else None


def is_uri(location: Any) -> bool:
    return scheme(location) is not None


def is_remote(location: Any) -> bool:
    """A URI that is not a local file (``file://`` reads like a path)."""
    s = scheme(location)
    return s is not None and s not in ("file", "local")


def local_path(location: str) -> str:
    """The path of a ``file://`` URI."""
    return location.split("://", 1)[1] if scheme(location) in ("file", "local") else location


def unmangle(location: Any) -> Any:
    """A URI that went through ``pathlib.Path`` ("s3:/bucket/x") back to "s3://bucket/x"; else as given."""
    text = str(location)
    if _MANGLED.match(text) and not is_uri(text):
        return _MANGLED.sub(r"\1://", text, count=1)
    return location


def redact(location: Any) -> str:
    """``location`` safe to print or store: no ``user:password@``, no query string, no fragment."""
    text = str(location)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parent(location: str) -> str:
    """The folder of a URI: "s3://b/cat/x.parquet" -> "s3://b/cat"."""
    parts = urlsplit(location)
    return urlunsplit((parts.scheme, parts.netloc, posixpath.dirname(parts.path).rstrip("/"), "", ""))


def join(root: str, relative: str) -> str:
    """``relative`` under the URI ``root``; ImageError when it climbs out of the root (``../``)."""
    rel = posixpath.normpath(relative.replace("\\", "/"))
    if rel.startswith("../") or rel == ".." or rel.startswith("/"):
        raise ImageError(f"image path {relative!r} escapes the image root {redact(root)}")
    return root.rstrip("/") + "/" + rel


class MissingBackend(ValueError):
    """A URI scheme whose fsspec backend is not installed (fatal: every row would fail the same way)."""


EXTRAS = {"s3": "item-embed[s3]", "s3a": "item-embed[s3]", "gs": "item-embed[gcs]", "gcs": "item-embed[gcs]"}


def filesystem(location: str):
    """(fsspec filesystem, path within it) for a URI, with options from the environment/config only."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as e:
        hint = EXTRAS.get(scheme(location) or "", "the fsspec backend it names")
        raise MissingBackend(f"reading {scheme(location)}:// locations needs {hint} installed ({e})") from None


def open_binary(location: str) -> IO[bytes]:
    """A seekable binary file object for a URI (Parquet and CSV catalogs, shards)."""
    fs, path = filesystem(location)
    return fs.open(path, "rb")


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.isfile(path)


class FetchError(ImageError):
    """An image that could not be fetched; ``status`` is the HTTP status or the error's name."""

    def __init__(self, message: str, uri: str, status: int | str | None = None) -> None:
        super().__init__(message)
        self.uri, self.status = uri, status


class _Retry(Exception):
    """A transient failure: try again after a pause, unless the tries are used up."""

    def __init__(self, message: str, status: int | str | None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FetchOptions:
    """How remote images are fetched: ``workers`` requests in flight, each try cut off after
    ``timeout`` seconds, up to ``retries`` more tries after a transient failure (timeouts, dropped
    connections, HTTP 408/429/5xx), waiting ``backoff`` * 2**try seconds (+ jitter) between them."""

    workers: int = 32
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5


def fetch_bytes(uri: str, max_bytes: int, options: FetchOptions | None = None) -> bytes:
    """The bytes of a remote image; FetchError (status or error, redacted URI, tries) when it fails.

    The body is read in blocks and the transfer dropped as soon as it passes ``max_bytes``, so a huge
    or endless body costs at most the cap.
    """
    options = options or FetchOptions()
    tries = max(0, options.retries) + 1
    shown = redact(uri)
    for attempt in range(tries):
        try:
            if scheme(uri) in HTTP:
                return _fetch_http(uri, max_bytes, options.timeout)
            return _fetch_fsspec(uri, max_bytes)
        except _Retry as e:
            if attempt + 1 == tries:
                raise FetchError(f"{e} for {shown} (after {tries} tries)", shown, e.status) from None
            time.sleep(options.backoff * 2**attempt * (0.5 + random.random()))
        except (FetchError, MissingBackend):
            raise
        except FileNotFoundError:
            raise FetchError(f"not found: {shown}", shown, 404) from None
        except PermissionError as e:
            raise FetchError(f"access denied ({e.__class__.__name__}) for {shown}", shown, 403) from None
        except Exception as e:  # a backend's own error: name it, without its message (it may echo the URL)
            raise FetchError(f"{type(e).__name__} for {shown}", shown, type(e).__name__) from None
    raise AssertionError("unreachable")


def _too_big(size: int, max_bytes: int, uri: str) -> FetchError:
    shown = redact(uri)
    return FetchError(f"image is over the {max_bytes:,}-byte cap ({size:,}+ bytes) at {shown}", shown, "too large")


def _fetch_http(uri: str, max_bytes: int, timeout: float) -> bytes:
    """One GET through fsspec's HTTP filesystem session (aiohttp), streamed and capped."""
    import asyncio

    import aiohttp
    from fsspec.asyn import sync

    fs, _ = filesystem(uri)

    async def get() -> bytes:
        session = await fs.set_session()
        kwargs = {**fs.kwargs, "timeout": aiohttp.ClientTimeout(total=timeout)}
        async with session.get(fs.encode_url(uri), **kwargs) as r:
            if r.status in RETRY_STATUS:
                raise _Retry(f"HTTP {r.status}", r.status)
            if r.status != 200:
                shown = redact(uri)
                raise FetchError(f"HTTP {r.status} for {shown}", shown, r.status)
            if r.content_length is not None and r.content_length > max_bytes:
                raise _too_big(r.content_length, max_bytes, uri)
            body = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                body += block
                if len(body) > max_bytes:
                    raise _too_big(len(body), max_bytes, uri)
            return bytes(body)

    try:
        return sync(fs.loop, get)
    except aiohttp.TooManyRedirects:
        shown = redact(uri)
        raise FetchError(f"too many redirects for {shown}", shown, "redirect loop") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise _Retry(f"timed out after {timeout:g}s", "timeout") from None
    except aiohttp.ClientResponseError as e:
        if e.status in RETRY_STATUS:
            raise _Retry(f"HTTP {e.status}", e.status) from None
        shown = redact(uri)
        raise FetchError(f"HTTP {e.status} for {shown}", shown, e.status) from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        raise _Retry(f"connection failed ({type(e).__name__})", type(e).__name__) from None


def _fetch_fsspec(uri: str, max_bytes: int) -> bytes:
    """Any other fsspec protocol (s3, gs, ...): the object size is known before any byte is read."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if size is not None and size > max_bytes:
                raise _too_big(size, max_bytes, uri)
            data = f.read(max_bytes + 1)
    except (TimeoutError, ConnectionError) as e:
        raise _Retry(f"connection failed ({type(e).__name__})", type(e).__name__) from None
    if len(data) > max_bytes:
        raise _too_big(len(data), max_bytes, uri)
    return data
