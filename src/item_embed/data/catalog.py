"""Catalog input: CSV, JSONL or Parquet, one row per product, validated row by row.

Every row read is either used or reported with its reason: rows in = rows used + rows reported.
By default bad rows are skipped and listed in a report; ``strict=True`` makes the first fatal.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from .images import ImageError, ImageLimits, load_image_array


class CatalogError(ValueError):
    """A catalog that cannot be read at all, or a bad row under ``strict``."""


@dataclass
class Columns:
    """Which catalog columns hold what (map them when yours are named differently)."""

    id: str = "id"
    title: str = "title"
    image: str = "image"
    description: str = "description"


@dataclass
class Product:
    """One usable catalog row, ready for the tokenizer and the model."""

    row: int  # 0-based row number in the file
    id: str
    text: str | None  # title (+ description), None when the product has no usable title
    image: np.ndarray | None  # uint8 (S, S, 3), None when the product has no image
    title: str | None = None  # the title alone, where ``text`` also holds a description


@dataclass
class Problem:
    row: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        who = f"id {self.id!r}" if self.id is not None else "no id"
        return f"row {self.row} ({who}): {self.reason}"


@dataclass
class CatalogReport:
    """What happened to every row: used (with which modalities) or skipped and why."""

    source: str = ""
    rows_in: int = 0
    used: int = 0
    text_only: int = 0
    image_only: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def reported(self) -> int:
        return len(self.problems)

    def check_accounting(self) -> None:
        if self.rows_in != self.used + self.reported:
            raise AssertionError(
                f"row accounting broken: {self.rows_in} in != {self.used} used + {self.reported} reported"
            )

    def to_dict(self) -> dict[str, Any]:
        reasons = Counter(_reason_kind(p.reason) for p in self.problems)
        return {
            "source": self.source,
            "rows_in": self.rows_in,
            "rows_used": self.used,
            "rows_reported": self.reported,
            "text_only": self.text_only,
            "image_only": self.image_only,
            "reported_by_reason": dict(reasons.most_common()),
            "problems": [{"row": p.row, "id": p.id, "reason": p.reason} for p in self.problems],
        }

    def summary(self, max_lines: int = 10) -> str:
        lines = [
            f"catalog {self.source}: {self.rows_in} rows in, {self.used} used "
            f"({self.text_only} title only, {self.image_only} image only), {self.reported} reported"
        ]
        for p in self.problems[:max_lines]:
            lines.append(f"  skipped {p}")
        if self.reported > max_lines:
            lines.append(f"  ... and {self.reported - max_lines} more (see the report file)")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        return path


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary counts: the text before the first colon."""
    return reason.split(":", 1)[0]


_PARQUET = (".parquet", ".pq")
_DELIMITED = (".csv", ".tsv")
_JSON = (".jsonl", ".ndjson", ".json")


def _csv_options(path: Path) -> dict[str, Any]:
    # Strings as-is ("NA" is a title, not a missing value); bytes that are not UTF-8 survive as
    # surrogates so that the row can be reported instead of the file failing (object dtype:
    # pandas' Arrow-backed strings refuse surrogates).
    return dict(sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=object, keep_default_na=False,
                na_values=[""], encoding="utf-8", encoding_errors="surrogateescape")


def _check_format(path: Path) -> str:
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _PARQUET + _DELIMITED + _JSON:
        raise CatalogError(f"unsupported catalog format {suffix!r} (use .csv, .tsv, .jsonl or .parquet)")
    return suffix


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a catalog file into a DataFrame (CSV/TSV, JSONL, Parquet by suffix); ``columns``: only those."""
    path = Path(path)
    suffix = _check_format(path)
    try:
        if suffix in _PARQUET:
            return pd.read_parquet(path, columns=columns)
        if suffix in _DELIMITED:
            return pd.read_csv(path, usecols=columns, **_csv_options(path))
        frame = pd.read_json(path, lines=suffix != ".json", dtype=False)
        return frame[columns] if columns is not None else frame
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"cannot read catalog {path}: {e}") from None


def _read_column_names(path: Path) -> list[str] | None:
    """Column names without reading the rows (Parquet schema, CSV header); None for JSON."""
    suffix = _check_format(path)
    try:
        if suffix in _PARQUET:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix in _DELIMITED:
            return [str(c) for c in pd.read_csv(path, nrows=0, **_csv_options(path)).columns]
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"cannot read catalog {path}: {e}") from None
    return None


def _iter_file(path: Path, chunk_size: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The rows of a Parquet or CSV/TSV file, ``chunk_size`` at a time, never the whole file at once."""
    try:
        if path.suffix.lower() in _PARQUET:
            import pyarrow.parquet as pq

            # Buffered page reads without pre-buffering: pyarrow otherwise caches every column chunk
            # it has read until the file is closed (measured: a 400 MB file held ~380 MB whether it
            # had one row group or eight; with these options the peak stays flat).
            with pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False) as pf:
                for batch in pf.iter_batches(batch_size=chunk_size, columns=columns):
                    yield batch.to_pandas()
        else:
            with pd.read_csv(path, chunksize=chunk_size, usecols=columns, **_csv_options(path)) as reader:
                yield from reader
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"cannot read catalog {path}: {e}") from None


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NA


