"""WebDataset tar shards as a catalog: the layout img2dataset writes and open_clip reads.

Each sample is the members sharing a key: ``KEY.jpg`` (or .png, .webp ...) holds the photo,
``KEY.txt`` the title (img2dataset's caption), ``KEY.json`` the other fields (a ``title`` there wins
over the .txt; an ``id`` there is the product id, else the key is). Shards are given as one
location with brace patterns (``shard-{000000..000099}.tar``), local or at a URI, and read in order
through the ``webdataset`` library's tar iterator, one sample at a time.

A broken sample (bad JSON, a duplicated member, a member without an extension, a shard that cannot
be opened or ends mid-member) becomes a row carrying ``PROBLEM``, which the catalog reports like any
other bad row, so rows in = rows used + rows reported still holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from . import remote
from .tables import CatalogError

PROBLEM = "__problem__"  # set on a row the shard reader could not build; never a carried column
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def expand(spec: str) -> list[str]:
    """The shard locations of a spec: brace patterns expanded, ``::`` separating several specs."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(str(spec)))


def is_shard_spec(location: str | Path) -> bool:
    text = str(location).lower().split("?", 1)[0]
    return text.endswith(SHARD_SUFFIXES)


class ShardTable:
    """Rows from WebDataset shards; a row holds the id, title, image bytes and the JSON's fields."""

    def __init__(self, spec: str | Path, id_column: str = "id", title_column: str = "title",
                 image_column: str = "image") -> None:
        self.urls = expand(str(spec))
        if not self.urls:
            raise CatalogError(f"no shards in {spec!r}")
        self.source = remote.redact(str(spec))
        self.id, self.title, self.image = id_column, title_column, image_column
        for url in self.urls:
            if not remote.is_remote(url) and not Path(remote.local_path(url)).is_file():
                raise CatalogError(f"shard not found: {url}")
        self._columns: list[str] | None = None

    @property
    def default_root(self) -> Path:
        return Path.cwd()  # images are inside the shards

    def column_names(self) -> list[str]:
        """id, title, image, then the first sample's JSON fields (later samples are read into these)."""
        if self._columns is None:
            names = [self.id, self.title, self.image]
            for sample in self._samples():
                meta = sample.get("json")
                if meta is not None and PROBLEM not in sample:
                    try:
                        fields = json.loads(meta)
                    except ValueError:
                        continue
                    if isinstance(fields, dict):
                        names += [str(k) for k in fields if str(k) not in names]
                break
            self._columns = names
        return list(self._columns)

    def num_rows(self) -> int:
        """Counting means reading every shard (a tar has no index): expensive at a remote location."""
        return sum(1 for _ in self._samples())

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        frames = list(self.iter_frames(1 << 12, columns))
        if not frames:
            return pd.DataFrame(columns=columns or self.column_names())
        return pd.concat(frames, ignore_index=True)

    def iter_frames(self, chunk_size: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        names = self.column_names()
        keep = names if columns is None else [c for c in names if c in columns]
        rows: list[dict[str, Any]] = []
        for sample in self._samples():
            rows.append(self._row(sample, names, keep))
            if len(rows) == chunk_size:
                yield pd.DataFrame(rows, columns=[*keep, PROBLEM])
                rows = []
        if rows:
            yield pd.DataFrame(rows, columns=[*keep, PROBLEM])

    def _row(self, sample: dict[str, Any], names: list[str], keep: list[str]) -> dict[str, Any]:
        key = sample["__key__"]
        row: dict[str, Any] = {c: None for c in keep}
        row[PROBLEM] = sample.get(PROBLEM)
        fields: dict[str, Any] = {}
        if "json" in sample:
            try:
                fields = json.loads(sample["json"])
                if not isinstance(fields, dict):
                    raise ValueError(f"a JSON {type(fields).__name__}, not an object")
            except ValueError as e:
                row[PROBLEM] = row[PROBLEM] or f"bad member {key}.json: {e}"
                fields = {}
        for name in keep:
            if name in fields:
                value = fields[name]
                # Nested values travel as JSON text, so every carried column stays a plain column.
                row[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
        if self.id in keep and row.get(self.id) is None:
            row[self.id] = key
        if self.title in keep and fields.get(self.title) is None and "txt" in sample:
            row[self.title] = sample["txt"].decode("utf-8", errors="surrogateescape")
        if self.image in keep:
            exts = [self.image.lower(), *IMAGE_EXTENSIONS]
            row[self.image] = next((sample[e] for e in exts if e in sample), None)
        if row[PROBLEM]:
            row[PROBLEM] = f"{row[PROBLEM]} (shard {sample['__url__']}, key {key})"
        return row

    def _samples(self) -> Iterator[dict[str, Any]]:
        for url in self.urls:
            yield from _shard_samples(url)


def _open_shard(url: str):
    if remote.is_remote(url):
        fs, path = remote.filesystem(url)
        return fs.open(path, "rb", block_size=1 << 22)  # sequential reads in 4 MB ranges
    return open(remote.local_path(url), "rb")


def _shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order; a failure becomes one PROBLEM sample (never an exception)."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    shown = remote.redact(url)
    try:
        stream = _open_shard(url)
    except Exception as e:  # noqa: BLE001 - reported as a row: the other shards still count
        reason = "not found" if isinstance(e, FileNotFoundError) else type(e).__name__
        yield {"__key__": None, "__url__": shown, PROBLEM: f"shard unreadable: {reason}"}
        return
    current: dict[str, Any] | None = None
    tail = _Tail(stream)
    with stream:
        try:
            for member in tar_file_iterator(tail):
                key, ext = base_plus_ext(member["fname"])
                if key is None:
                    yield {"__key__": member["fname"], "__url__": shown,
                           PROBLEM: f"bad member {member['fname']!r}: no extension, so no sample key"}
                    continue
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": shown}
                if ext in current:
                    current[PROBLEM] = f"bad member: {key}.{ext} appears twice"
                else:
                    current[ext] = member["data"]
            # Python's tarfile ends quietly where a stream stops at a header: only the end-of-archive
            # blocks tell a whole shard from a cut one (compressed shards fail on their own).
            if url.lower().split("?", 1)[0].endswith(".tar") and not tail.ended_cleanly():
                raise EOFError("the shard ends before its end-of-archive blocks: truncated")
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt tar: what was read still counts
            reason = f"shard unreadable from here on ({type(e).__name__}: {str(e).split(' @ ')[0]})"
            if current is None:
                current = {"__key__": None, "__url__": shown}
            current[PROBLEM] = reason
    if current is not None:
        yield current


class _Tail:
    """A reader that remembers the last 1 KiB it handed out (a tar ends with two 512-byte zero blocks)."""

    def __init__(self, f) -> None:
        self.f, self.tail = f, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.tail = (self.tail + data)[-1024:]
        return data

    def ended_cleanly(self) -> bool:
        return len(self.tail) == 1024 and not self.tail.strip(b"\0")
