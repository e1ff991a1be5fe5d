"""Access control for a service that may be exposed: API keys, CORS origins and a per-client rate limit.

- API keys (:class:`ApiKeys`, :class:`ApiKeyCheck`): when keys are configured every route but
  ``/health``, the search page (``/``) and its static files needs one, sent as
  ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; anything else is a 401 with
  ``WWW-Authenticate: Bearer``. The OpenAPI docs (``/docs``, ``/openapi.json``) need it too. Keys
  come from a key file (one per line), the environment (``ITEM_EMBED_API_KEY``) or the command
  line. Only their SHA-256 digests are kept; a candidate is hashed and compared in constant time
  with every configured digest (no early exit, so neither the key's length nor which key matched
  shows in the timing). Keys never appear in a message, a log line or a repr.
- CORS: ``--cors-origin`` (Starlette's CORSMiddleware); none by default, so no CORS headers.
  Preflight requests are answered by it without a key.
- Rate limit (:class:`RateLimiter`, :class:`RateLimit`): a token bucket per client address (IPv6
  clients by their /64, which one host owns), ``per_minute`` requests refilled evenly with ``burst``
  at once; past it a 429 with ``Retry-After``. In memory, thread-safe, bounded: buckets of clients
  idle long enough to be full again are dropped, and at most ``max_clients`` are kept (least
  recently seen dropped first). The client address is the TCP peer: ``X-Forwarded-For`` is not
  trusted (anyone can send it), so behind a reverse proxy every client shares the proxy's bucket
  (limit there instead, or turn this one off).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

API_KEY_ENV = "ITEM_EMBED_API_KEY"
KEY_HEADER = "X-API-Key"
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 4096
PUBLIC_PATHS = frozenset({"/", "/health"})
PUBLIC_PREFIXES = ("/static/",)
DEFAULT_RATE_PER_MINUTE = 600.0
DEFAULT_MAX_CLIENTS = 50_000
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})


class KeyConfigError(ValueError):
    """An API key or key file that cannot be used (the message never holds a key)."""


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_CHARS:
        raise KeyConfigError(f"API key from {where} has {len(key)} characters, fewer than {MIN_KEY_CHARS}: use a "
                             "long random key, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if len(key) > MAX_KEY_CHARS:
        raise KeyConfigError(f"API key from {where} is longer than {MAX_KEY_CHARS} characters")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise KeyConfigError(f"API key from {where} has a space, control or non-ASCII character: HTTP headers "
                             "cannot carry it reliably (use letters, digits and punctuation)")
    return key


def read_key_file(path: str | Path) -> list[str]:
    """The keys in ``path``: one per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyConfigError(f"cannot read the API key file {path}: {type(e).__name__}"
                             + (f" ({e.strerror})" if isinstance(e, OSError) and e.strerror else "")) from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_check_key(line, f"{path} line {n}"))
    if not keys:
        raise KeyConfigError(f"the API key file {path} holds no key (one per line)")
    return keys


class ApiKeys:
    """The accepted keys, kept as SHA-256 digests; ``matches`` compares in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in dict.fromkeys(keys))
        if not self._digests:
            raise KeyConfigError("no API key given")

    @classmethod
    def load(cls, api_key: str | None = None, key_file: str | Path | None = None,
             environ: dict | None = None) -> "ApiKeys | None":
        """Keys from ``key_file``, the ``ITEM_EMBED_API_KEY`` environment variable and ``api_key``
        (all that are given are accepted: a key can be rotated by listing old and new); None when
        none is given."""
        env = os.environ if environ is None else environ
        keys: list[str] = []
        if key_file is not None:
            keys += read_key_file(key_file)
        if env.get(API_KEY_ENV, "").strip():
            keys.append(_check_key(env[API_KEY_ENV].strip(), f"${API_KEY_ENV}"))
        if api_key is not None:
            keys.append(_check_key(api_key.strip(), "--api-key"))
        return cls(keys) if keys else None

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def matches(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        digest = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self._digests:  # every key compared, whichever matches
            found |= hmac.compare_digest(digest, known)
        return found


def presented_keys(headers: Headers) -> list[str]:
    """What the request offers as a key: ``Authorization: Bearer KEY`` and/or ``X-API-Key: KEY``."""
    out = []
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            out.append(value.strip())
    key = headers.get(KEY_HEADER.lower())
    if key and key.strip():
        out.append(key.strip())
    return out


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_preflight(scope) -> bool:
    if scope.get("method") != "OPTIONS":
        return False
    headers = Headers(scope=scope)
    return "origin" in headers and "access-control-request-method" in headers


class ApiKeyCheck:
    """ASGI middleware: 401 for a request to a non-public path without one of ``keys``."""

    def __init__(self, app, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or is_public(scope.get("path", "")) or is_preflight(scope):
            return await self.app(scope, receive, send)
        offered = presented_keys(Headers(scope=scope))
        ok = False
        for candidate in offered:
            ok |= self.keys.matches(candidate)
        if ok:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        detail = ("invalid API key" if offered else
                  f"API key required: send it as 'Authorization: Bearer KEY' or '{KEY_HEADER}: KEY'")
        response = JSONResponse({"detail": detail}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="item-embed"', "Cache-Control": "no-store"})
        await response(scope, receive, send)


def client_key(host: str | None) -> str:
    """The rate-limit bucket of a client address: IPv6 by its /64 (one host or site), else the address."""
    if not host:
        return "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class RateLimiter:
    """Token buckets per client: ``per_minute`` tokens a minute, at most ``burst`` saved up."""

    def __init__(self, per_minute: float, burst: int | None = None, max_clients: int = DEFAULT_MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not per_minute > 0:
            raise ValueError(f"the rate limit must be positive, not {per_minute}")
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0  # tokens per second
        self.burst = float(burst if burst is not None else default_burst(per_minute))
        if self.burst < 1:
            raise ValueError(f"the burst must be at least 1, not {burst}")
        self.max_clients = int(max_clients)
        self.full_after = self.burst / self.rate  # an idle bucket is full again after this: forget it
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at), oldest first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """0 when the client may go ahead (a token taken), else the seconds until it may."""
        now = self._clock()
        with self._lock:
            self._evict(now)
            tokens, at = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            _, at = next(iter(buckets.values()))
            if now - at >= self.full_after or len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
            else:
                return


def default_burst(per_minute: float) -> int:
    """A quarter of a minute's requests at once (a page of results loads a thumbnail per hit)."""
    return max(1, int(per_minute // 4))


class RateLimit:
    """ASGI middleware: 429 with Retry-After for a client past its rate (``/health`` is not counted)."""

    def __init__(self, app, limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        wait = self.limiter.take(client_key(client[0] if client else None))
        if wait <= 0:
            return await self.app(scope, receive, send)
        retry = max(1, math.ceil(wait))
        response = JSONResponse({"detail": f"too many requests: at most {self.limiter.per_minute:g} a minute per "
                                           f"client; retry in {retry} s"},
                                status_code=429, headers={"Retry-After": str(retry)})
        await response(scope, receive, send)


def check_origin(origin: str) -> str:
    """A CORS origin as browsers send it (``scheme://host[:port]``, no path), or ``*``."""
    from urllib.parse import urlsplit

    text = origin.strip()
    if text == "*":
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port], "
                         "e.g. https://shop.example.com (or * for any)")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (a name other than localhost: no)."""
    text = host.strip().strip("[]").lower()
    if text in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False
