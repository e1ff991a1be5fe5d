"""Embedding files: stream a catalog through the encoder into Parquet, committed part by part so that
a rerun continues after a crash (:mod:`item_embed.embed_parts`), and read them back (a single file, or
a folder of parts with a manifest)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import embed_parts
from .checkpoint import fsync_path, sha256_file
from .data.catalog import Catalog, CatalogReport
from .embed_parts import MANIFEST, PART_ROWS
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
        """Close, flush to disk and move the file into place; False (and no file) when nothing was written."""
        self.close()
        if self._writer is None:
            return False
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        self.tmp.replace(self.out)
        fsync_path(self.out.parent)  # the rename itself survives a power cut
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
        # Where the products came from, so that search results can show their images later
        # (a path, or a URI without credentials or query string).
        b"item_embed.catalog": catalog.location.encode(),
        b"item_embed.image_root": catalog.root_location.encode(),
    }


def embedding_table(rows: pd.DataFrame, products: list, carried: list[str], vectors: np.ndarray, dim: int) -> pa.Table:
    """``id``, the carried columns, ``has_image``, ``has_title`` and ``embedding`` of ``products``
    (``rows``: the raw catalog rows they came from, indexed by row number)."""
    frame = rows.loc[[p.row for p in products], carried].reset_index(drop=True)
    frame.insert(0, "id", [p.id for p in products])
    frame["has_image"] = [p.image is not None for p in products]
    frame["has_title"] = [p.text is not None for p in products]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return table.append_column(EMBEDDING, pa.FixedSizeListArray.from_arrays(flat, dim))


def is_single_file(out: str | Path) -> bool:
    """``--out x.parquet`` is one file (as always); any other name is a folder of parts."""
    return Path(out).suffix.lower() in (".parquet", ".pq")


def work_folder(out: str | Path) -> Path:
    """Where a single-file output keeps its committed parts until it is complete."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def embed_catalog(catalog: Catalog, encoder: ItemEncoder, out: str | Path, batch_size: int = 64,
                  strict: bool = False, report: CatalogReport | None = None, progress: bool = True, *,
                  resume: bool = False, part_rows: int = PART_ROWS) -> int:
    """Write ``id``, ``embedding`` and the carried columns of every usable product to ``out``.

    ``out`` ending in ``.parquet`` is one file, any other name a folder of committed parts with a
    manifest (see :mod:`item_embed.embed_parts`). Either way the work is committed part by part (a
    single file's parts wait in ``OUT.parts/`` and are joined at the end), so a rerun after a crash,
    or ``resume=True``, continues after the last committed part with the same result. The catalog
    is decoded, encoded and written chunk by chunk, so memory does not grow with it.
    Returns the number of products written; ``report`` receives the row report.
    """
    report = report if report is not None else CatalogReport()
    out = Path(out)
    folder = work_folder(out) if is_single_file(out) else out
    if is_single_file(out) and resume and not folder.exists() and out.is_file():
        copy_report(report, embed_parts.read_report(report_beside(out)))  # finished and joined already: nothing to do
        return read_embedding_table(out).num_rows
    part_rows = aligned_part_rows(part_rows, batch_size)
    fp = embed_parts.fingerprint(catalog, encoder, batch_size, part_rows, 1)
    metadata = embedding_metadata(encoder, catalog)
    # A single file whose parts were all committed but not yet joined (a crash while joining): join them.
    joining = is_single_file(out) and embed_parts.finished(folder, fp)
    state = embed_parts.prepare_folder(folder, fp, resume or joining)
    if state == "done":
        return finished_output(folder, out, joining, metadata, report)
    if state == "resume" and progress:
        print(f"continuing the unfinished embedding run in {folder}")
    share, records = embed_parts.embed_share(catalog, encoder, folder, 0, 1, batch_size, strict, progress,
                                             part_rows, metadata)
    copy_report(report, share)
    if report.used == 0:
        raise ValueError(f"no usable products in {catalog.source}: nothing to embed")
    embed_parts.finish(folder, fp, records, report)
    if not is_single_file(out):
        return report.used
    return join_parts(folder, out, metadata, report)


def join_parts(folder: Path, out: Path, metadata: dict[bytes, bytes], report: CatalogReport) -> int:
    """A single-file output's committed parts joined into ``out``, its report beside it; returns rows."""
    written = embed_parts.merge_into_file(folder, out, metadata)
    report.write(report_beside(out))
    embed_parts.remove_folder(folder)
    return written


