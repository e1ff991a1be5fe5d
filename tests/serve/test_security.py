"""Access control of the service (serve/security.py): API keys, the refusal to bind an
exposed address without one, CORS origins, the per-client rate limit, and keys never logged."""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from item_embed.cli import main  # noqa: E402
from item_embed.index.product_index import ProductIndex  # noqa: E402
from item_embed.serve import app as app_module  # noqa: E402
from item_embed.serve.app import create_app, load_service  # noqa: E402
from item_embed.serve.security import (API_KEY_ENV, ApiKeys, KeyConfigError, RateLimiter, check_origin,  # noqa: E402
                                       client_key, is_loopback)

KEY = "k3y-" + "A1b2C3d4E5f6G7h8J9"
OTHER_KEY = "second-key-" + "zZyYxXwWvV"
ORIGIN = "https://shop.example.com"


class World:
    def __init__(self, root: Path, catalog: Path, run: Path) -> None:
        self.root, self.catalog, self.run = root, catalog, run
        emb = root / "emb.parquet"
        assert main(["embed", str(catalog), "--model", str(run), "--out", str(emb), "--no-progress",
                     "--precision", "fp32"]) == 0
        self.index_dir = root / "index"
        ProductIndex.from_embedding_file(emb).save(self.index_dir)
        base = load_service(run, self.index_dir, precision="fp32")
        self.encoder = base.state.service.encoder
        self.index = base.state.service.index
        self.images = base.state.service.images
        self.pid = self.index.ids[0]

    def app(self, **kw):
        return create_app(self.encoder, self.index, catalog=self.images, **kw)


@pytest.fixture(scope="module")
def world(tiny_catalog, tiny_run, tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("security"), tiny_catalog, tiny_run)


@pytest.fixture(scope="module")
def keyed(world):
    with TestClient(world.app(api_keys=[KEY, OTHER_KEY])) as c:
        yield c


def _protected(pid: str) -> list[tuple[str, str, dict]]:
    return [("POST", "/search", {"data": {"title": "mug"}}), ("GET", f"/similar/{pid}", {}),
            ("POST", "/embed", {"data": {"title": "mug"}}), ("POST", "/classify", {"data": {"title": "mug"}}),
            ("GET", f"/products/{pid}", {}), ("GET", f"/products/{pid}/image", {}),
            ("GET", "/docs", {}), ("GET", "/openapi.json", {}), ("GET", "/no-such-route", {})]


# --------------------------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------------------------


def test_without_a_key_every_route_but_health_and_the_page_is_401(world, keyed):
    for method, path, kw in _protected(world.pid):
        r = keyed.request(method, path, **kw)
        assert r.status_code == 401, (path, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "API key required" in r.json()["detail"]
    # Public: the health check, the search page and its static files (they hold no data).
    for path in ("/health", "/", "/static/app.js", "/static/style.css"):
        assert keyed.get(path).status_code == 200, path


@pytest.mark.parametrize("method, path", [
    ("GET", "/health/../similar/{pid}"), ("GET", "//similar/{pid}"), ("GET", "/similar/{pid}/"),
    ("GET", "/SIMILAR/{pid}"), ("GET", "/static/../similar/{pid}"), ("GET", "/static/..%2fsimilar/{pid}"),
    ("GET", "/health/"), ("GET", "/HEALTH"), ("HEAD", "/similar/{pid}"), ("OPTIONS", "/similar/{pid}"),
    ("GET", "/products/{pid}/image"), ("HEAD", "/products/{pid}/image"),
])
def test_path_and_method_tricks_never_reach_data_without_a_key(world, keyed, method, path):
    r = keyed.request(method, path.format(pid=world.pid))
    assert r.status_code in (401, 404, 405), (method, path, r.status_code)
    assert world.pid not in r.text


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong-key-0123456789"},
                                     {"X-API-Key": KEY.upper()}, {"X-API-Key": KEY[:-1]},
                                     {"X-API-Key": KEY + "x"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}, {"X-API-Key": ""}])
