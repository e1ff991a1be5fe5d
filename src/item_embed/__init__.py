"""item-embed: ITEm product embeddings from images and titles, without labels."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ItemEncoder", "Catalog", "Columns", "ModelConfig", "TrainConfig", "__version__"]


def __getattr__(name: str):
    # Lazy: `import item_embed` stays light (no torch/transformers until a model is needed).
    if name == "ItemEncoder":
        from .encode import ItemEncoder

        return ItemEncoder
    if name in ("Catalog", "Columns"):
        from .data import catalog

        return getattr(catalog, name)
    if name in ("ModelConfig", "TrainConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'item_embed' has no attribute {name!r}")
