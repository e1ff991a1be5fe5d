"""Resumable, exactly-once embedding output: a folder of committed parts.

``OUT/`` holds:

- ``manifest.json``: what made the output (model, precision, catalog, columns, batch size, part size,
  processes), ``complete``; once complete, every part (file, row range, count, sha256) and row counts.
- ``part-NNNNN.parquet``: the usable products among catalog rows ``[row_start, row_stop)`` (no file
  when there are none). Part k covers ``part_rows`` rows of its process's share of the catalog.
- ``part-NNNNN.json``: the part's commit record (row range, count, sha256, its share of the row report),
  written atomically after the Parquet file is in place. A part is committed once its record exists and
  its file matches the checksum; anything else in the folder is unfinished work, redone on resume.
- ``report.json``: the whole row report, once complete.

A rerun into the folder (or ``embed --resume``) continues after the last committed part of each
process. Part boundaries and batches depend only on the rows, so the result is the same, row for row,
as an uninterrupted run's; ids already claimed by committed rows are rebuilt from the parts and their
reports (the rows of a part that are not reported are its products, in order).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .checkpoint import fault_point, sha256_file, write_json_atomic
from .data.catalog import Catalog, CatalogReport, Problem

MANIFEST = "manifest.json"
FORMAT = "item-embed-embeddings/1"
PART_ROWS = 10_000  # rows per part: what a crash can cost at most, per process


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def record_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:05d}.json"


def fingerprint(catalog: Catalog, encoder, batch_size: int, part_rows: int, world: int) -> dict[str, Any]:
    """What must match for a rerun to continue an unfinished output (else its parts would differ)."""
    c = catalog.columns
    return {"model_id": encoder.model_id, "precision": encoder.precision, "catalog": catalog.location,
            "catalog_version": catalog.version, "image_root": catalog.root_location,
            "columns": [c.id, c.title, c.image, c.description], "batch_size": batch_size, "part_rows": part_rows,
            "world_size": world}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def finished(folder: Path, fp: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a complete output made with exactly these settings."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("complete", True) and all(manifest.get(k) == v for k, v in fp.items())


def _clear(folder: Path) -> None:
    """Remove what an earlier run wrote here (only our own files: the folder may hold others)."""
    for f in folder.glob("part-*"):
        f.unlink()
    for f in folder.glob(".part-*"):
        f.unlink()
    for name in (MANIFEST, "report.json"):
        (folder / name).unlink(missing_ok=True)


def prepare_folder(folder: Path, fp: dict[str, Any], resume: bool) -> str:
    """Decide and set up: "fresh" (nothing to keep), "resume" (continue) or "done" (nothing left to do).

    An unfinished output made with other settings is refused rather than silently thrown away.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is None and resume:
        raise ValueError(f"--resume: {folder} holds no embedding run to continue")
    if manifest is not None:
        differs = {k: (manifest.get(k), v) for k, v in fp.items() if manifest.get(k) != v}
        if differs and (not manifest.get("complete", True) or resume):
            what = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differs.items())
            state = "a finished" if manifest.get("complete", True) else "an unfinished"
            raise ValueError(f"{folder} holds {state} embedding run made with other settings ({what}): rerun with "
                             "those settings to continue it, or choose another --out (or delete it)")
        if not manifest.get("complete", True):
            return "resume"
        if resume:
            return "done"
    _clear(folder)
    write_json_atomic(folder / MANIFEST, {"format": FORMAT, "complete": False, **fp})
    return "fresh"


def spans(n: int | None, world: int, part_rows: int) -> list[tuple[int, int | None, int]]:
    """Per process: (first row, end row or None for "to the end", index of its first part)."""
    if world == 1:
        return [(0, n, 0)]
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    out, first = [], 0
    for r in range(world):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        out.append((lo, hi, first))
        first += math.ceil((hi - lo) / part_rows)
    return out


