"""Embedding files: stream a catalog through the encoder into Parquet, and read them back (a single
file, or a folder of parts with a manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .checkpoint import sha256_file, write_json_atomic
from .data.catalog import Catalog, CatalogReport
from .encode import ItemEncoder

EMBEDDING = "embedding"


class ParquetStream:
    """A Parquet file written chunk by chunk: rows go to a hidden temporary file with ``metadata`` on
    its schema, renamed to ``out`` by :meth:`commit`, so a crash never leaves a half-written ``out``.
    Later chunks are cast to the first chunk's schema."""

    def __init__(self, out: str | Path, metadata: dict[bytes, bytes]) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp")
        self.metadata, self.rows = metadata, 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema.with_metadata(self.metadata))
        self._writer.write_table(table.cast(self._writer.schema))
        self.rows += len(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def commit(self) -> bool:
        """Close and move the file into place; False (and no file) when nothing was written."""
        self.close()
        if self._writer is None:
            return False
        self.tmp.replace(self.out)
        return True

    def __enter__(self) -> "ParquetStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def embedding_metadata(encoder: ItemEncoder, catalog: Catalog) -> dict[bytes, bytes]:
    """The ``item_embed.*`` schema metadata of an embedding file: which model, precision and catalog."""
    return {
        b"item_embed.model_id": encoder.model_id.encode(),
        b"item_embed.config_hash": encoder.cfg.config_hash().encode(),
        b"item_embed.dim": str(encoder.dim).encode(),
        b"item_embed.precision": encoder.precision.encode(),
        # Where the products came from, so that search results can show their images later.
        b"item_embed.catalog": str(Path(catalog.source).resolve()).encode(),
        b"item_embed.image_root": str(Path(catalog.image_root).resolve()).encode(),
    }


def embed_catalog(catalog: Catalog, encoder: ItemEncoder, out: str | Path, batch_size: int = 64,
                  strict: bool = False, report: CatalogReport | None = None, progress: bool = True,
                  shard: tuple[int, int] | None = None) -> int:
    """Write ``id``, ``embedding`` and the carried columns of every usable product to ``out``.

    The catalog is decoded, encoded and written chunk by chunk, so memory does not grow with it.
    Returns the number of products written.
    """
    report = report if report is not None else CatalogReport()
    cfg = encoder.cfg
    carried = catalog.extra_columns
    with (tqdm(total=len(catalog), disable=not progress, desc="embed", dynamic_ncols=True) as bar,
          ParquetStream(out, embedding_metadata(encoder, catalog)) as stream):
        for part, chunk in catalog.iter_rows_and_products(cfg.image_size, cfg.use_description, strict, report,
                                                          chunk_size=batch_size * 4, shard=shard):
            bar.update(len(part))  # rows read, bad ones included
            if not chunk:
                continue
            vecs = encoder.encode_batched(chunk, batch_size)
            frame = part.loc[[p.row for p in chunk], carried].reset_index(drop=True)
            frame.insert(0, "id", [p.id for p in chunk])
            frame["has_image"] = [p.image is not None for p in chunk]
            frame["has_title"] = [p.text is not None for p in chunk]
            table = pa.Table.from_pandas(frame, preserve_index=False)
            flat = pa.array(vecs.reshape(-1), type=pa.float32())
            stream.write(table.append_column(EMBEDDING, pa.FixedSizeListArray.from_arrays(flat, encoder.dim)))
        if not stream.commit() and shard is None:
            raise ValueError(f"no usable products in {catalog.source}: nothing to embed")
    return stream.rows  # an empty shard writes no part; the manifest says so


MANIFEST = "manifest.json"


def embed_catalog_distributed(catalog: Catalog, encoder: ItemEncoder, out_dir: str | Path, rank: int, world: int,
                              batch_size: int = 64, strict: bool = False, progress: bool = True) -> CatalogReport:
    """Under torchrun: rank ``rank`` embeds its share of the rows into ``part-RANK.parquet``;
    rank 0 then writes ``manifest.json`` (parts, counts, checksums, model) and the merged report.

    Returns the merged report on rank 0 and this rank's report elsewhere.
    """
    import torch.distributed as dist

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f"part-{rank:05d}.parquet"
    report = CatalogReport()
    written = embed_catalog(catalog, encoder, part, batch_size, strict, report, progress and rank == 0,
                            shard=(rank, world))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (rank, written, report))
    if rank != 0:
        return report
    merged = CatalogReport(source=catalog.source)
    parts = []
    for r, n, rep in sorted(gathered, key=lambda g: g[0]):
        merged.rows_in += rep.rows_in
        merged.used += rep.used
        merged.text_only += rep.text_only
        merged.image_only += rep.image_only
        merged.problems.extend(rep.problems)
        if n:
            name = f"part-{r:05d}.parquet"
            parts.append({"file": name, "rows": n, "sha256": sha256_file(out_dir / name)})
    merged.problems.sort(key=lambda p: p.row)
    write_json_atomic(out_dir / MANIFEST, {
        "format": "item-embed-embeddings/1", "model_id": encoder.model_id, "dim": encoder.dim,
        "precision": encoder.precision, "catalog": str(Path(catalog.source).resolve()), "world_size": world,
        "parts": parts,
        "rows_in": merged.rows_in, "rows_used": merged.used, "rows_reported": merged.reported,
    })
    return merged


def part_files(path: Path) -> list[Path]:
    """The Parquet files of an embedding output: the file itself, or a sharded folder's parts."""
    if not path.is_dir():
        return [path]
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{path} is a folder without {MANIFEST}: not a sharded embedding output")
    files = []
    for entry in json.loads(manifest.read_text())["parts"]:
        f = path / entry["file"]
        if not f.is_file() or sha256_file(f) != entry["sha256"]:
            raise ValueError(f"{f} is missing or fails its checksum")
        files.append(f)
    if not files:
        raise ValueError(f"{path}: the manifest lists no parts")
    return files


def read_embedding_metadata(path: str | Path) -> dict[str, str]:
    """The ``item_embed.*`` metadata of an embedding file (model_id, config_hash, dim, precision,
    catalog, image_root)."""
    meta = pq.read_schema(part_files(Path(path))[0]).metadata or {}
    prefix = b"item_embed."
    return {k[len(prefix):].decode(): v.decode() for k, v in meta.items() if k.startswith(prefix)}


def read_embedding_table(path: str | Path) -> pa.Table:
    """The whole table of an embedding file, or of a sharded folder's parts read as one (rows count
    across parts); ValueError when it has no embedding column."""
    table = pa.concat_tables([pq.read_table(f) for f in part_files(Path(path))])
    if EMBEDDING not in table.column_names:
        raise ValueError(f"{path} has no {EMBEDDING!r} column: not an item-embed embedding file")
    return table


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(columns other than the embedding, float32 (n, d) embeddings) of an embedding file or sharded folder."""
    table = read_embedding_table(path)
    col = table.column(EMBEDDING).combine_chunks()
    if isinstance(col.type, pa.FixedSizeListType):
        emb = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    else:
        emb = np.stack(col.to_pylist())
    frame = table.drop_columns([EMBEDDING]).to_pandas()
    return frame, emb.astype(np.float32, copy=False)