def test_a_wrong_key_is_401(world, keyed, headers):
    r = keyed.get(f"/products/{world.pid}", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert KEY not in r.text


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY} "},
                                     {"X-API-Key": KEY}, {"x-api-key": OTHER_KEY},
                                     {"Authorization": "Bearer wrong-key-0123456789", "X-API-Key": KEY}])
def test_the_right_key_is_200_on_every_route(world, keyed, headers):
    for method, path, kw in _protected(world.pid)[:-1]:
        r = keyed.request(method, path, headers=headers, **kw)
        expected = 404 if path == "/classify" else 200  # no classifier loaded: a 404 past the key check
        assert r.status_code == expected, (path, r.status_code, r.text[:200])
    r = keyed.get("/no-such-route", headers=headers)
    assert r.status_code == 404  # the key opens the door; the route still has to exist


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    keys = ApiKeys([KEY, OTHER_KEY, "third-key-0123456789"])
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    assert keys.matches(KEY)  # the first key matches: the others are still compared
    assert len(calls) == 3 and all(a == b == 32 for a, b in calls)  # digests: equal lengths whatever the key
    calls.clear()
    assert not keys.matches("x")
    assert len(calls) == 3
    assert not keys.matches("") and not keys.matches(None)
    assert KEY not in repr(keys) and KEY not in str(vars(keys))  # only digests are kept


