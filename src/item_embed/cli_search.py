"""Placeholder: filled in by its feature work."""

from __future__ import annotations


def register(sub) -> None:
    pass
