"""Milvus as the search backend past one box: a product index in a Milvus collection.

``MilvusIndex`` does what ``ProductIndex`` does (build, open, search with filters, add, remove)
with the vectors, ids and carried metadata in a Milvus collection instead of a folder. One
pymilvus code path for both kinds of deployment:

    uri ./products.db           Milvus Lite, embedded in this process (a local folder; no server)
    uri http://HOST:19530       a Milvus server or cluster (token from MILVUS_TOKEN, or user:pass@ in the URI)

A collection holds

    id          VARCHAR primary key: the product id, exactly (at most ID_MAX_BYTES bytes of UTF-8)
    vector      FLOAT_VECTOR(dim): the L2-normalised embedding, searched by inner product (= cosine,
                what the FAISS index does) through a FLAT, HNSW or IVF_FLAT index (``kind``)
    <column>    one nullable scalar field per carried metadata column: VARCHAR, INT64, DOUBLE or BOOL

and its manifest (model id, config hash, dimension, kind and options, recall@10, catalog, column to
field map, build time) as JSON in the collection property ``item_embed.manifest``. An index is
opened only by the model that built it (``expected_model_id``), as a FAISS index folder is.

``--collection NAME`` is a Milvus alias: each build fills a new collection ``NAME__<time>_<hex>``
and then points the alias at it (the previous one is dropped), so a rebuild never leaves searches
without a collection. An open index searches the collection it checked; when a rebuild has dropped
it, the next search follows the alias again, once the new collection is checked to be of the same
model (another model's collection is refused, never searched).

pymilvus (``pip install 'item-embed[milvus]'``) is imported only here, and only when used.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from ..data.remote import redact
from .filters import BOOL, FLOAT, INT, OTHER, STRING, Filter, FilterError, column_kind, parse_filter
from .product_index import (RECALL_K, RECALL_QUERIES, Hit, IndexLoadError, IndexReport, IndexSpec, ManifestFacts,
                            ProductIndex, id_list, indexable_rows, listed_names, normalised_rows, resolve_ivf)

logger = logging.getLogger(__name__)

FORMAT = "item-embed-milvus"
FORMAT_VERSION = 1
MANIFEST_PROPERTY = "item_embed.manifest"
ID_FIELD = "id"
VECTOR_FIELD = "vector"
ID_MAX_BYTES = 512
VARCHAR_MAX_BYTES = 65_535  # Milvus's largest VARCHAR
METRIC = "IP"
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
DEFAULT_KIND = "hnsw"
INSERT_BYTES = 8_000_000  # vectors per insert call: about this many bytes (gRPC messages stay small)
QUERY_BATCH = 256  # query vectors per search call
GET_BATCH = 1000  # ids per get / delete call
MAX_TOPK = 16_384  # Milvus's largest limit
MAX_EF = 4096  # filtered HNSW search: the widest beam asked for (Milvus allows 32768)
FILTER_WIDEN = 3.0  # filtered ANN search: beam / lists visited, times 1 / (share of products passing)
INDEX_WAIT_S = 1800  # a server builds the ANN index after the inserts: wait at most this long
NOT_FOUND_CODES = (100,)  # Milvus: collection not found

_MILVUS_TYPES = {STRING: "VARCHAR", INT: "INT64", FLOAT: "DOUBLE", BOOL: "BOOL"}
_KIND_OF_TYPE = {v: k for k, v in _MILVUS_TYPES.items()}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Words of Milvus's expression language: a field so named could not be filtered on.
_RESERVED = {"id", "vector", "and", "or", "not", "in", "like", "true", "false", "is", "null", "exists",
             "json_contains", "array_contains", "text_match", "meta"}
MAX_COLLECTION_NAME = 200  # Milvus allows 255; the build adds a suffix


class MilvusBackendError(IndexLoadError):
    """The Milvus backend cannot do what was asked: pymilvus missing, server unreachable, a call refused."""


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MilvusBackendError("the Milvus backend needs pymilvus (with Milvus Lite for local .db files): "
                                 "pip install 'item-embed[milvus]'") from None
    return pymilvus


def _is_lite(uri: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri) and not uri.startswith("unix:")


def shown_uri(uri: str) -> str:
    """The URI without credentials: what messages and manifests show."""
    return redact(uri)


@contextmanager
def _milvus_errors(what: str) -> Iterator[None]:
    """pymilvus / gRPC exceptions raised inside become one-line MilvusBackendErrors."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        if type(e).__module__.split(".")[0] in ("pymilvus", "grpc", "milvus_lite"):
            raise MilvusBackendError(f"Milvus {what} failed: {_error_text(e)}") from None
        raise