def test_key_sources_file_environment_and_option(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# service keys\n\n{KEY}\n  {OTHER_KEY}  \n")
    keys = ApiKeys.load(key_file=f, environ={})
    assert len(keys) == 2 and keys.matches(KEY) and keys.matches(OTHER_KEY) and not keys.matches("# service keys")
    env_key = "from-the-environment-123"
    keys = ApiKeys.load(api_key="from-the-command-line-1", key_file=f, environ={API_KEY_ENV: env_key})
    assert len(keys) == 4 and keys.matches(env_key) and keys.matches("from-the-command-line-1")
    assert ApiKeys.load(environ={}) is None and ApiKeys.load(environ={API_KEY_ENV: "  "}) is None
    with pytest.raises(KeyConfigError, match="fewer than 16") as e:
        ApiKeys.load(api_key="short", environ={})
    assert "short" not in str(e.value)
    with pytest.raises(KeyConfigError, match="space, control or non-ASCII"):
        ApiKeys.load(environ={API_KEY_ENV: "has a space in it 0123"})
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(KeyConfigError, match="holds no key"):
        ApiKeys.load(key_file=tmp_path / "empty.txt", environ={})
    with pytest.raises(KeyConfigError, match="cannot read"):
        ApiKeys.load(key_file=tmp_path / "missing.txt", environ={})


def test_the_host_check_runs_before_the_key_check(world):
    with TestClient(world.app(api_keys=[KEY], allowed_hosts=["testserver"])) as c:
        r = c.get("/health", headers={"Host": "evil.example"})
        assert r.status_code == 400 and "not served here" in r.json()["detail"]
        assert c.get(f"/products/{world.pid}", headers={"Host": "evil.example"}).status_code == 400
        assert c.get(f"/products/{world.pid}", headers={"X-API-Key": KEY}).status_code == 200


def test_thumbnails_are_not_stored_by_shared_caches(world, keyed):
    r = keyed.get(f"/products/{world.pid}/image", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.headers["cache-control"].startswith("private")


# --------------------------------------------------------------------------------------------
# Keys never logged
# --------------------------------------------------------------------------------------------


def test_keys_never_appear_in_logs_or_answers(world, monkeypatch, caplog, live_server):
    """Right and wrong keys, a 401, a 422, a 500 and uvicorn's own access log: the key is nowhere."""
    import httpx

    caplog.set_level(logging.DEBUG)
    app = world.app(api_keys=[KEY], rate_limit=600)
    svc = app.state.service
    monkeypatch.setattr(svc, "similar", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    bodies = []
    # log_config=None: uvicorn's loggers (access log included) propagate to the root, where caplog listens.
    with live_server(app, log_level="debug", access_log=True, log_config=None) as (host, port), \
            httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as c:
        for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY + "-wrong"},
                        {"Authorization": f"Bearer {KEY[:-2]}"}, {}):
            for r in (c.post("/search", data={"title": "mug"}, headers=headers),
                      c.post("/search", data={"k": "0"}, headers=headers),
                      c.get(f"/similar/{world.pid}", headers=headers),
                      c.get("/health", headers=headers)):
                bodies.append((r.status_code, r.text, dict(r.headers)))
    statuses = {s for s, _, _ in bodies}
    assert {200, 401, 422, 500} <= statuses
    assert any("GET /similar/" in rec.getMessage() for rec in caplog.records)  # the access log was captured
    assert any(rec.levelno >= logging.ERROR and "unhandled error" in rec.getMessage() for rec in caplog.records)
    logged = caplog.text + "\n".join(str(rec.args) for rec in caplog.records)
    assert KEY not in logged and KEY[:-2] not in logged
    for _, text, headers in bodies:
        assert KEY[:-2] not in text and KEY[:-2] not in str(headers)


# --------------------------------------------------------------------------------------------
# CORS
# --------------------------------------------------------------------------------------------


def test_no_cors_headers_unless_an_origin_is_given(world, keyed):
    r = keyed.get("/health", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = keyed.options("/search", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_origin_preflight_needs_no_key_and_answers_carry_the_headers(world):
    with TestClient(world.app(api_keys=[KEY], cors_origins=[ORIGIN + "/"])) as c:
        r = c.options("/search", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization, x-api-key"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-api-key" in allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.post("/search", data={"title": "mug", "k": "2"}, headers={"Origin": ORIGIN, "X-API-Key": KEY})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = c.post("/search", data={"title": "mug"}, headers={"Origin": ORIGIN})  # the page can read the 401
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
        # Another site: no allow-origin header (the browser keeps the answer from its page); its preflight fails.
        r = c.post("/search", data={"title": "mug"}, headers={"Origin": "https://evil.example", "X-API-Key": KEY})
        assert "access-control-allow-origin" not in r.headers
        r = c.options("/search", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_cors_origins_are_checked():
    assert check_origin("https://Shop.Example.com:8443/") == "https://shop.example.com:8443"
    assert check_origin("*") == "*"
    for bad in ("shop.example.com", "https://shop.example.com/path", "ftp://x.example", "https://u@x.example", ""):
        with pytest.raises(ValueError, match="not an origin"):
            check_origin(bad)


# --------------------------------------------------------------------------------------------
# Rate limit
# --------------------------------------------------------------------------------------------


def test_429_with_retry_after_past_the_limit(world):
    app = world.app(rate_limit=60, rate_burst=3)
    with TestClient(app, client=("203.0.113.7", 5000)) as c, TestClient(app, client=("203.0.113.8", 5000)) as d:
        pid = world.pid
        assert [c.get(f"/products/{pid}").status_code for _ in range(3)] == [200, 200, 200]
        r = c.get(f"/products/{pid}")
        assert r.status_code == 429 and "too many requests" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 2  # one token a second
        assert c.get("/health").status_code == 200  # not counted, never refused
        assert d.get(f"/products/{pid}").status_code == 200  # another client has its own bucket


def test_the_rate_limit_counts_requests_with_wrong_keys(world):
    """The limit runs before the key check: guessing keys is limited too."""
    with TestClient(world.app(api_keys=[KEY], rate_limit=60, rate_burst=2)) as c:
        statuses = [c.get(f"/products/{world.pid}", headers={"X-API-Key": f"guess-{i:016d}"}).status_code
                    for i in range(3)]
        assert statuses == [401, 401, 429]
        assert c.get(f"/products/{world.pid}", headers={"X-API-Key": KEY}).status_code == 429


def test_rate_limiter_refills_and_keeps_bounded_memory():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, max_clients=3, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.take("a") == pytest.approx(0.5)  # half a token back: wait the other half
    now[0] += 0.5
    assert limiter.take("a") == 0
    for c in "bcdef":  # at most 3 clients kept: the least recently seen go first
        limiter.take(c)
    assert len(limiter) == 3
    now[0] += 2.0  # every bucket full again: forgotten on the next request
    limiter.take("z")
    assert len(limiter) == 1
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_rate_limiter_is_thread_safe():
    limiter = RateLimiter(per_minute=1e-6, burst=100)  # no refill to speak of: exactly 100 pass
    passed = []
    lock = threading.Lock()

    def hammer() -> None:
        n = sum(limiter.take("one") == 0 for _ in range(50))
        with lock:
            passed.append(n)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(passed) == 100


def test_ipv6_clients_share_a_bucket_per_64():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:198.51.100.4") == "198.51.100.4" and client_key("198.51.100.4") == "198.51.100.4"
    assert client_key(None) == "?" and client_key("testclient") == "testclient"


# --------------------------------------------------------------------------------------------
# The serve command
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_uvicorn(monkeypatch):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "my-host.example"])
def test_serve_refuses_an_exposed_address_without_a_key(world, fake_uvicorn, monkeypatch, capsys, host):
    def never(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(app_module, "load_service", never)
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--host", host]) == 2
    err = capsys.readouterr().err
    assert f"refusing to listen on {host}" in err and "--insecure" in err and len(err.strip().splitlines()) == 1
    assert not fake_uvicorn


def test_serve_exposed_with_insecure_warns_and_loopback_needs_no_key(world, fake_uvicorn, capsys):
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--host", "0.0.0.0",
                 "--insecure"]) == 0
    assert fake_uvicorn["host"] == "0.0.0.0"
    assert "no authentication" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        fake_uvicorn.clear()
        assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--host", host]) == 0
        assert fake_uvicorn["host"] == host
    assert is_loopback("[::1]") and not is_loopback("0.0.0.0") and not is_loopback("localhost.example")


def test_serve_with_a_key_file_requires_it_and_never_prints_it(world, fake_uvicorn, tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--host", "0.0.0.0",
                 "--api-key-file", str(keys), "--cors-origin", ORIGIN, "--rate-limit", "120"]) == 0
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    assert "API key required" in out.out and ORIGIN in out.out and "120 requests a minute" in out.out
    with TestClient(fake_uvicorn["app"], base_url="http://127.0.0.1") as c:
        assert c.get(f"/products/{world.pid}").status_code == 401
        assert c.get(f"/products/{world.pid}", headers={"X-API-Key": KEY}).status_code == 200
        r = c.get("/health", headers={"Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN


def test_serve_takes_the_key_from_the_environment_and_warns_about_the_option(world, fake_uvicorn, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv(API_KEY_ENV, OTHER_KEY)
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--host", "0.0.0.0"]) == 0
    with TestClient(fake_uvicorn["app"], base_url="http://127.0.0.1") as c:
        assert c.get(f"/products/{world.pid}", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
    fake_uvicorn.clear()
    capsys.readouterr()
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--api-key", KEY]) == 0
    out = capsys.readouterr()
    assert "shows in the process list" in out.err and KEY not in out.out + out.err
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--api-key", "short"]) == 2
    assert "fewer than 16" in capsys.readouterr().err


def test_serve_refuses_a_bad_origin_or_rate(world, fake_uvicorn, capsys):
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir),
                 "--cors-origin", "shop.example"]) == 2
    assert "not an origin" in capsys.readouterr().err
    assert main(["serve", "--model", str(world.run), "--index", str(world.index_dir), "--rate-limit", "-1"]) == 2
    assert "--rate-limit" in capsys.readouterr().err
    assert not fake_uvicorn
