"""Catalog input: CSV, JSONL or Parquet (a local file or a URI), or WebDataset shards, one row per
product, validated row by row.

Every row read is either used or reported with its reason: rows in = rows used + rows reported.
By default bad rows are skipped and listed in a report; ``strict=True`` makes the first fatal.
Ids are kept exactly as the catalog spells them, or their row is refused (:mod:`.ids`); a CSV/TSV or
JSONL line that cannot be a row is a bad row too (:mod:`.tables`).
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from . import remote
from .ids import IdError, is_missing, product_id
from .images import ImageError, ImageLimits, load_image_array, resolve_location
from .remote import FetchError, FetchOptions, fetch_bytes
from .shards import PROBLEM, ShardTable, is_shard_spec
from .tables import CatalogError, FileTable, read_table

__all__ = ["Catalog", "CatalogError", "CatalogReport", "Columns", "Problem", "Product", "read_table"]

# Chunks decoded (and fetched) ahead of the one being consumed, so that the model's work on one
# chunk overlaps the reading of the next ones; memory stays bounded by these few chunks.
READAHEAD = 2


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
    uri: str | None = None  # a remote image that could not be fetched (redacted)
    status: int | str | None = None  # its HTTP status, or the error's kind

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
            "problems": [_problem_dict(p) for p in self.problems],
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


def _problem_dict(p: Problem) -> dict[str, Any]:
    entry = {"row": p.row, "id": p.id, "reason": p.reason}
    if p.uri is not None:
        entry.update(uri=p.uri, status=p.status)
    return entry


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary counts: the text before the first colon."""
    return reason.split(":", 1)[0]


def _clean_text(value: Any, what: str) -> str | None:
    """A usable string, None when absent or blank; raises ValueError when not valid UTF-8."""
    if is_missing(value):
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


def _image_root(root: str | Path | None) -> Path | str:
    """A local root as a Path, a remote one as its URI (pathlib would fold "s3://b" into "s3:/b")."""
    if root is None:
        return Path.cwd()
    root = remote.unmangle(root)
    if remote.is_remote(root):
        return str(root)
    return Path(remote.local_path(str(root)))


