"""Embedding files: stream a catalog through the encoder into Parquet, and read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .catalog import Catalog, CatalogReport
from .encode import ItemEncoder

EMBEDDING = "embedding"


def embed_catalog(catalog: Catalog, encoder: ItemEncoder, out: str | Path, batch_size: int = 64,
                  strict: bool = False, report: CatalogReport | None = None, progress: bool = True) -> int:
    """Write ``id``, ``embedding`` and the carried columns of every usable product to ``out``.

    The catalog is decoded, encoded and written chunk by chunk, so memory does not grow with it.
    Returns the number of products written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = report if report is not None else CatalogReport()
    cfg = encoder.cfg
    carried = catalog.extra_columns
    metadata = {
        b"item_embed.model_id": encoder.model_id.encode(),
        b"item_embed.config_hash": encoder.cfg.config_hash().encode(),
        b"item_embed.dim": str(encoder.dim).encode(),
        # Where the products came from, so that search results can show their images later.
        b"item_embed.catalog": str(Path(catalog.source).resolve()).encode(),
        b"item_embed.image_root": str(Path(catalog.image_root).resolve()).encode(),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    writer = None
    written = 0
    bar = tqdm(total=len(catalog), disable=not progress, desc="embed", dynamic_ncols=True)
    try:
        for chunk in catalog.iter_chunks(cfg.image_size, cfg.use_description, strict, report, chunk_size=batch_size * 4):
            bar.update(len(chunk))
            if not chunk:
                continue
            vecs = np.concatenate([encoder.encode_products(chunk[i : i + batch_size])
                                   for i in range(0, len(chunk), batch_size)])
            frame = catalog.frame.iloc[[p.row for p in chunk]][carried].reset_index(drop=True)
            frame.insert(0, "id", [p.id for p in chunk])
            frame["has_image"] = [p.image is not None for p in chunk]
            frame["has_title"] = [p.text is not None for p in chunk]
            table = pa.Table.from_pandas(frame, preserve_index=False)
            flat = pa.array(vecs.reshape(-1), type=pa.float32())
            table = table.append_column(EMBEDDING, pa.FixedSizeListArray.from_arrays(flat, encoder.dim))
            if writer is None:
                schema = table.schema.with_metadata(metadata)
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(writer.schema))
            written += len(chunk)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"no usable products in {catalog.source}: nothing to embed")
    tmp.replace(out)
    return written


def read_embedding_metadata(path: str | Path) -> dict[str, str]:
    """The ``item_embed.*`` metadata of an embedding file (model_id, config_hash, dim, catalog, image_root)."""
    meta = pq.read_schema(path).metadata or {}
    prefix = b"item_embed."
    return {k[len(prefix):].decode(): v.decode() for k, v in meta.items() if k.startswith(prefix)}


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(columns other than the embedding, float32 (n, d) embeddings) of an embedding file."""
    table = pq.read_table(path)
    if EMBEDDING not in table.column_names:
        raise ValueError(f"{path} has no {EMBEDDING!r} column: not an item-embed embedding file")
    col = table.column(EMBEDDING).combine_chunks()
    if isinstance(col.type, pa.FixedSizeListType):
        emb = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    else:
        emb = np.stack(col.to_pylist())
    frame = table.drop_columns([EMBEDDING]).to_pandas()
    return frame, emb.astype(np.float32, copy=False)
