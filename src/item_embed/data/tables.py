"""Catalog files as tables: CSV/TSV, JSON(L) or Parquet, on local disk or at a URI (fsspec).

A :class:`FileTable` reads column names without the rows, streams Parquet and CSV/TSV in chunks
and reads JSON(L) whole. WebDataset shards are the other kind of table (``shards.ShardTable``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator
from urllib.parse import urlsplit

import pandas as pd

from . import remote

PARQUET = (".parquet", ".pq")
DELIMITED = (".csv", ".tsv")
JSON = (".jsonl", ".ndjson", ".json")


class CatalogError(ValueError):
    """A catalog that cannot be read at all, or a bad row under ``strict``."""


def suffix_of(location: str | Path) -> str:
    """The file suffix of a path or URI (a URI's query string does not count)."""
    text = str(location)
    if remote.is_uri(text):
        return PurePosixPath(urlsplit(text).path).suffix.lower()
    return Path(text).suffix.lower()


def _csv_options(suffix: str) -> dict[str, Any]:
    # Strings as-is ("NA" is a title, not a missing value); bytes that are not UTF-8 survive as
    # surrogates so that the row can be reported instead of the file failing (object dtype:
    # pandas' Arrow-backed strings refuse surrogates).
    return dict(sep="\t" if suffix == ".tsv" else ",", dtype=object, keep_default_na=False,
                na_values=[""], encoding="utf-8", encoding_errors="surrogateescape")


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
                    return [str(c) for c in pd.read_csv(f, nrows=0, **_csv_options(self.suffix)).columns]
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
            with self._open() as f:
                if self.suffix in PARQUET:
                    return pd.read_parquet(f, columns=columns)
                if self.suffix in DELIMITED:
                    return pd.read_csv(f, usecols=columns, **_csv_options(self.suffix))
                frame = pd.read_json(f, lines=self.suffix != ".json", dtype=False)
                return frame[columns] if columns is not None else frame
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise self._fail(e) from None

    def iter_frames(self, chunk_size: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """The rows of a Parquet or CSV/TSV file, ``chunk_size`` at a time, never the whole file at once."""
        try:
            with self._open() as f:
                if self.suffix in PARQUET:
                    import pyarrow.parquet as pq

                    # Buffered page reads without pre-buffering: pyarrow otherwise caches every column
                    # chunk it has read until the file is closed (measured: a 400 MB file held ~380 MB
                    # whether it had one row group or eight; with these options the peak stays flat).
                    with pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False) as pf:
                        for batch in pf.iter_batches(batch_size=chunk_size, columns=columns):
                            yield batch.to_pandas()
                elif self.suffix in DELIMITED:
                    with pd.read_csv(f, chunksize=chunk_size, usecols=columns,
                                     **_csv_options(self.suffix)) as reader:
                        yield from reader
                else:
                    frame = self.read(columns)
                    for lo in range(0, len(frame), chunk_size):
                        yield frame.iloc[lo: lo + chunk_size].reset_index(drop=True)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise self._fail(e) from None


def read_table(location: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a catalog file (path or URI) into a DataFrame by suffix; ``columns``: only those."""
    return FileTable(location).read(columns)
