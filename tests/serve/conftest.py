"""The serve tests' real server: an app under uvicorn on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest


@contextlib.contextmanager
def _serving(app, **options):
    """``app`` under a real uvicorn on 127.0.0.1 and a free port, in a background thread; yields
    (host, port). ``options`` go to ``uvicorn.Config`` (warning-level logs and no lifespan unless given)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", "lifespan": "off", **options}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="session")
def live_server():
    """``with live_server(app, **uvicorn_options) as (host, port):`` (session-scoped, so fixtures of any
    scope can start one)."""
    return _serving
