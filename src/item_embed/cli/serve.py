"""Subcommand ``serve``: the search API and page (``serve.app``) under uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from .common import HelpFormatter, add_device_arg, add_precision_arg
from .search import MILVUS_TOKEN_ENV, add_backend_args, check_backend


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from ..checkpoint import CheckpointError
    from ..data.catalog import Columns
    from ..index.product_index import IndexLoadError
    from ..serve.app import load_service
    from ..serve.memory import tune_allocator
    from ..serve.security import API_KEY_ENV, ApiKeys, KeyConfigError, check_origin, is_loopback
    from ..serve.server import HostPolicy, deadline_protocol

    for name in ("max_upload_mb", "max_upload_mpx", "decode_memory_mb", "read_timeout"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {getattr(a, name)}")
    if a.threads < 1:
        raise ValueError(f"--threads must be at least 1, not {a.threads}")
    if a.rate_limit < 0:
        raise ValueError(f"--rate-limit must be 0 (off) or positive, not {a.rate_limit}")
    if a.rate_burst is not None and a.rate_burst < 1:
        raise ValueError(f"--rate-burst must be at least 1, not {a.rate_burst}")
    check_backend(a, "--index", a.index)
    origins = [check_origin(o) for o in a.cors_origin or ()]
    # Before anything loads: a service reachable from other machines needs a key (or --insecure).
    try:
        keys = ApiKeys.load(a.api_key, a.api_key_file)
    except KeyConfigError as e:
        print(f"item-embed serve: error: {e}", file=sys.stderr)
        return 2
    if a.api_key is not None:
        print(f"warning: --api-key shows in the process list (ps) and the shell history: prefer --api-key-file "
              f"or ${API_KEY_ENV}", file=sys.stderr)
    exposed = not is_loopback(a.host)
    if exposed and keys is None and not a.insecure:
        print(f"item-embed serve: error: refusing to listen on {a.host} (reachable from other machines) without an "
              f"API key: give --api-key-file FILE or set ${API_KEY_ENV}, or pass --insecure to serve it open",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(levelname)s:     %(name)s: %(message)s")
    # Before the model loads and the worker threads start: freed image memory goes back to the system.
    tune_allocator()
    columns = Columns(id=a.id_column, title=a.title_column, image=a.image_column)
    hosts = HostPolicy.for_bind(a.host, a.allowed_host or ())
    if a.backend == "milvus":
        from ..index.milvus_index import MilvusSource

        source = MilvusSource(a.uri, a.collection, token=os.environ.get(MILVUS_TOKEN_ENV) or None)
    else:
        source = a.index
    try:
        app = load_service(a.model, source, a.classifier, a.catalog, a.image_root, columns=columns, device=a.device,
                           precision=a.precision, max_upload_bytes=int(a.max_upload_mb * 1_000_000), threads=a.threads,
                           title_column=a.title_column, max_upload_pixels=int(a.max_upload_mpx * 1_000_000),
                           decode_memory_mb=a.decode_memory_mb, allowed_hosts=hosts, api_keys=keys,
                           cors_origins=origins, rate_limit=a.rate_limit, rate_burst=a.rate_burst)
    except (IndexLoadError, CheckpointError) as e:
        print(f"item-embed serve: error: {e}", file=sys.stderr)
        return 2
    health = app.state.service.health()
    host = f"[{a.host}]" if ":" in a.host else a.host
    print(f"serving {health.index_size} products (model {health.model_id}, dim {health.dim}, "
          f"{health.precision})"
          + (f", classifier: {health.classifier}" if health.classifier else "")
          + ("" if health.images else ", no product images (no catalog)"))
    print(f"search page: http://{host}:{a.port}/   API docs: http://{host}:{a.port}/docs", flush=True)
    limit = (f"{a.rate_limit:g} requests a minute per client (burst {app_rate_burst(a)})" if a.rate_limit
             else "no rate limit")
    print(f"access: {f'API key required ({len(keys)} accepted)' if keys else 'open (no API key)'}; {limit}; "
          f"CORS: {', '.join(origins) if origins else 'off'}", flush=True)
    if exposed and keys is None:
        print(f"warning: listening on {a.host}: reachable from other machines; the API has no authentication "
              "(--insecure)", file=sys.stderr)
    with _reload_on_sighup(app.state.service):
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, http=deadline_protocol(a.read_timeout),
                    timeout_keep_alive=KEEP_ALIVE_S)
    return 0


@contextmanager
def _reload_on_sighup(service) -> Iterator[None]:
    """While serving, SIGHUP reloads the index from its folder (``SearchService.reload_index``).

    The handler only sets an event: a watcher thread does the loading, so the event loop keeps
    answering requests meanwhile. Signals arriving during a reload coalesce into one more reload.
    """
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        yield
        return
    wake, stop = threading.Event(), threading.Event()

    def watch() -> None:
        while True:
            wake.wait()
            wake.clear()
            if stop.is_set():
                return
            try:
                service.reload_index()
            except Exception:  # never let the watcher die: the next SIGHUP must still work
                import logging

                logging.getLogger(__name__).exception("index reload failed")

    watcher = threading.Thread(target=watch, name="index-reload", daemon=True)
    watcher.start()
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: wake.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)
        stop.set()
        wake.set()
        watcher.join(5)


KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this


def app_rate_burst(a: argparse.Namespace) -> int:
    from ..serve.security import default_burst

    return a.rate_burst if a.rate_burst is not None else default_burst(a.rate_limit)


class ServeHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Keeps the description's line breaks and shows each option's default."""


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="search API and web page over an index",
                       formatter_class=ServeHelp,
                       description="Serve POST /search, GET /similar/{id}, /embed, /classify, /products/{id}[/image]\n"
                                   "and /health, with a search page at / and the OpenAPI docs at /docs.",
                       epilog="Reloading the index without a restart:\n"
                              "  rebuild it in place (`item-embed index ... --out INDEX` or\n"
                              "  `item-embed index-update INDEX`; both save atomically), then send SIGHUP:\n"
                              "  kill -HUP <pid of item-embed serve>.\n"
                              "  The new index is verified (checksums, the model that built it, a probe search)\n"
                              "  and swapped in while requests run; requests already running finish on the old one.\n"
                              "  A refused index is logged and the old one keeps serving. /health reports\n"
                              "  index_generation (accepted reloads), index_loaded and last_reload (ok/refused).\n"
                              "\n"
                              "Limits:\n"
                              "  an upload is refused (413) over --max-upload-mb bytes, over --max-upload-mpx\n"
                              "  megapixels (read from its header, before decoding), or when decoding it would\n"
                              "  need more than --decode-memory-mb (estimated from its size, mode and bit depth).\n"
                              "  Decodes running at once share --decode-memory-mb; large images are reduced as\n"
                              "  they decode. A request must arrive (headers and body) within --read-timeout\n"
                              "  seconds (408 and closed otherwise). Requests whose Host header is not a name of\n"
                              "  the bound address get 400 (DNS rebinding): add names with --allowed-host.\n"
                              "\n"
                              "Exposing it (--host other than 127.0.0.1 / ::1 / localhost):\n"
                              "  an API key is then required (or --insecure): put one or more keys in a file, one\n"
                              "  per line (--api-key-file), or in $ITEM_EMBED_API_KEY. Clients send\n"
                              "  'Authorization: Bearer KEY' or 'X-API-Key: KEY'; every route but /health, the\n"
                              "  search page (/) and its /static files answers 401 without it (/docs and\n"
                              "  /openapi.json too). Each client address may make --rate-limit requests a minute\n"
                              "  (--rate-burst at once; 429 with Retry-After past it); behind a reverse proxy all\n"
                              "  clients share the proxy's address (X-Forwarded-For is not trusted): limit there.\n"
                              "  --cors-origin lets pages of another site call the API from a browser.\n"
                              "\n"
                              "Milvus: --backend milvus --uri URI --collection NAME serves a Milvus collection\n"
                              "  instead of --index (a server's token from $MILVUS_TOKEN); SIGHUP re-reads the\n"
                              "  alias and checks the collection it names was built by the same model.")
    s.add_argument("--model", required=True, help="run folder of the model that built the index")
    s.add_argument("--index", help="index folder from `item-embed index` (refused if built by another model); "
                                   "or --backend milvus --uri --collection")
    s.add_argument("--classifier", help="classifier folder from `item-embed classify fit`: predicted labels on results")
    s.add_argument("--catalog", help="catalog to show product images from: a file, a URI (s3://, gs://, https://) or "
                                     ".tar shards (default: the one the embeddings came from)")
    s.add_argument("--image-root", help="folder or URI that the catalog's relative image paths start from "
                                        "(default: the one recorded in the index, or the catalog's folder)")
    s.add_argument("--id-column", default="id", help="column of the product id in the catalog")
    s.add_argument("--title-column", default="title", help="column of the title in the catalog")
    s.add_argument("--image-column", default="image", help="column of the image in the catalog")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image upload in MB")
    s.add_argument("--max-upload-mpx", type=float, default=16.0,
                   help="largest accepted image upload in megapixels (catalog images: 40)")
    s.add_argument("--decode-memory-mb", type=float, default=512.0,
                   help="memory that image decodes may hold at once, in MiB; an upload needing more is refused")
    s.add_argument("--threads", type=int, default=2, help="image decodes + model forward passes run at once")
    s.add_argument("--read-timeout", type=float, default=60.0,
                   help="seconds a client has to send a whole request (headers and body); 408 after")
    s.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name to answer besides those of --host (repeatable; '*': any), e.g. the DNS "
                        "name clients use or the one a proxy passes on")
    g = s.add_argument_group("access (see 'Exposing it' below)")
    g.add_argument("--api-key-file", metavar="PATH", help="file of accepted API keys, one per line ('#' comments); "
                                                          "also read: $ITEM_EMBED_API_KEY")
    g.add_argument("--api-key", metavar="KEY", help="an accepted API key (shows in `ps`: prefer --api-key-file or "
                                                    "$ITEM_EMBED_API_KEY)")
    g.add_argument("--insecure", action="store_true",
                   help="serve without an API key on an address reachable from other machines")
    g.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="an origin (https://shop.example.com) whose pages may call the API from a browser "
                        "(repeatable; '*': any; default: none, no CORS headers)")
    g.add_argument("--rate-limit", type=float, default=600.0, metavar="N",
                   help="requests a minute per client address (0: no limit; /health is not counted)")
    g.add_argument("--rate-burst", type=int, metavar="N",
                   help="requests a client may make at once (default: a quarter of --rate-limit)")
    add_backend_args(s)
    add_device_arg(s)
    add_precision_arg(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")
    s.set_defaults(func=cmd_serve)
