"""Subcommands beyond train/embed/evaluate: index, search, dedup, classify, serve (acting on
embeddings), and train-dual, report and fit-shape.

Each feature module owns a ``register_*`` function; this file only collects them so the
main CLI stays small.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from . import cli_classify, cli_search, cli_serve

    cli_search.register(sub)
    cli_classify.register(sub)
    cli_serve.register(sub)
    from . import cli_report; cli_report.register(sub)  # noqa: E702  (train-dual, report)
    from . import cli_shape; cli_shape.register(sub)  # noqa: E702  (fit-shape)