def connect(uri: str, token: str | None = None, *, create: bool = False):
    """A ``pymilvus.MilvusClient`` for ``uri``: a Milvus Lite file (``*.db``) or ``http(s)://HOST:PORT``.

    create: a missing Lite database (and its folder) may be created (building); otherwise a missing
    one is an IndexLoadError rather than a new empty database.
    """
    if not uri:
        raise ValueError("--uri is empty: give a Milvus Lite file (./products.db) or a server (http://HOST:19530)")
    if _is_lite(uri):
        if not uri.endswith(".db"):
            raise ValueError(f"--uri {uri!r}: a Milvus Lite database is a path ending in .db (./products.db); "
                             "a server is http://HOST:19530 or https://...")
        path = Path(uri)
        if not path.exists():
            if not create:
                raise IndexLoadError(f"no Milvus Lite database at {uri}: build one with `item-embed index EMB "
                                     f"--backend milvus --uri {uri} --collection NAME`")
            path.parent.mkdir(parents=True, exist_ok=True)
    pymilvus = _pymilvus()
    try:
        return pymilvus.MilvusClient(uri=uri, token=token or "")
    except Exception as e:  # noqa: BLE001 - every failure to connect reads the same to the user
        reason = getattr(e, "message", None) or str(e)
        if _is_lite(uri):
            raise MilvusBackendError(
                f"cannot open the Milvus Lite database {uri} ({reason}): is another process using it? Milvus Lite "
                "allows one process per database; to share it, run `milvus-lite server --data-dir "
                f"{uri}` and use --uri http://127.0.0.1:19530") from None
        raise MilvusBackendError(f"cannot connect to Milvus at {shown_uri(uri)}: {reason}") from None


def _lite_engine_collection(uri: str, physical: str):
    """Milvus Lite runs inside this process: its engine's collection object, for the one thing the Milvus
    API does not tell (when background index builds are done). None for a server, or another Lite."""
    if not _is_lite(uri):
        return None
    try:
        import os

        from milvus_lite.server_manager import server_manager_instance

        entry = server_manager_instance._servers.get(os.path.abspath(uri))
        col = entry[1].get_collection(physical) if entry else None
        return col if callable(getattr(col, "_wait_for_bg", None)) else None
    except Exception:  # noqa: BLE001 - an engine without these internals: no wait
        return None


def _check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_COLLECTION_NAME or "__" in name:
        raise ValueError(f"--collection {name!r}: a Milvus collection name is letters, digits and single "
                         f"underscores, starting with a letter or underscore, at most {MAX_COLLECTION_NAME} "
                         "characters")
    return name


def _error_text(e: BaseException) -> str:
    return getattr(e, "message", None) or str(e)


def _not_found(e: BaseException) -> bool:
    code = getattr(e, "code", None)
    text = _error_text(e).lower()
    return code in NOT_FOUND_CODES or ("collection" in text and ("not exist" in text or "not found" in text))


def _target(client, name: str) -> str | None:
    """The collection ``name`` stands for: an alias's collection, the collection itself, or None."""
    listed = client.list_aliases()
    aliases = (listed.get("aliases") if isinstance(listed, Mapping) else listed) or []
    if name in aliases:
        return client.describe_alias(name)["collection_name"]
    if client.has_collection(name):
        return name
    return None


def _read_manifest(client, physical: str, name: str) -> dict:
    """The item-embed manifest of ``physical``; IndexLoadError when it has none or an unusable one."""
    info = client.describe_collection(physical)
    text = (info.get("properties") or {}).get(MANIFEST_PROPERTY)
    if text is None:
        raise IndexLoadError(f"Milvus collection {name!r} is not an item-embed index (no {MANIFEST_PROPERTY} "
                             "property): choose another --collection, or drop it")
    try:
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        version, dim = manifest["format_version"], int(manifest["dim"])
        str(manifest["model_id"])
        IndexSpec.parse(manifest["kind"], **manifest["options"])
        columns = [_Column(**c) for c in manifest["columns"]]
    except (ValueError, KeyError, TypeError) as e:
        raise IndexLoadError(f"the manifest of Milvus collection {name!r} is corrupted ({e}): rebuild it with "
                             "`item-embed index --backend milvus`") from None
    if version != FORMAT_VERSION:
        raise IndexLoadError(f"Milvus collection {name!r} has index format {version}, this version reads "
                             f"{FORMAT_VERSION}: rebuild it")
    fields = {f["name"]: f for f in info.get("fields", [])}
    vector = fields.get(VECTOR_FIELD)
    held = (vector or {}).get("params", {}).get("dim")
    problems = []
    if held is None or int(held) != dim:
        problems.append(f"vector field of dimension {held}, manifest {dim}")
    if ID_FIELD not in fields:
        problems.append(f"no {ID_FIELD!r} field")
    missing = [c.field for c in columns if c.field not in fields]
    if missing:
        problems.append(f"fields {', '.join(missing)} of the manifest are missing")
    if problems:
        raise IndexLoadError(f"Milvus collection {name!r} does not match its manifest ({'; '.join(problems)}): "
                             "rebuild it with `item-embed index --backend milvus`")
    return manifest


