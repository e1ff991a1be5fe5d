"""Command-line interface: a thin layer over the library (one function per subcommand).

Each module registers its own subcommands: ``train`` (train, train-dual, prepare, fit-shape),
``embed``, ``evaluate`` (evaluate, report), ``search`` (index, index-update, search, dedup),
``classify``, ``serve`` and ``demo`` (synth, demo).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..checkpoint import CheckpointError
from ..data.catalog import CatalogError
from . import classify, demo, embed, evaluate, export, search, serve, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="item-embed", description="ITEm product embeddings from images and titles.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (demo, train, embed, evaluate, search, classify, serve, export):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..index.product_index import IndexLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CatalogError, CheckpointError, IndexLoadError, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        if isinstance(e, FileNotFoundError) and not any(w in str(e).lower() for w in ("no such", "not found", "no ")):
            message = f"not found: {e.filename or e}"  # pyarrow raises it with the bare path
        print(f"item-embed {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