def _clean_text(value: Any, what: str) -> str | None:
    """A usable string, None when absent or blank; raises ValueError when not valid UTF-8."""
    if _is_missing(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not valid UTF-8") from None
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a CSV with non-UTF-8 bytes
        raise ValueError(f"{what} is not valid UTF-8") from None
    text = " ".join(text.split())
    return text or None


class Catalog:
    """A product catalog file with its column mapping; iterate it as validated products."""

    def __init__(
        self,
        frame: pd.DataFrame | None,
        columns: Columns | None = None,
        image_root: str | Path | None = None,
        source: str = "<frame>",
        *,
        path: str | Path | None = None,
        read_columns: list[str] | None = None,
    ) -> None:
        """A catalog over ``frame``, or (``frame=None``) over the file ``path``, read only when needed.

        Over a Parquet or CSV/TSV file, :meth:`iter_chunks` streams the rows chunk by chunk, so
        ``embed`` and ``prepare`` never hold the catalog; ``.frame`` reads it whole on first use.
        """
        self.columns = columns or Columns()
        self._frame = frame.reset_index(drop=True) if frame is not None else None
        self._path = Path(path) if path is not None else None
        self._read_columns = read_columns
        if self._frame is None and self._path is None:
            raise ValueError("Catalog needs a frame or a path")
        self._len: int | None = None
        self.image_root = Path(image_root) if image_root is not None else Path.cwd()
        self.source = source
        names = self.column_names
        cols = set(names)
        if self.columns.id not in cols:
            raise CatalogError(
                f"catalog {source} has no id column {self.columns.id!r} "
                f"(columns: {', '.join(map(str, names))}); map it with --id-column"
            )
        if self.columns.title not in cols and self.columns.image not in cols:
            raise CatalogError(
                f"catalog {source} has neither a title column {self.columns.title!r} nor an image "
                f"column {self.columns.image!r} (columns: {', '.join(map(str, names))})"
            )

    @classmethod
    def open(cls, path: str | Path, columns: Columns | None = None, image_root: str | Path | None = None,
             read_columns: Sequence[str] | None = None) -> "Catalog":
        """Open ``path``; relative image paths resolve against ``image_root`` or the file's folder.

        Parquet and CSV/TSV files are not read here, only their column names; JSON(L) is read whole.
        With ``read_columns`` only those of the file's columns are ever read (e.g. id and image).
        """
        path = Path(path)
        root = Path(image_root) if image_root is not None else path.resolve().parent
        names = _read_column_names(path)
        keep = None if read_columns is None else [c for c in dict.fromkeys(read_columns)
                                                  if names is None or c in names]
        if names is None:
            frame = read_table(path)
            return cls(frame if keep is None else frame[[c for c in keep if c in frame]], columns, root,
                       source=str(path))
        return cls(None, columns, root, source=str(path), path=path, read_columns=keep)

    @property
    def frame(self) -> pd.DataFrame:
        """Every row in memory (read on first use when the catalog was opened from a file)."""
        if self._frame is None:
            self._frame = read_table(self._path, columns=self._read_columns)
        return self._frame

    @property
    def column_names(self) -> list[str]:
        if self._frame is not None:
            return [c for c in self._frame.columns]
        names = _read_column_names(self._path)
        if names is None:
            return list(self.frame.columns)
        return names if self._read_columns is None else [c for c in names if c in self._read_columns]

    def __len__(self) -> int:
        if self._frame is not None:
            return len(self._frame)
        if self._len is None:
            if self._path.suffix.lower() in _PARQUET:
                import pyarrow.parquet as pq

                self._len = pq.ParquetFile(self._path).metadata.num_rows
            else:
                self._len = len(self._id_values())
        return self._len

    @property
    def extra_columns(self) -> list[str]:
        """Columns carried through untouched (everything but the image itself)."""
        return [c for c in self.column_names if c not in (self.columns.id, self.columns.image)]

    def _id_values(self) -> list[Any]:
        if self._frame is not None:
            return self._frame[self.columns.id].tolist()
        return read_table(self._path, columns=[self.columns.id])[self.columns.id].tolist()

    def iter_parts(self, start: int = 0, stop: int | None = None, chunk_size: int = 512) -> Iterator[pd.DataFrame]:
        """Rows ``[start, stop)`` as DataFrames of at most ``chunk_size`` rows, indexed by row number."""
        stop = len(self) if stop is None else stop
        if self._frame is not None:
            for lo in range(start, stop, chunk_size):
                yield self._frame.iloc[lo : min(lo + chunk_size, stop)]
            return
        offset = 0
        for part in _iter_file(self._path, chunk_size, self._read_columns):
            lo, hi = offset, offset + len(part)
            offset = hi
            if hi <= start:
                continue
            if lo >= stop:
                break
            part.index = pd.RangeIndex(lo, hi)
            yield part.loc[max(lo, start) : min(hi, stop) - 1]

    def iter_chunks(self, *args: Any, **kwargs: Any) -> Iterator[list[Product]]:
        """Yield validated products chunk by chunk; problems go to ``report`` (or raise if strict).

        Arguments as :meth:`iter_rows_and_products`.
        """
        for _, products in self.iter_rows_and_products(*args, **kwargs):
            yield products

    def iter_rows_and_products(
        self,
        image_size: int,
        use_description: bool = False,
        strict: bool = False,
        report: CatalogReport | None = None,
        chunk_size: int = 512,
        limits: ImageLimits | None = None,
        workers: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[pd.DataFrame, list[Product]]]:
        """Yield (the raw rows, indexed by row number; their validated products) chunk by chunk.

        Images decode in a thread pool: Pillow releases the GIL while decoding. ``shard=(rank,
        world)`` walks only that contiguous share of the rows (row numbers stay global); duplicate
        ids are then decided from the id column alone (the first row carrying an id claims it).
        """
        report = report if report is not None else CatalogReport()
        report.source = self.source
        seen: dict[str, int] = {}
        span = range(len(self))
        if shard is not None:
            rank, world = shard
            bounds = np.linspace(0, len(self), world + 1).round().astype(int)
            span = range(int(bounds[rank]), int(bounds[rank + 1]))
            seen = self._first_rows_by_id(span.start)
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for part in self.iter_parts(span.start, span.stop, chunk_size):
                records = part.to_dict("records")
                rows = part.index
                checked = list(
                    pool.map(lambda rr: self._check_row(rr[0], rr[1], image_size, use_description, limits),
                             zip(rows, records))
                )
                out: list[Product] = []
                for item in checked:
                    report.rows_in += 1
                    if isinstance(item, Product):
                        first = seen.get(item.id)
                        if first is not None:
                            item = Problem(item.row, item.id, f"duplicate id: first seen at row {first}")
                        else:
                            seen[item.id] = item.row
                    if isinstance(item, Problem):
                        if strict:
                            raise CatalogError(f"{self.source}: {item}")
                        report.problems.append(item)
                        continue
                    report.used += 1
                    report.text_only += item.image is None
                    report.image_only += item.text is None
                    out.append(item)
                yield part, out

    def _first_rows_by_id(self, before: int) -> dict[str, int]:
        """First row of every id among rows [0, before): what an earlier shard has claimed."""
        first: dict[str, int] = {}
        for row, raw in enumerate(self._id_values()[:before]):
            if isinstance(raw, float) and raw.is_integer():
                raw = int(raw)
            try:
                pid = _clean_text(raw, "id")
            except ValueError:
                continue
            if pid is not None:
                first.setdefault(pid, row)
        return first

    def load_all(self, image_size: int, **kwargs: Any) -> list[Product]:
        """Every usable product in memory (for training on catalogs that fit)."""
        return [p for chunk in self.iter_chunks(image_size, **kwargs) for p in chunk]

    def _check_row(
        self, row: int, rec: dict[str, Any], image_size: int, use_description: bool,
        limits: ImageLimits | None,
    ) -> Product | Problem:
        c = self.columns
        raw_id = rec.get(c.id)
        if isinstance(raw_id, float) and raw_id.is_integer():
            raw_id = int(raw_id)  # integer ids in a column that also has nulls arrive as floats
        try:
            pid = _clean_text(raw_id, "id")
        except ValueError as e:
            return Problem(row, None, str(e))
        if pid is None:
            return Problem(row, None, "missing id")
        try:
            title = _clean_text(rec.get(c.title), "title")
            desc = _clean_text(rec.get(c.description), "description") if use_description else None
        except ValueError as e:
            return Problem(row, pid, str(e))
        text = ". ".join(t for t in (title, desc) if t) or None
        image = None
        value = rec.get(c.image)
        if not _is_missing(value) and not (isinstance(value, str) and not value.strip()):
            try:
                image = load_image_array(value, image_size, self.image_root, limits)
            except ImageError as e:
                return Problem(row, pid, f"bad image: {e}")
        if image is None and text is None:
            return Problem(row, pid, "no usable image and no title")
        return Product(row, pid, text, image, title if desc and title else None)