def _refuse_model(name: str, model_id: str, expected: str | None) -> None:
    if expected is not None and model_id != expected:
        raise IndexLoadError(f"Milvus collection {name!r} was built by model {model_id}, this model is {expected}: "
                             "rebuild it with `item-embed index --backend milvus`")


# --------------------------------------------------------------------------------------------
# Metadata columns as scalar fields
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    column: str  # the metadata column
    field: str  # its Milvus field
    type: str  # VARCHAR, INT64, DOUBLE, BOOL
    convert: str = ""  # "": as is; "text": written as text (dates as ISO 8601, lists/dicts as JSON)

    @property
    def kind(self) -> str:
        return STRING if self.convert else _KIND_OF_TYPE[self.type]


def _field_names(columns: Sequence[str]) -> dict[str, str]:
    """Column -> Milvus field name: the column itself where Milvus accepts it, else a made-up one."""
    out: dict[str, str] = {}
    taken = {ID_FIELD, VECTOR_FIELD}
    for i, col in enumerate(columns):
        name = col if _NAME.match(col) and len(col) <= 255 and col.lower() not in _RESERVED else ""
        if not name or name in taken:
            stem = re.sub(r"[^A-Za-z0-9_]", "_", col)[:40].strip("_") or "column"
            name = f"c{i}_{stem}"
            while name in taken:
                name += "_"
        taken.add(name)
        out[col] = name
    return out


def _plan_columns(frame: pd.DataFrame) -> tuple[list[_Column], list[str]]:
    """Scalar fields for the metadata columns, and notes on what was converted or left out."""
    names = [str(c) for c in frame.columns]
    if len(set(names)) != len(names):
        raise ValueError(f"metadata has repeated column names: {listed_names(pd.Index(names)[pd.Index(names).duplicated()])}")
    fields = _field_names(names)
    columns, notes = [], []
    for name, col in zip(names, frame.columns):
        values = frame[col]
        kind = column_kind(values)
        convert = ""
        if kind == OTHER:
            present = values.dropna()
            if len(present) and all(isinstance(v, (bytes, bytearray, memoryview)) for v in present.tolist()):
                notes.append(f"column {name!r} holds binary values: not carried to Milvus")
                continue
            convert = "text"
            how = ("ISO 8601 text" if pd.api.types.is_datetime64_any_dtype(values.dtype)
                   else "text (lists and records as JSON)")
            notes.append(f"column {name!r} ({values.dtype}) is stored in Milvus as {how}")
        elif kind == INT and pd.api.types.is_unsigned_integer_dtype(values.dtype) and len(values.dropna()) \
                and int(values.dropna().max()) > 2**63 - 1:
            raise ValueError(f"column {name!r} holds integers beyond 2**63-1, which Milvus INT64 cannot hold")
        columns.append(_Column(column=name, field=fields[name],
                               type="VARCHAR" if convert else _MILVUS_TYPES[kind], convert=convert))
    return columns, notes


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    try:
        return isinstance(v, (float, np.floating)) and math.isnan(v)
    except TypeError:
        return False


def _as_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (pd.Timestamp, datetime)):
        return v.isoformat()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def _cell(c: _Column, v: Any, pid: str) -> Any:
    """A metadata cell as the field's Python value (None when missing); ValueError when it does not fit."""
    if not isinstance(v, (list, tuple, dict, np.ndarray)) and _missing(v):
        return None
    try:
        if c.type == "VARCHAR":
            text = _as_text(v) if c.convert or not isinstance(v, str) else v
            if len(text.encode("utf-8")) > VARCHAR_MAX_BYTES:
                raise ValueError(f"{len(text.encode('utf-8'))} bytes, over Milvus's {VARCHAR_MAX_BYTES}-byte "
                                 "text limit")
            return text
        if c.type == "INT64":
            if isinstance(v, (bool, np.bool_)) or (isinstance(v, (float, np.floating)) and not float(v).is_integer()):
                raise ValueError(f"{v!r} is not a whole number")
            return int(v)
        if c.type == "DOUBLE":
            if isinstance(v, (bool, np.bool_, str)):
                raise ValueError(f"{v!r} is not a number")
            return float(v)
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{v!r} is not true/false")
        return bool(v)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"product {pid!r}, column {c.column!r} ({c.type} field): {e}") from None