def load_record(folder: Path, index: int) -> dict[str, Any] | None:
    """A part's commit record when the part is committed (record present, file matching it)."""
    path = record_path(folder, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    if record["file"] is not None:
        f = folder / record["file"]
        if not f.is_file() or sha256_file(f) != record["sha256"]:
            return None
    return record


def claimed_ids(folder: Path, record: dict[str, Any]) -> dict[str, int]:
    """id -> row of a committed part's products: its unreported rows, in order, are its products."""
    if record["file"] is None:
        return {}
    bad = {p["row"] for p in record["report"]["problems"]}
    rows = [r for r in range(record["row_start"], record["row_stop"]) if r not in bad]
    ids = pq.read_table(folder / record["file"], columns=["id"]).column("id").to_pylist()
    if len(ids) != len(rows):
        raise ValueError(f"{folder / record['file']}: {len(ids)} products where its record accounts for {len(rows)}")
    return dict(zip(ids, rows))


def add_report(total: CatalogReport, part: dict[str, Any]) -> None:
    """Add a committed part's share of the row report to ``total``."""
    total.rows_in += part["rows_in"]
    total.used += part["rows_used"]
    total.text_only += part["text_only"]
    total.image_only += part["image_only"]
    total.problems.extend(Problem(p["row"], p["id"], p["reason"], p.get("uri"), p.get("status"))
                          for p in part["problems"])


class PartWriter:
    """The open part: products go to a hidden file, committed with its record at the part's end."""

    def __init__(self, folder: Path, index: int, row_start: int, metadata: dict[bytes, bytes]) -> None:
        from .embeddings import ParquetStream

        self.folder, self.index, self.row_start = folder, index, row_start
        self.stream = ParquetStream(folder / part_name(index), metadata)
        self.text_only = self.image_only = 0

    def add(self, table: pa.Table, products: list) -> None:
        self.stream.write(table)
        self.text_only += sum(p.image is None for p in products)
        self.image_only += sum(p.text is None for p in products)

    def commit(self, row_stop: int, problems: list[Problem]) -> dict[str, Any]:
        """Every row of [row_start, row_stop) is a product here or one of ``problems``."""
        name = part_name(self.index)
        written = self.stream.commit()
        fault_point(f"after-part-file:{name}")
        entries = CatalogReport(problems=problems).to_dict()["problems"]
        record = {"part": self.index, "row_start": self.row_start, "row_stop": row_stop,
                  "count": self.stream.rows, "file": name if written else None,
                  "sha256": sha256_file(self.folder / name) if written else None,
                  "report": {"rows_in": row_stop - self.row_start, "rows_used": self.stream.rows,
                             "text_only": self.text_only, "image_only": self.image_only, "problems": entries}}
        if record["report"]["rows_in"] != self.stream.rows + len(problems):
            raise AssertionError(f"part {name}: rows {self.row_start}-{row_stop} are not all accounted for")
        write_json_atomic(record_path(self.folder, self.index), record)
        return record


def embed_share(catalog: Catalog, encoder, folder: Path, rank: int, world: int, batch_size: int, strict: bool,
                progress: bool, part_rows: int, metadata: dict[bytes, bytes]) -> tuple[CatalogReport, list[dict]]:
    """Embed this process's share of the rows into committed parts, after those already committed.

    Returns (the share's whole row report, its parts' records in order).
    """
    from .embeddings import embedding_table

    cfg = encoder.cfg
    n = catalog.known_len() if world == 1 else len(catalog)
    lo, hi, first = spans(n, world, part_rows)[rank]
    report = CatalogReport(source=catalog.source)
    seen = catalog.first_rows_by_id(lo) if lo > 0 else {}
    records: list[dict[str, Any]] = []
    start = lo
    while hi is None or start < hi:  # the committed prefix of this share
        record = load_record(folder, first + len(records))
        if record is None or record["row_start"] != start:
            break
        records.append(record)
        add_report(report, record["report"])
        seen.update(claimed_ids(folder, record))
        start = record["row_stop"]
        if record["row_stop"] - record["row_start"] < part_rows:
            hi = start  # the catalog's last part: nothing after it
    committed_problems = len(report.problems)
    writer: PartWriter | None = None

    def commit(row_stop: int) -> None:
        nonlocal committed_problems
        mine = [p for p in report.problems[committed_problems:] if p.row < row_stop]
        committed_problems += len(mine)
        records.append(writer.commit(row_stop, mine))

    with tqdm(total=None if hi is None else hi - lo, initial=start - lo, disable=not progress, desc="embed",
              dynamic_ncols=True) as bar:
        chunks = catalog.iter_rows_and_products(cfg.image_size, cfg.use_description, strict, report,
                                                chunk_size=batch_size * 4, rows=(start, hi), seen=seen)
        for chunk, chunk_products in chunks:
            bar.update(len(chunk))
            part_of = (chunk.index.to_numpy() - lo) // part_rows + first
            # A chunk may straddle a part boundary (shares of a torchrun job start anywhere): split it.
            for index in np.unique(part_of):
                rows = chunk.loc[chunk.index[part_of == index]]
                products = [p for p in chunk_products if rows.index[0] <= p.row <= rows.index[-1]]
                if writer is not None and writer.index != index:
                    commit(writer.row_start + part_rows)
                    writer = None
                if writer is None:
                    writer = PartWriter(folder, int(index), lo + (int(index) - first) * part_rows, metadata)
                if products:
                    vectors = encoder.encode_batched(products, batch_size)
                    writer.add(embedding_table(rows, products, catalog.extra_columns, vectors, encoder.dim),
                               products)
                last_row = int(rows.index[-1])
        if writer is not None:
            commit(last_row + 1)
    return report, records


def finish(folder: Path, fp: dict[str, Any], records: list[dict[str, Any]], report: CatalogReport) -> None:
    """Write the complete manifest (every part, in row order) and the whole row report."""
    records = sorted(records, key=lambda r: r["row_start"])
    parts = [{"file": r["file"], "row_range": [r["row_start"], r["row_stop"]], "count": r["count"],
              "rows": r["count"], "sha256": r["sha256"]} for r in records if r["file"] is not None]
    report.problems.sort(key=lambda p: p.row)
    report.write(folder / "report.json")
    write_json_atomic(folder / MANIFEST, {
        "format": FORMAT, "complete": True, **fp, "parts": parts,
        "rows_in": report.rows_in, "rows_used": report.used, "rows_reported": report.reported,
    })


def read_report(path: Path) -> CatalogReport:
    """A row report as written by ``CatalogReport.write`` (a complete output's)."""
    data = json.loads(path.read_text())
    report = CatalogReport(source=data["source"], rows_in=data["rows_in"], used=data["rows_used"],
                           text_only=data["text_only"], image_only=data["image_only"])
    report.problems = [Problem(p["row"], p["id"], p["reason"], p.get("uri"), p.get("status")) for p in data["problems"]]
    return report


def merge_into_file(folder: Path, out: Path, metadata: dict[bytes, bytes]) -> int:
    """Stream a complete folder's parts into one Parquet file (temp file, then renamed); returns rows."""
    from .embeddings import ParquetStream, part_files

    files = part_files(folder)
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="default")
    with ParquetStream(out, metadata) as stream:
        for f in files:
            with pq.ParquetFile(f) as pf:
                for batch in pf.iter_batches(batch_size=4096):
                    stream.write(pa.Table.from_batches([batch]).cast(schema.remove_metadata()))
        stream.commit()
    return stream.rows


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
