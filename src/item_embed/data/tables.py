"""Catalog files as tables: CSV/TSV, JSON(L) or Parquet, on local disk or at a URI (fsspec).

A :class:`FileTable` reads column names without the rows, streams Parquet and CSV/TSV in chunks
and reads JSON(L) whole. WebDataset shards are the other kind of table (``shards.ShardTable``).

Values arrive as the file holds them: integer columns never pass through float64 (a column with
nulls holds Python ints and None), CSV/TSV cells are text. A CSV/TSV line or a JSONL line that
cannot be a row (a field count that differs from the header's, a quote that is never closed, text
that is not JSON) is still a row, with the reason in its ``PROBLEM`` column, so that the catalog
reports it and goes on: rows in = rows used + rows reported holds, and row numbers stay aligned.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator
from urllib.parse import urlsplit

import pandas as pd

from . import remote

PARQUET = (".parquet", ".pq")
DELIMITED = (".csv", ".tsv")
JSON = (".jsonl", ".ndjson", ".json")
# Set on a row the reader could not build (the same marker as ``shards.PROBLEM``); never a column
# of the catalog itself.
PROBLEM = "__problem__"


class CatalogError(ValueError):
    """A catalog that cannot be read at all, or a bad row under ``strict``."""


def suffix_of(location: str | Path) -> str:
    """The file suffix of a path or URI (a URI's query string does not count)."""
    text = str(location)
    if remote.is_uri(text):
        return PurePosixPath(urlsplit(text).path).suffix.lower()
    return Path(text).suffix.lower()


def _arrow_to_pandas(data: Any) -> pd.DataFrame:
    """An Arrow table or batch as a DataFrame whose integer columns with nulls hold Python ints and
    None (pyarrow's default turns them into float64: 2**53 + 1 becomes 2**53)."""
    return data.to_pandas(integer_object_nulls=True)


def _text_stream(f: IO[bytes] | Path) -> IO[str]:
    """The catalog's text: UTF-8 (a BOM skipped), bytes that are not UTF-8 kept as surrogates so that
    their row can be reported; line ends untranslated, as the csv module needs."""
    if isinstance(f, Path):
        return open(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    return io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")


# --------------------------------------------------------------------------- CSV / TSV

# Handed out after a file's last line: a record still inside a quoted field swallows it, which is how
# a quote that is never closed shows (Python's csv module ends such a field quietly at the end).
_END = "\x00\ufdd0item-embed: end of file\x00"


class _Lines:
    """The physical lines of a text stream with their 1-based numbers; lines can be put back."""

    def __init__(self, text: IO[str]) -> None:
        self._text = text
        self._back: list[tuple[int, str]] = []  # put back, the next one last
        self._count = 0
        self._ended = False
        self.taken: list[tuple[int, str]] = []  # handed out since the last take()

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._back:
            item = self._back.pop()
        else:
            line = self._text.readline()
            if not line:
                if self._ended:
                    raise StopIteration
                self._ended, line = True, _END
            self._count += 1
            item = (self._count, line)
        self.taken.append(item)
        return item[1]

    def take(self) -> list[tuple[int, str]]:
        taken, self.taken = self.taken, []
        return taken

    def put_back(self, items: list[tuple[int, str]]) -> None:
        self._back.extend(reversed(items))


class _Delimited:
    """Records of a CSV/TSV text stream as (first line number, fields, problem or None).

    The dialect is pandas' default (``"`` quotes, doubled inside quotes, no escape character). A
    record whose field count differs from the header's, or that opens a quote never closed, or that
    the csv module refuses (a field over its size limit), is returned with its problem; when such a
    record ran over several lines, only its first line is taken as the bad row and reading starts
    again at the next line, so one stray quote costs one row, not the rest of the file. Blank lines
    are no rows.
    """

    def __init__(self, text: IO[str], suffix: str) -> None:
        self.kind = suffix.lstrip(".").upper()
        self._delimiter = "\t" if suffix == ".tsv" else ","
        self._lines = _Lines(text)
        self._reader = self._new_reader()
        self.width: int | None = None
        header = next(self._records(), None)
        if header is None:
            raise ValueError("the file is empty: no header line")
        _, fields, problem = header
        if problem is not None:
            raise ValueError(f"bad {self.kind} header: {problem}")
        self.names = _header_names(fields)
        self.width = len(self.names)

    def _new_reader(self) -> Any:
        return csv.reader(self._lines, delimiter=self._delimiter, quotechar='"', doublequote=True, strict=False)

    def _one_line(self, text: str) -> list[str]:
        """The fields of one physical line alone (the values kept on a bad row)."""
        try:
            return next(csv.reader([text.rstrip("\r\n")], delimiter=self._delimiter, strict=False), [])
        except csv.Error:
            return []

    def _records(self) -> Iterator[tuple[int, list[str], str | None]]:
        while True:
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except csv.Error as e:
                taken = self._lines.take()
                self._lines.put_back(taken[1:])
                self._reader = self._new_reader()
                hint = " (a quote that is never closed?)" if "field limit" in str(e) else ""
                yield taken[0][0], self._one_line(taken[0][1]), f"line {taken[0][0]}: {e}{hint}"
                continue
            taken = self._lines.take()
            first, last = taken[0][0], taken[-1][0]
            if taken[-1][1] is _END:
                if len(taken) == 1:
                    return  # the end of the file, outside any record
                self._lines.put_back(taken[1:])  # the sentinel too: the lines after are read again
                yield first, self._one_line(taken[0][1]), f"line {first} opens a quote that is never closed"
                continue
            if not fields:
                continue  # a blank line
            if self.width is not None and len(fields) != self.width:
                problem = f"line {first} has {_fields(len(fields))}, the header has {self.width}"
                if len(taken) > 1:  # a quoted field ran on: keep only the first line, read the rest again
                    problem += f" (the record runs on to line {last}: a quote that is never closed?)"
                    self._lines.put_back(taken[1:])
                    fields = self._one_line(taken[0][1])
                yield first, fields, problem
                continue
            yield first, fields, None

    def rows(self) -> Iterator[tuple[list[str | None], str | None]]:
        """Data rows as (values, one per header column: empty cells None; the problem or None)."""
        width = self.width
        for _, fields, problem in self._records():
            values: list[str | None] = [f if f != "" else None for f in fields[:width]]
            values += [None] * (width - len(values))
            yield values, None if problem is None else f"bad {self.kind} line: {problem}"


def _fields(n: int) -> str:
    return f"{n} field" if n == 1 else f"{n} fields"


def _header_names(fields: list[str]) -> list[str]:
    """Column names as pandas gives them: an empty name is ``Unnamed: i``, a repeated one ``name.1`` ..."""
    names: list[str] = []
    for i, field in enumerate(fields):
        base = field if field != "" else f"Unnamed: {i}"
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}.{k}"
        names.append(name)
    return names


def _frame(rows: list[list[Any]], problems: list[str | None], names: list[str]) -> pd.DataFrame:
    """A chunk of rows (object columns, as read); a ``PROBLEM`` column only when a row has one."""
    frame = pd.DataFrame(rows, columns=names, dtype=object)
    if any(p is not None for p in problems):
        frame[PROBLEM] = pd.Series(problems, dtype=object)
    return frame


# --------------------------------------------------------------------------- JSON / JSONL


def _json_rows(data: bytes, lines: bool) -> tuple[list[dict[str, Any]], list[str | None]]:
    """The records of a JSONL file (one object per line; a line that is not one is a row with its
    problem) or of a JSON array of objects; ints stay Python ints, of any size."""
    text = data.decode("utf-8", errors="surrogateescape")
    text = text.removeprefix("\ufeff")
    records: list[dict[str, Any]] = []
    problems: list[str | None] = []
    if lines:
        for number, line in enumerate(text.split("\n"), start=1):  # JSON text may hold U+2028 as it is
            line = line.rstrip("\r")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                records.append({})
                problems.append(f"bad JSON line: line {number}: {str(e).split(': line ')[0]}")
                continue
            ok = isinstance(value, dict)
            records.append(value if ok else {})
            problems.append(None if ok else f"bad JSON line: line {number} holds a JSON "
                                            f"{type(value).__name__}, not an object")
        return records, problems
    value = json.loads(text)
    if not isinstance(value, list):
        raise TypeError("not a JSON array of objects")
    for number, item in enumerate(value):
        ok = isinstance(item, dict)
        records.append(item if ok else {})
        problems.append(None if ok else f"bad JSON record: item {number} is a JSON {type(item).__name__}, "
                                        "not an object")
    return records, problems


def _json_frame(records: list[dict[str, Any]], problems: list[str | None]) -> pd.DataFrame:
    """Columns in order of first appearance; a column that holds integers keeps them exact (object
    dtype where it also holds nulls or other values, as pandas would make those floats)."""
    names = list(dict.fromkeys(k for r in records for k in r))
    columns: dict[str, pd.Series] = {}
    for name in names:
        values = [r.get(name) for r in records]
        ints = [isinstance(v, int) and not isinstance(v, bool) for v in values]
        if any(ints) and not (all(ints) and all(-(2**63) <= v < 2**63 for v in values)):
            columns[name] = pd.Series(values, dtype=object)
        else:
            columns[name] = pd.Series(values)
    frame = pd.DataFrame(columns, index=pd.RangeIndex(len(records)))
    if any(p is not None for p in problems):
        frame[PROBLEM] = pd.Series(problems, dtype=object)
    return frame


class FileTable:
    """One catalog file, local (``Path`` or ``file://``) or remote (``s3://``, ``https://`` ...)."""

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.uri = text if remote.is_remote(text) else None
        self.path = None if self.uri else Path(remote.local_path(text))
        self.source = remote.redact(text) if self.uri else str(self.path)
        self.suffix = suffix_of(text)
        if self.uri is not None:
            try:
                found = remote.exists(self.uri)
            except remote.MissingBackend:
                raise
            except Exception as e:  # the backend's own error (auth, DNS ...): its name, never its message
                raise CatalogError(f"cannot reach catalog {self.source}: {type(e).__name__}") from None
        else:
            found = self.path.is_file()
        if not found:
            raise CatalogError(f"catalog file not found: {self.source}")
        if self.suffix not in PARQUET + DELIMITED + JSON:
            raise CatalogError(f"unsupported catalog format {self.suffix!r} (use .csv, .tsv, .jsonl or .parquet)")

    @property
    def default_root(self) -> Path | str:
        """Where relative image paths start by default: the catalog's folder."""
        return remote.parent(self.uri) if self.uri else self.path.resolve().parent

    @contextmanager
    def _open(self) -> Iterator[IO[bytes] | Path]:
        if self.uri is None:
            yield self.path
            return
        with remote.open_binary(self.uri) as f:
            yield f

    def _fail(self, e: Exception) -> CatalogError:
        detail = type(e).__name__ if self.uri else e  # a remote backend's message may echo the URL
        return CatalogError(f"cannot read catalog {self.source}: {detail}")

    def column_names(self) -> list[str] | None:
        """Column names without reading the rows (Parquet schema, CSV header); None for JSON."""
        try:
            with self._open() as f:
                if self.suffix in PARQUET:
                    import pyarrow.parquet as pq

                    return list(pq.read_schema(f).names)
                if self.suffix in DELIMITED:
                    with _text_stream(f) as text:
                        return list(_Delimited(text, self.suffix).names)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise self._fail(e) from None
        return None

    def num_rows(self) -> int:
        if self.suffix in PARQUET:
            import pyarrow.parquet as pq

            with self._open() as f:
                return pq.ParquetFile(f).metadata.num_rows
        return sum(len(part) for part in self.iter_frames(1 << 16, columns=self.column_names()[:1]))

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        try:
            if self.suffix in PARQUET:
                import pyarrow.parquet as pq

                with self._open() as f:
                    return _arrow_to_pandas(pq.read_table(f, columns=columns))
            if self.suffix in DELIMITED:
                parts = list(self.iter_frames(1 << 16, columns))
                if not parts:
                    return pd.DataFrame(columns=self._kept(self.column_names(), columns), dtype=object)
                return pd.concat(parts, ignore_index=True)
            with self._open() as f:
                data = f.read_bytes() if isinstance(f, Path) else f.read()
            if self.suffix == ".json":
                try:
                    frame = _json_frame(*_json_rows(data, lines=False))
                except TypeError:  # a JSON object: one of pandas' other layouts
                    frame = pd.read_json(io.BytesIO(data), dtype=False)
            else:
                frame = _json_frame(*_json_rows(data, lines=True))
            if columns is None:
                return frame
            return frame[[c for c in frame.columns if c in columns or c == PROBLEM]]
        except CatalogError:
            raise
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise self._fail(e) from None

    @staticmethod
    def _kept(names: list[str], columns: list[str] | None) -> list[str]:
        if columns is None:
            return list(names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"no column(s) {', '.join(map(repr, missing))} in the file")
        return [c for c in names if c in columns]

    def iter_frames(self, chunk_size: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """The rows of a Parquet or CSV/TSV file, ``chunk_size`` at a time, never the whole file at once.

        A CSV/TSV chunk with a bad line has a ``PROBLEM`` column (see the module's docstring)."""
        try:
            with self._open() as f:
                if self.suffix in PARQUET:
                    import pyarrow.parquet as pq

                    # Buffered page reads without pre-buffering: pyarrow otherwise caches every column
                    # chunk it has read until the file is closed (measured: a 400 MB file held ~380 MB
                    # whether it had one row group or eight; with these options the peak stays flat).
                    with pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False) as pf:
                        for batch in pf.iter_batches(batch_size=chunk_size, columns=columns):
                            yield _arrow_to_pandas(batch)
                elif self.suffix in DELIMITED:
                    with _text_stream(f) as text:
                        reader = _Delimited(text, self.suffix)
                        names = self._kept(reader.names, columns)
                        where = [reader.names.index(c) for c in names]
                        rows: list[list[Any]] = []
                        problems: list[str | None] = []
                        for values, problem in reader.rows():
                            rows.append([values[i] for i in where])
                            problems.append(problem)
                            if len(rows) == chunk_size:
                                yield _frame(rows, problems, names)
                                rows, problems = [], []
                        if rows:
                            yield _frame(rows, problems, names)
                else:
                    frame = self.read(columns)
                    for lo in range(0, len(frame), chunk_size):
                        yield frame.iloc[lo: lo + chunk_size].reset_index(drop=True)
        except CatalogError:
            raise
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise self._fail(e) from None


def read_table(location: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a catalog file (path or URI) into a DataFrame by suffix; ``columns``: only those."""
    return FileTable(location).read(columns)
