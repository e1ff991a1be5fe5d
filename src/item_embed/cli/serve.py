"""Subcommand ``serve``: the search API and page (``serve.app``) under uvicorn."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from .common import HelpFormatter, add_device_arg, add_precision_arg


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from ..checkpoint import CheckpointError
    from ..data.catalog import Columns
    from ..index.product_index import IndexLoadError
    from ..serve.app import load_service
    from ..serve.memory import tune_allocator
    from ..serve.server import HostPolicy, deadline_protocol

    for name in ("max_upload_mb", "max_upload_mpx", "decode_memory_mb", "read_timeout"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {getattr(a, name)}")
    if a.threads < 1:
        raise ValueError(f"--threads must be at least 1, not {a.threads}")
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(levelname)s:     %(name)s: %(message)s")
    # Before the model loads and the worker threads start: freed image memory goes back to the system.
    tune_allocator()
    columns = Columns(id=a.id_column, title=a.title_column, image=a.image_column)
    hosts = HostPolicy.for_bind(a.host, a.allowed_host or ())
    try:
        app = load_service(a.model, a.index, a.classifier, a.catalog, a.image_root, columns=columns, device=a.device,
                           precision=a.precision, max_upload_bytes=int(a.max_upload_mb * 1_000_000), threads=a.threads,
                           title_column=a.title_column, max_upload_pixels=int(a.max_upload_mpx * 1_000_000),
                           decode_memory_mb=a.decode_memory_mb, allowed_hosts=hosts)
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
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {a.host}: reachable from other machines; the API has no authentication",
              file=sys.stderr)
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
                              "  the bound address get 400 (DNS rebinding): add names with --allowed-host.")
    s.add_argument("--model", required=True, help="run folder of the model that built the index")
    s.add_argument("--index", required=True, help="index folder from `item-embed index` (refused if built by another model)")
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
    add_device_arg(s)
    add_precision_arg(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")
    s.set_defaults(func=cmd_serve)