class Catalog:
    """A product catalog (a table in memory, a file or URI, or WebDataset shards) with its column
    mapping; iterate it as validated products."""

    def __init__(
        self,
        frame: pd.DataFrame | None,
        columns: Columns | None = None,
        image_root: str | Path | None = None,
        source: str = "<frame>",
        *,
        path: str | Path | None = None,
        read_columns: list[str] | None = None,
        table: FileTable | ShardTable | None = None,
        fetch: FetchOptions | None = None,
    ) -> None:
        """A catalog over ``frame``, or (``frame=None``) over ``table`` (or the file ``path``), read only
        when needed.

        Over Parquet, CSV/TSV or shards, :meth:`iter_chunks` streams the rows chunk by chunk, so
        ``embed`` and ``prepare`` never hold the catalog; ``.frame`` reads it whole on first use.
        ``fetch``: how remote images are fetched (bounded pool, timeouts, retries).
        """
        self.columns = columns or Columns()
        self._frame = frame.reset_index(drop=True) if frame is not None else None
        self._table = table if table is not None else (FileTable(path) if path is not None else None)
        self._read_columns = read_columns
        if self._frame is None and self._table is None:
            raise ValueError("Catalog needs a frame or a path")
        self._len: int | None = None
        self.image_root = _image_root(image_root)
        self.source = source
        self.fetch = fetch or FetchOptions()
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
             read_columns: Sequence[str] | None = None, fetch: FetchOptions | None = None) -> "Catalog":
        """Open ``path``: a file or URI (``s3://``, ``gs://``, ``https://``, ``file://``), or WebDataset
        shards (``.tar``, brace patterns such as ``shard-{000000..000099}.tar``).

        Relative image paths resolve against ``image_root`` (a folder or URI) or the file's folder.
        Parquet and CSV/TSV files are not read here, only their column names; JSON(L) is read whole.
        With ``read_columns`` only those of the file's columns are ever read (e.g. id and image).
        """
        columns = columns or Columns()
        if is_shard_spec(path):
            table: FileTable | ShardTable = ShardTable(path, columns.id, columns.title, columns.image)
        else:
            table = FileTable(path)
        root = image_root if image_root is not None else table.default_root
        names = table.column_names()
        keep = None if read_columns is None else [c for c in dict.fromkeys(read_columns)
                                                  if names is None or c in names]
        if names is None:
            frame = table.read()
            return cls(frame if keep is None else frame[[c for c in keep if c in frame]], columns, root,
                       source=table.source, fetch=fetch)
        return cls(None, columns, root, source=table.source, table=table, read_columns=keep, fetch=fetch)

    @property
    def frame(self) -> pd.DataFrame:
        """Every row in memory (read on first use when the catalog was opened from a file)."""
        if self._frame is None:
            self._frame = self._table.read(self._read_columns)
        return self._frame

    @property
    def location(self) -> str:
        """Where the catalog is, as outputs record it: an absolute path, or the (redacted) URI or shard pattern."""
        if isinstance(self._table, FileTable) and self._table.path is not None:
            return str(self._table.path.resolve())
        if self._table is None and self.source != "<frame>" and Path(self.source).exists():
            return str(Path(self.source).resolve())
        return self.source

    @property
    def root_location(self) -> str:
        """The image root as outputs record it: an absolute folder, or a URI."""
        root = self.image_root
        return root if isinstance(root, str) else str(Path(root).resolve())

    @property
    def version(self) -> str | None:
        """Size and modification time of a local catalog file (None elsewhere): a resumed output refuses a
        catalog edited since the run began."""
        if isinstance(self._table, FileTable) and self._table.path is not None:
            st = self._table.path.stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        return None

    @property
    def column_names(self) -> list[str]:
        if self._frame is not None:
            return [c for c in self._frame.columns if c != PROBLEM]
        names = self._table.column_names()
        if names is None:
            return [c for c in self.frame.columns if c != PROBLEM]
        return names if self._read_columns is None else [c for c in names if c in self._read_columns]

    def __len__(self) -> int:
        """The number of rows (for shards this reads every shard once: see :meth:`known_len`)."""
        if self._frame is not None:
            return len(self._frame)
        if self._len is None:
            self._len = self._table.num_rows()
        return self._len

    def known_len(self) -> int | None:
        """The number of rows where it costs little to know (not for shards: a tar has no index)."""
        if self._frame is None and isinstance(self._table, ShardTable) and self._len is None:
            return None
        return len(self)

    @property
    def extra_columns(self) -> list[str]:
        """Columns carried through untouched (everything but the image itself)."""
        return [c for c in self.column_names if c not in (self.columns.id, self.columns.image)]

    def _id_values(self) -> Iterator[tuple[Any, Any]]:
        """(id cell, the reader's problem or None) of every row, in order."""
        parts = [self._frame] if self._frame is not None else self._table.iter_frames(1 << 16, [self.columns.id])
        for part in parts:
            problems = part[PROBLEM] if PROBLEM in part else [None] * len(part)
            yield from zip(part[self.columns.id], problems)

    def iter_parts(self, start: int = 0, stop: int | None = None, chunk_size: int = 512) -> Iterator[pd.DataFrame]:
        """Rows ``[start, stop)`` (``stop`` None: to the end) as DataFrames of at most ``chunk_size`` rows,
        indexed by row number."""
        if self._frame is not None:
            stop = len(self._frame) if stop is None else stop
            for lo in range(start, stop, chunk_size):
                yield self._frame.iloc[lo : min(lo + chunk_size, stop)]
            return
        offset = 0
        for part in self._table.iter_frames(chunk_size, self._read_columns):
            lo, hi = offset, offset + len(part)
            offset = hi
            if hi <= start:
                continue
            if stop is not None and lo >= stop:
                break
            part.index = pd.RangeIndex(lo, hi)
            yield part.loc[max(lo, start) : (hi if stop is None else min(hi, stop)) - 1]

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
        rows: tuple[int, int | None] | None = None,
        seen: dict[str, int] | None = None,
    ) -> Iterator[tuple[pd.DataFrame, list[Product]]]:
        """Yield (the raw rows, indexed by row number; their validated products) chunk by chunk.

        Images decode in a thread pool (Pillow releases the GIL while decoding); remote images are
        first fetched in a pool of ``self.fetch.workers`` threads, and a few chunks are in flight ahead
        of the one yielded, so neither a slow host nor decoding holds up the caller's work.
        ``shard=(rank, world)`` walks only that contiguous share of the rows (row numbers stay global);
        duplicate ids are then decided from the id column alone (the first row carrying an id claims
        it). ``rows=(start, stop)`` walks those rows (``stop`` None: to the end), with ``seen`` (id ->
        first row) holding the ids that earlier rows have claimed.
        """
        report = report if report is not None else CatalogReport()
        report.source = self.source
        seen = dict(seen) if seen is not None else {}
        span: tuple[int, int | None] = rows if rows is not None else (0, None)
        if shard is not None:
            rank, world = shard
            bounds = np.linspace(0, len(self), world + 1).round().astype(int)
            span = (int(bounds[rank]), int(bounds[rank + 1]))
            seen = self.first_rows_by_id(span[0])
        limits = limits or ImageLimits()
        decode = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
        fetch: list[ThreadPoolExecutor] = []  # started on the first remote image
        pending: deque[tuple[pd.DataFrame, list[Future]]] = deque()
        try:
            for part in self.iter_parts(span[0], span[1], chunk_size):
                jobs = [self.submit_row(row, rec, image_size, use_description, limits, decode, fetch)
                        for row, rec in zip(part.index, part.to_dict("records"))]
                pending.append((part, jobs))
                if len(pending) > READAHEAD:
                    yield self._collect(*pending.popleft(), seen, report, strict)
            while pending:
                yield self._collect(*pending.popleft(), seen, report, strict)
        finally:
            for pool in (decode, *fetch):
                pool.shutdown(wait=False, cancel_futures=True)

    def submit_row(self, row: int, rec: dict[str, Any], image_size: int, use_description: bool,
                    limits: ImageLimits, decode: ThreadPoolExecutor, fetch: list[ThreadPoolExecutor]) -> Future:
        """The future of a row's check: decoded in ``decode``, after a fetch in the I/O pool if remote."""
        uri = self._remote_image(rec.get(self.columns.image))
        if uri is None:
            return decode.submit(self._check_row, row, rec, image_size, use_description, limits)
        if not fetch:
            fetch.append(ThreadPoolExecutor(max_workers=max(1, self.fetch.workers), thread_name_prefix="fetch"))
        fetched = fetch[0].submit(fetch_bytes, uri, limits.max_bytes, self.fetch)

        def check(done: Future) -> Product | Problem:
            error = done.exception()
            value = error if error is not None else done.result()
            return self._check_row(row, {**rec, self.columns.image: value}, image_size, use_description, limits)

        return _then(fetched, check, decode)

    def _remote_image(self, value: Any) -> str | None:
        """The URI to fetch for an image value, or None (bytes, local files, and bad paths, which the
        row check reports)."""
        if not isinstance(value, str) or not value.strip():
            return None
        if not remote.is_remote(value) and not isinstance(self.image_root, str):
            return None  # the common local case, without resolving the path twice
        try:
            location = resolve_location(value, self.image_root)
        except ImageError:
            return None
        return location if isinstance(location, str) else None

    def _collect(self, part: pd.DataFrame, jobs: list[Future], seen: dict[str, int], report: CatalogReport,
                 strict: bool) -> tuple[pd.DataFrame, list[Product]]:
        """The chunk's products in row order, its problems reported (duplicates decided here, in order)."""
        out: list[Product] = []
        for job in jobs:
            item = job.result()
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
        return part, out

    def first_rows_by_id(self, before: int) -> dict[str, int]:
        """First row of every id among rows [0, before): what an earlier shard has claimed."""
        first: dict[str, int] = {}
        for row, (raw, problem) in enumerate(self._id_values()):
            if row >= before:
                break
            if not is_missing(problem):  # a row the reader could not build claims nothing
                continue
            try:
                pid = product_id(raw)
            except IdError:
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
        try:
            pid = product_id(rec.get(c.id))  # exact, or refused: see ids.py
        except IdError as e:
            if not is_missing(rec.get(PROBLEM)):
                return Problem(row, None, str(rec[PROBLEM]))
            return Problem(row, e.shown, str(e))
        if not is_missing(rec.get(PROBLEM)):  # a row the reader could not build (bad CSV line, shard sample)
            return Problem(row, pid, str(rec[PROBLEM]))
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
        if isinstance(value, FetchError):
            return Problem(row, pid, f"image fetch failed: {value}", uri=value.uri, status=value.status)
        if not is_missing(value) and not (isinstance(value, str) and not value.strip()):
            try:
                image = load_image_array(value, image_size, self.image_root, limits, self.fetch)
            except FetchError as e:
                return Problem(row, pid, f"image fetch failed: {e}", uri=e.uri, status=e.status)
            except ImageError as e:
                return Problem(row, pid, f"bad image: {e}")
        if image is None and text is None:
            return Problem(row, pid, "no usable image and no title")
        return Product(row, pid, text, image, title if desc and title else None)


def _then(first: Future, fn: Any, pool: ThreadPoolExecutor) -> Future:
    """A future of ``fn(first)`` run in ``pool`` once ``first`` is done, without a thread waiting for it."""
    out: Future = Future()

    def settle(inner: Future) -> None:
        if inner.cancelled():
            out.cancel()
        elif inner.exception() is not None:
            out.set_exception(inner.exception())
        else:
            out.set_result(inner.result())

    def start(done: Future) -> None:
        try:
            pool.submit(fn, done).add_done_callback(settle)
        except RuntimeError as e:  # the pool has shut down: the caller stopped reading
            out.set_exception(e)

    first.add_done_callback(start)
    return out