def _rows(ids: Sequence[str], x: np.ndarray, frame: pd.DataFrame, columns: Sequence[_Column]) -> Iterator[dict]:
    cells = {c.field: (frame[c.column].tolist() if c.column in frame.columns else [None] * len(ids)) for c in columns}
    for i, pid in enumerate(ids):
        row = {ID_FIELD: pid, VECTOR_FIELD: x[i]}
        for c in columns:
            row[c.field] = _cell(c, cells[c.field][i], pid)
        yield row


def _check_ids(ids: Sequence[str]) -> None:
    long = [i for i in ids if len(i.encode("utf-8")) > ID_MAX_BYTES]
    if long:
        raise ValueError(f"{len(long)} product id(s) longer than {ID_MAX_BYTES} bytes, the most a Milvus index keeps: "
                         f"{listed_names([i[:60] + '...' for i in long], 3)}")


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


@dataclass
class MilvusHit(Hit):
    """A search result from Milvus: ``row`` is -1 (there is no local row); ``metadata`` holds the
    product's carried columns (column -> value, None where missing)."""

    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MilvusSource:
    """Where a Milvus index lives: what a service reloads from (``load_index``)."""

    uri: str
    collection: str
    token: str | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"Milvus collection {self.collection!r} at {shown_uri(self.uri)}"


def load_index(source, expected_model_id: str | None = None):
    """A FAISS index folder (a path) or a Milvus collection (``MilvusSource``), refused when built by
    another model than ``expected_model_id``."""
    if isinstance(source, MilvusSource):
        return MilvusIndex.open(source.uri, source.collection, expected_model_id, token=source.token)
    return ProductIndex.load(source, expected_model_id=expected_model_id)