def finished_output(folder: Path, out: Path, joining: bool, metadata: dict[bytes, bytes],
                    report: CatalogReport) -> int:
    """An output whose parts are all committed: its report copied into ``report``, a single file's
    parts joined (``joining``: a crash while joining); returns the products written."""
    copy_report(report, embed_parts.read_report(folder / "report.json"))
    if joining:
        return join_parts(folder, out, metadata, report)
    return sum(e["count"] for e in embed_parts.read_manifest(folder)["parts"])


def aligned_part_rows(part_rows: int, batch_size: int) -> int:
    """Parts hold whole chunks (4 batches), so that a part's batches never depend on where a run started."""
    if part_rows < 1:
        raise ValueError(f"part rows must be positive, not {part_rows}")
    chunk = batch_size * 4
    return -(-part_rows // chunk) * chunk


def report_beside(out: Path) -> Path:
    """Where the row report of an embed output goes: EMB.report.json beside a file, inside a folder."""
    return out.parent / (out.stem + ".report.json") if is_single_file(out) else out / "report.json"


def copy_report(dst: CatalogReport, src: CatalogReport) -> None:
    dst.source, dst.rows_in, dst.used = src.source, src.rows_in, src.used
    dst.text_only, dst.image_only, dst.problems = src.text_only, src.image_only, list(src.problems)


def embed_catalog_distributed(catalog: Catalog, encoder: ItemEncoder, out_dir: str | Path, rank: int, world: int,
                              batch_size: int = 64, strict: bool = False, progress: bool = True, *,
                              resume: bool = False, part_rows: int = PART_ROWS) -> CatalogReport:
    """Under torchrun: rank ``rank`` embeds its contiguous share of the rows into committed parts of
    the folder ``out_dir`` (resumable as :func:`embed_catalog`, with the same number of processes);
    rank 0 then writes the complete ``manifest.json`` and the merged ``report.json``.

    Returns the merged report on rank 0 and this rank's report elsewhere.
    """
    import torch.distributed as dist

    out_dir = Path(out_dir)
    part_rows = aligned_part_rows(part_rows, batch_size)
    fp = embed_parts.fingerprint(catalog, encoder, batch_size, part_rows, world)
    state = [None]
    if rank == 0:  # one process decides and clears; the others follow its decision
        try:
            state = [embed_parts.prepare_folder(out_dir, fp, resume)]
        except ValueError as e:
            state = [e]
    dist.broadcast_object_list(state, src=0)
    if isinstance(state[0], ValueError):
        raise state[0]
    if state[0] == "done":
        return embed_parts.read_report(out_dir / "report.json")
    share, records = embed_parts.embed_share(catalog, encoder, out_dir, rank, world, batch_size, strict,
                                             progress and rank == 0, part_rows, embedding_metadata(encoder, catalog))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (share, records))
    if rank != 0:
        return share
    merged = CatalogReport(source=catalog.source)
    every = []
    for rep, recs in gathered:
        _add_counts(merged, rep)
        every += recs
    embed_parts.finish(out_dir, fp, every, merged)
    return merged


def _add_counts(total: CatalogReport, part: CatalogReport) -> None:
    total.rows_in += part.rows_in
    total.used += part.used
    total.text_only += part.text_only
    total.image_only += part.image_only
    total.problems.extend(part.problems)


def part_files(path: Path) -> list[Path]:
    """The Parquet files of an embedding output: the file itself, or a folder's committed parts."""
    if not path.is_dir():
        return [path]
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{path} is a folder without {MANIFEST}: not a sharded embedding output")
    content = json.loads(manifest.read_text())
    if not content.get("complete", True):
        raise ValueError(f"{path} is an unfinished embedding run: rerun the same `item-embed embed` command "
                         "(or add --resume) to finish it")
    files = []
    for entry in content["parts"]:
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
    # Parts infer their column types on their own (a column all null in one part): promote to one schema.
    table = pa.concat_tables([pq.read_table(f) for f in part_files(Path(path))], promote_options="default")
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
    # Integer columns with nulls as Python ints (pyarrow would make them float64, altering ids past 2**53).
    frame = table.drop_columns([EMBEDDING]).to_pandas(integer_object_nulls=True)
    return frame, emb.astype(np.float32, copy=False)