class MilvusIndex(ManifestFacts):
    """A product index in a Milvus collection, with ``ProductIndex``'s interface where it makes sense:
    ``search`` (with ``exclude`` and ``filter``), ``search_id``, ``vector``, ``add``, ``remove``,
    ``len``, ``in``, ``model_id``, ``dim``, ``kind``, ``manifest``. Hits are ``MilvusHit`` with their
    metadata. Safe across threads (pymilvus clients are)."""

    backend = "milvus"

    def __init__(self, client, uri: str, name: str, physical: str, manifest: dict) -> None:
        self._client = client
        self.uri = uri
        self.name = name
        self._physical = physical
        self._manifest = manifest
        self._switch_lock = threading.Lock()
        self._set_columns(manifest)

    def _set_columns(self, manifest: dict) -> None:
        self._columns = [_Column(**c) for c in manifest["columns"]]
        self._by_field = {c.field: c for c in self._columns}
        self._spec = IndexSpec(kind=manifest["kind"], **manifest["options"])

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Iterable, metadata: pd.DataFrame | None, model_id: str,
              config_hash: str, *, uri: str, collection: str, kind: str = DEFAULT_KIND, token: str | None = None,
              catalog: str | None = None, image_root: str | None = None, notes: list[str] | None = None,
              check_recall: bool = True, **options) -> "MilvusIndex":
        """Load ``embeddings`` (n, d) of products ``ids`` with their ``metadata`` into a new collection and
        point the alias ``collection`` at it (replacing an item-embed index of that name).

        kind: flat (exact), hnsw or ivf, with ``ProductIndex``'s options (m, ef_construction, ef_search;
        nlist, nprobe). Approximate kinds record their recall@10 against exact search in the manifest.
        notes: receives what was converted or left out of the metadata. check_recall: False skips the
        recall@10 measurement (up to 1000 searches) of approximate kinds.
        """
        t0 = time.perf_counter()
        _check_collection_name(collection)
        ids = id_list(ids)
        _check_ids(ids)
        x = normalised_rows(embeddings)
        if len(x) != len(ids):
            raise ValueError(f"{len(x)} embeddings but {len(ids)} ids")
        if len(x) == 0:
            raise ValueError("no products to index")
        frame = ProductIndex.aligned_metadata(metadata, len(ids)).rename(columns=str)
        spec = resolve_ivf(IndexSpec.parse(kind, **options), len(x))
        columns, column_notes = _plan_columns(frame)
        if notes is not None:
            notes.extend(column_notes)
        client = connect(uri, token, create=True)
        with _milvus_errors(f"reading collection {collection!r}"):
            previous = _target(client, collection)
            if previous is not None:
                _read_manifest(client, previous, collection)  # only an item-embed index is ever replaced
        physical = f"{collection}__{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')}_{secrets.token_hex(3)}"
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_id": str(model_id),
            "config_hash": str(config_hash), "dim": int(x.shape[1]), "kind": spec.kind, "options": spec.options(),
            "index_type": INDEX_TYPES[spec.kind], "metric": METRIC, "recall_at_10": None,
            "catalog": catalog, "image_root": image_root, "columns": [c.__dict__ for c in columns],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "build_seconds": None,
        }
        pymilvus = _pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, pymilvus.DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field(VECTOR_FIELD, pymilvus.DataType.FLOAT_VECTOR, dim=int(x.shape[1]))
        for c in columns:
            extra = {"max_length": VARCHAR_MAX_BYTES} if c.type == "VARCHAR" else {}
            schema.add_field(c.field, getattr(pymilvus.DataType, c.type), nullable=True, **extra)
        index_params = client.prepare_index_params()
        index_params.add_index(VECTOR_FIELD, index_type=INDEX_TYPES[spec.kind], metric_type=METRIC,
                               params=_build_params(spec))
        try:
            client.create_collection(physical, schema=schema, index_params=index_params,
                                     properties={MANIFEST_PROPERTY: json.dumps(manifest)})
        except Exception as e:  # noqa: BLE001
            raise MilvusBackendError(f"Milvus refused to create collection {physical!r}: {_error_text(e)}") from None
        try:
            index = cls(client, uri, collection, physical, manifest)
            index._insert(ids, x, frame, columns)
            index._settle()
            if spec.kind != "flat" and check_recall:
                manifest["recall_at_10"] = index._recall(x)
            manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
            with _milvus_errors(f"putting collection {physical!r} in place as {collection!r}"):
                client.alter_collection_properties(physical, properties={MANIFEST_PROPERTY: json.dumps(manifest)})
                # The swap: the alias moves to the new collection in one call; the old one goes after.
                if previous is None:
                    client.create_alias(physical, collection)
                elif previous == collection:  # a plain item-embed collection of that name: replace it
                    client.drop_collection(previous)
                    client.create_alias(physical, collection)
                else:
                    client.alter_alias(physical, collection)
        except BaseException:
            try:
                client.drop_collection(physical)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                logger.warning("could not drop the partly built collection %s", physical)
            raise
        if previous is not None and previous != collection:
            try:
                client.drop_collection(previous)
            except Exception as e:  # noqa: BLE001 - the new index is in place; say what is left behind
                logger.warning("could not drop the previous collection %s: %s", previous, _error_text(e))
        return index

    @classmethod
    def from_embedding_file(cls, path: str | Path, *, uri: str, collection: str, kind: str = DEFAULT_KIND,
                            strict: bool = False, report: IndexReport | None = None, token: str | None = None,
                            notes: list[str] | None = None, **options) -> "MilvusIndex":
        """Index an embedding Parquet file (``item-embed embed``) into Milvus, keeping its model identity;
        unusable rows are skipped and reported as ``ProductIndex.from_embedding_file`` does."""
        frame, emb, meta = indexable_rows(path, strict, report)
        return cls.build(emb, frame["id"], frame.drop(columns=["id"]), meta["model_id"], meta.get("config_hash", ""),
                         uri=uri, collection=collection, kind=kind, token=token, catalog=meta.get("catalog"),
                         image_root=meta.get("image_root"), notes=notes, **options)

    @classmethod
    def open(cls, uri: str, collection: str, expected_model_id: str | None = None, *,
             token: str | None = None) -> "MilvusIndex":
        """The index in ``collection`` at ``uri``, refused when it was built by another model than
        ``expected_model_id`` (IndexLoadError naming both)."""
        _check_collection_name(collection)
        client = connect(uri, token)
        with _milvus_errors(f"opening collection {collection!r}"):
            physical = _target(client, collection)
            if physical is None:
                raise IndexLoadError(f"no collection {collection!r} in Milvus at {shown_uri(uri)}: build it with "
                                     f"`item-embed index EMB --backend milvus --uri URI --collection {collection}`")
            manifest = _read_manifest(client, physical, collection)
            _refuse_model(collection, manifest["model_id"], expected_model_id)
            client.load_collection(physical)
        return cls(client, uri, collection, physical, manifest)

    def _insert(self, ids: Sequence[str], x: np.ndarray, frame: pd.DataFrame, columns: Sequence[_Column]) -> None:
        batch = max(16, INSERT_BYTES // (4 * x.shape[1] + 64))
        rows = _rows(ids, x, frame, columns)
        for start in range(0, len(ids), batch):
            chunk = [next(rows) for _ in range(min(batch, len(ids) - start))]
            self._call("insert", data=chunk)

    def _settle(self, timeout: float = INDEX_WAIT_S) -> None:
        """Seal what was inserted and wait until the ANN index covers it (built in the background)."""
        self._call("flush")
        deadline = time.monotonic() + timeout
        lite = _lite_engine_collection(self.uri, self._physical)
        if lite is not None:
            # Milvus Lite indexes flushed segments in a background thread, searching unindexed ones by brute
            # force meanwhile, and reports its index as finished throughout: wait for that thread itself.
            try:
                lite._wait_for_bg(timeout=timeout)
            except Exception as e:  # noqa: BLE001 - searches are right either way, only slower
                logger.warning("Milvus Lite: could not wait for the background index build: %s", e)
            return
        while True:
            try:
                info = self._call("describe_index", index_name=VECTOR_FIELD) or {}
            except MilvusBackendError:  # no index progress to read: searches work all the same
                return
            if not info.get("pending_index_rows") or time.monotonic() > deadline:
                return
            time.sleep(1.0)

    def _recall(self, x: np.ndarray, k: int = RECALL_K, sample: int = RECALL_QUERIES, seed: int = 0) -> dict:
        """Recall@k of this index against exact search, over up to ``sample`` indexed vectors as queries
        (a product counts when its score reaches the exact k-th score, as ``ProductIndex`` counts it)."""
        import faiss

        k = min(k, len(x))
        rows = np.sort(np.random.default_rng(seed).choice(len(x), size=min(sample, len(x)), replace=False))
        q = x[rows]
        true_scores, _ = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        hits = 0
        for i, found in enumerate(self._raw_search(q, k, "", [])):
            kth = true_scores[i, -1] - 1e-5
            hits += sum(1 for r in found[:k] if r["distance"] >= kth)
        return {"k": k, "recall": float(hits / (len(rows) * k)), "queries": int(len(rows)), "count": int(len(x))}

    # ------------------------------------------------------------------ calls

    def _call(self, method: str, **kwargs):
        """``client.method(collection, ...)``: after a rebuild dropped our collection, follow the alias
        once (same model only); Milvus errors become MilvusBackendError."""
        for attempt in (0, 1):
            physical = self._physical
            try:
                return getattr(self._client, method)(physical, **kwargs)
            except Exception as e:  # noqa: BLE001
                if attempt == 0 and _not_found(e) and self._follow_alias(physical):
                    continue
                with _milvus_errors(f"{method} on collection {self.name!r}"):
                    raise

    def _follow_alias(self, gone: str) -> bool:
        """Switch to the collection the alias now names, if it is another one of the same model."""
        with self._switch_lock:
            if self._physical != gone:
                return True  # another thread switched already
            with _milvus_errors(f"following collection {self.name!r} to its rebuilt collection"):
                target = _target(self._client, self.name)
                if target is None or target == gone:
                    return False
                manifest = _read_manifest(self._client, target, self.name)
                _refuse_model(self.name, manifest["model_id"], self.model_id)
                if int(manifest["dim"]) != self.dim:
                    raise IndexLoadError(f"Milvus collection {self.name!r} now has dimension {manifest['dim']}, "
                                         f"not {self.dim}")
                self._client.load_collection(target)
            logger.warning("Milvus collection %s was rebuilt: now searching %s (was %s)", self.name, target, gone)
            self._manifest = manifest
            self._set_columns(manifest)
            self._physical = target
            return True

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return self._count()

    def __contains__(self, product_id: object) -> bool:
        return bool(self._call("get", ids=[str(product_id)], output_fields=[ID_FIELD]))

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (with ``count``, the live number of products, and the collections)."""
        return json.loads(json.dumps({**self._manifest, "count": len(self), "collection": self.name,
                                      "physical_collection": self._physical, "uri": shown_uri(self.uri)}))

    @property
    def columns(self) -> list[str]:
        """The carried metadata columns."""
        return [c.column for c in self._columns]

    def column_kinds(self) -> dict[str, str]:
        return {c.column: c.kind for c in self._columns}

    @property
    def ids(self) -> list[str]:
        """Every product id, read through the whole collection (costly on large ones)."""
        return list(self.iter_ids())

    def iter_ids(self, batch_size: int = 5000) -> Iterator[str]:
        it = self._call("query_iterator", batch_size=batch_size, output_fields=[ID_FIELD])
        try:
            while True:
                rows = it.next()
                if not rows:
                    return
                for r in rows:
                    yield r[ID_FIELD]
        finally:
            it.close()

    # ------------------------------------------------------------------ search

    def parse_filter(self, text: str) -> Filter:
        return parse_filter(text, self.column_kinds())

    def _milvus_filter(self, filter) -> str:
        if filter is None:
            return ""
        f = filter if isinstance(filter, Filter) else self.parse_filter(filter)
        unknown = sorted(f.columns - set(self.columns))
        if unknown:
            raise FilterError(f"filter {f.text!r}: no column {', '.join(map(repr, unknown))} in the index; "
                             f"the columns are: {', '.join(self.columns) or '(none)'}")
        return f.to_milvus({c.column: c.field for c in self._columns})

    def _search_params(self, fetch: int, share: float = 1.0) -> dict:
        """Search parameters; ``share``: the fraction of products passing the filter. A graph or list
        search only meets that fraction of what it visits, so it visits 1/share times more (times
        FILTER_WIDEN): without it, HNSW recall@10 under a filter passing 10% of hm-dev falls to ~0.6."""
        widen = 1.0 if share >= 1.0 else FILTER_WIDEN / max(share, 1e-6)
        if self._spec.kind == "hnsw":
            base = max(int(self._spec.ef_search), fetch)
            return {"metric_type": METRIC, "params": {"ef": int(min(max(base, MAX_EF), math.ceil(base * widen)))}}
        if self._spec.kind == "ivf":
            nprobe = int(self._spec.nprobe)
            return {"metric_type": METRIC,
                    "params": {"nprobe": int(min(max(nprobe, int(self._spec.nlist)), math.ceil(nprobe * widen)))}}
        return {"metric_type": METRIC, "params": {}}

    def _count(self, expr: str = "") -> int:
        res = self._call("query", filter=expr, output_fields=["count(*)"])
        return int(res[0]["count(*)"]) if res else 0

    def _raw_search(self, q: np.ndarray, fetch: int, expr: str, output_fields: list[str]) -> list[list[dict]]:
        out: list[list[dict]] = []
        share = 1.0
        if expr and self._spec.kind != "flat":
            passing = self._count(expr)
            if passing == 0:
                return [[] for _ in range(len(q))]
            share = passing / max(self._count(), 1)
        params = self._search_params(fetch, share)
        for start in range(0, len(q), QUERY_BATCH):
            res = self._call("search", data=[v for v in q[start : start + QUERY_BATCH]], limit=fetch, filter=expr,
                             output_fields=output_fields, search_params=params, anns_field=VECTOR_FIELD)
            out.extend(list(r) for r in res)
        return out

    def _cells(self, entity: Mapping[str, Any]) -> dict:
        return {c.column: entity.get(c.field) for c in self._columns}

    def search(self, queries: np.ndarray, k: int = 10, exclude: list[set[str]] | None = None,
               filter=None) -> list[list[MilvusHit]]:
        """Top-k products for each query vector, as ``ProductIndex.search``: queries (q, d) or (d,);
        exclude: per query, ids never to return; filter: metadata filter text (``index.filters``) or a
        ``Filter``, evaluated by Milvus. Hits carry their metadata."""
        q = normalised_rows(queries, self.dim, "queries")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} sets for {len(q)} queries")
        expr = self._milvus_filter(filter)
        if k <= 0 or not len(q):
            return [[] for _ in range(len(q))]
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        fetch = min(int(k) + extra, MAX_TOPK)
        fields = [c.field for c in self._columns]
        out = []
        for i, found in enumerate(self._raw_search(q, fetch, expr, fields)):
            skip = exclude[i] if exclude else ()
            hits = []
            for r in found:
                pid = r[ID_FIELD] if ID_FIELD in r else r["id"]
                if pid in skip:
                    continue
                hits.append(MilvusHit(str(pid), float(r["distance"]), -1, self._cells(r.get("entity", {}))))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search_id(self, product_id: str, k: int = 10, filter=None) -> list[MilvusHit]:
        """The k products nearest to an indexed product, itself excluded."""
        return self.search(self.vector(product_id)[None, :], k, exclude=[{str(product_id)}], filter=filter)[0]

    def vector(self, product_id: str) -> np.ndarray:
        """The stored (normalised) float32 (d,) vector of a product; KeyError when it is not indexed."""
        res = self._call("get", ids=[str(product_id)], output_fields=[VECTOR_FIELD])
        if not res:
            raise KeyError(f"product {product_id!r} is not in the index")
        return np.asarray(res[0][VECTOR_FIELD], dtype=np.float32)

    def product(self, product_id: str) -> dict:
        """The carried metadata of a product (column -> value); KeyError when it is not indexed."""
        res = self._call("get", ids=[str(product_id)], output_fields=[c.field for c in self._columns] or [ID_FIELD])
        if not res:
            raise KeyError(f"product {product_id!r} is not in the index")
        return self._cells(res[0])

    def metadata_of(self, ids: Sequence[str]) -> pd.DataFrame:
        """The carried metadata of the given products, one row each in that order (missing ones: all null)."""
        found: dict[str, dict] = {}
        fields = [c.field for c in self._columns] or [ID_FIELD]
        for start in range(0, len(ids), GET_BATCH):
            for r in self._call("get", ids=[str(i) for i in ids[start : start + GET_BATCH]], output_fields=fields):
                found[r[ID_FIELD]] = self._cells(r)
        empty = {c: None for c in self.columns}
        return pd.DataFrame([found.get(str(i), empty) for i in ids], columns=self.columns)

    # ------------------------------------------------------------------ updates

    def _present(self, ids: Sequence[str]) -> list[str]:
        have: list[str] = []
        for start in range(0, len(ids), GET_BATCH):
            have += [r[ID_FIELD] for r in self._call("get", ids=list(ids[start : start + GET_BATCH]),
                                                      output_fields=[ID_FIELD])]
        return have

    def add(self, ids: Iterable, embeddings: np.ndarray, metadata: pd.DataFrame | None = None) -> list[str]:
        """Add products; ids already indexed are refused (remove them first). Returns the metadata columns
        that the collection has no field for (not stored: rebuild the index to carry them)."""
        return self.update(add=(ids, embeddings, metadata))

    def remove(self, ids: Iterable) -> None:
        """Remove products; unknown ids raise KeyError naming them."""
        self.update(remove=ids)

    def update(self, add: tuple | None = None, remove: Iterable | None = None) -> list[str]:
        """Remove, then add ``(ids, embeddings, metadata)``, after checking both: unknown ids to remove
        (KeyError), ids to add that are indexed and not being removed, and every metadata cell
        (ValueError) are refused before anything changes. Returns the metadata columns not stored."""
        gone = list(dict.fromkeys(str(i) for i in (remove or ())))
        if gone:
            have = set(self._present(gone))
            unknown = [i for i in gone if i not in have]
            if unknown:
                raise KeyError(f"not in the index: {listed_names(unknown)}")
        ids: list[str] = []
        ignored: list[str] = []
        if add is not None:
            new_ids, embeddings, metadata = add
            ids = id_list(new_ids)
            _check_ids(ids)
            x = normalised_rows(embeddings, self.dim)
            if len(x) != len(ids):
                raise ValueError(f"{len(x)} embeddings but {len(ids)} ids")
            frame = ProductIndex.aligned_metadata(metadata, len(ids)).rename(columns=str)
            taken = [i for i in self._present(ids) if i not in set(gone)]
            if taken:
                raise ValueError(f"already in the index: {listed_names(taken)} (remove them first to replace them)")
            known = set(self.columns)
            ignored = [c for c in frame.columns if c not in known]
            for _ in _rows(ids, x, frame, self._columns):  # every cell checked before anything is written
                pass
        if gone:
            self._delete(gone)
        if ids:
            try:
                self._insert(ids, x, frame, self._columns)
            except BaseException:
                try:  # a failed batch: take out what went in, so the add is all or nothing
                    self._delete(ids)
                except Exception:  # noqa: BLE001
                    logger.warning("a failed add left some of its products in Milvus collection %s", self.name)
                raise
        return ignored

    def _delete(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), GET_BATCH):
            self._call("delete", ids=list(ids[start : start + GET_BATCH]))

    def close(self) -> None:
        self._client.close()


def _build_params(spec: IndexSpec) -> dict:
    if spec.kind == "hnsw":
        return {"M": int(spec.m), "efConstruction": int(spec.ef_construction)}
    if spec.kind == "ivf":
        return {"nlist": int(spec.nlist)}
    return {}
