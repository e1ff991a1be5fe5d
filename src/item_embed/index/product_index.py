"""Nearest-product search: a pure exact ``search`` and a FAISS-backed, persistent ``ProductIndex``.

Vectors are L2-normalised float32, so inner product = cosine. A ``ProductIndex`` directory holds

    index.faiss       faiss.write_index of the FAISS index (ids are int64 "labels", not rows)
    ids.parquet       id (string), label (int64): one row per live product, labels ascending
    metadata.parquet  the carried columns (title, group, ...), rows aligned with ids.parquet
    manifest.json     format version, model identity, kind + options, counts, recall, sha256 of the above
    index_report.json (from ``item-embed index``) every input row indexed or skipped with its reason

Building from an embedding file accounts for every row: rows in = rows indexed + rows reported.
Rows with no id, a duplicate id, no embedding, a wrong dimension, NaN/inf or an all-zero vector
are skipped and reported (``strict=True`` makes the first fatal); ``build`` itself stays strict.

No pickle anywhere: JSON, Parquet and the FAISS binary format only.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import faiss
import numpy as np
import pandas as pd

from ..data.catalog import Problem
from ..data.ids import IdError, product_id
from ..atomic_files import remove_stale, replace_folder, temp_folder
from ..checkpoint import fsync_path, sha256_file

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "index_report.json"
UPDATE_REPORT_FILE = "update_report.json"  # the last `index-update --add`'s rows (REPORT_FILE: the build's)
DATA_FILES = (INDEX_FILE, IDS_FILE, METADATA_FILE)
KINDS = ("flat", "hnsw", "ivf")
RECALL_K = 10
RECALL_QUERIES = 1000
# FAISS warns below 39 training points per centroid: centroids trained on fewer are noise.
MIN_POINTS_PER_LIST = 39
SEARCH_CHUNK = 1024
FILTER_SCAN_CHUNK = 32768  # filtered hnsw/ivf search: stored vectors scanned at once
# FAISS scans the corpus once per query unless n_queries x d reaches this (default 128,000: 334
# queries at d = 384); one matrix product is several times faster from a few queries up (bench_search).
BLAS_THRESHOLD = 4096
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def search(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over ``corpus``.

    queries: (q, d); corpus: (n, d). Returns (scores float32 (q, k'), indices int64 (q, k')) with
    k' = min(k, n), best first; equal scores are ordered by lower corpus index (a stable sort),
    so results do not depend on BLAS or thread count. Cosine similarity when both are normalised.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    corpus = np.atleast_2d(np.asarray(corpus, dtype=np.float32))
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]}, corpus {corpus.shape[1]}")
    k = max(0, min(int(k), len(corpus)))
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), SEARCH_CHUNK):
        sims = queries[start : start + SEARCH_CHUNK] @ corpus.T  # (c, n)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (c, k)
        indices[start : start + len(sims)] = order
        scores[start : start + len(sims)] = np.take_along_axis(sims, order, axis=1)
    return scores, indices


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used: missing, corrupted, or built by another model."""


# --------------------------------------------------------------------------------------------
# Embedding files, row by row: every row indexed or reported
# --------------------------------------------------------------------------------------------


# A skipped row of an embedding file reads like a skipped catalog row: row, id, reason.
SkippedRow = Problem


@dataclass
class IndexReport:
    """What happened to every row of an embedding file: indexed, or skipped and why."""

    source: str = ""
    rows_in: int = 0
    indexed: int = 0
    problems: list[SkippedRow] = field(default_factory=list)

    @property
    def reported(self) -> int:
        return len(self.problems)

    def check_accounting(self) -> None:
        if self.rows_in != self.indexed + self.reported:
            raise AssertionError(f"row accounting broken: {self.rows_in} in != {self.indexed} indexed + "
                                 f"{self.reported} reported")

    def to_dict(self) -> dict:
        reasons = Counter(p.reason.split(":", 1)[0] for p in self.problems)
        return {"source": self.source, "rows_in": self.rows_in, "rows_indexed": self.indexed,
                "rows_reported": self.reported, "reported_by_reason": dict(reasons.most_common()),
                "problems": [{"row": p.row, "id": p.id, "reason": p.reason} for p in self.problems]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def summary(self, max_lines: int = 10) -> str:
        lines = [f"embeddings {self.source}: {self.rows_in} rows in, {self.indexed} indexed, "
                 f"{self.reported} reported"]
        lines += [f"  skipped {p}" for p in self.problems[:max_lines]]
        if self.reported > max_lines:
            lines.append(f"  ... and {self.reported - max_lines} more (see the report file)")
        return "\n".join(lines)


def _row_id(value) -> str | IdError | None:
    """An id cell as exact text by the catalog's rule (``data.ids``); None when missing or blank, the
    error when refused."""
    try:
        return product_id(value)
    except IdError as e:
        return e


def _vectors_of(col, declared: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(float32 (n, dim) vectors, zero where a row's list is null or of another length; each row's
    list length, NaN where null; dim: the declared ``item_embed.dim``, else the most common length)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(col)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where null
    present = ~np.isnan(lengths)
    if declared.isdigit():
        dim = int(declared)
    elif present.any():
        dim = int(Counter(lengths[present].astype(np.int64).tolist()).most_common(1)[0][0])
    else:
        dim = 0
    good_len = present & (lengths == dim) if dim else np.zeros(n, dtype=bool)
    vectors = np.zeros((n, max(dim, 0)), dtype=np.float32)
    if good_len.any():
        values = pc.list_flatten(col.filter(pa.array(good_len))).to_numpy(zero_copy_only=False)  # null -> NaN
        vectors[good_len] = np.asarray(values, dtype=np.float32).reshape(-1, dim)
    return vectors, lengths, dim


def read_embedding_rows(path: str | Path, strict: bool = False,
                        report: IndexReport | None = None) -> tuple[pd.DataFrame, np.ndarray, IndexReport]:
    """The usable rows of an embedding file: (columns other than the embedding, float32 (n, d), report).

    A row is skipped and reported when its id is missing or repeats an id already kept, its
    embedding is missing, has another dimension than the file's (``item_embed.dim``, else the most
    common length), has NaN/inf values or is all zeros. ``strict``: ValueError at the first one.
    """
    import pyarrow as pa

    from ..embeddings import EMBEDDING, read_embedding_metadata, read_embedding_table

    report = report if report is not None else IndexReport()
    report.source = str(path)
    table = read_embedding_table(path)
    if "id" not in table.column_names:
        raise ValueError(f"{path} has no 'id' column: not an item-embed embedding file")
    col = table.column(EMBEDDING).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise ValueError(f"{path}: column {EMBEDDING!r} holds {col.type}, not lists of numbers")
    vectors, lengths, dim = _vectors_of(col, read_embedding_metadata(path).get("dim", ""))
    n = len(col)
    present = ~np.isnan(lengths)
    good_len = present & (lengths == dim) if dim else np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(vectors).all(axis=1)
        nonzero = (vectors != 0).any(axis=1)
    ids = [_row_id(v) for v in table.column("id").to_pylist()]
    refused = {row: pid for row, pid in enumerate(ids) if isinstance(pid, IdError)}
    ids = [None if isinstance(pid, IdError) else pid for pid in ids]

    keep: list[int] = []
    first: dict[str, int] = {}
    for row in range(n):
        report.rows_in += 1
        pid = ids[row]
        if row in refused:
            pid, reason = refused[row].shown, str(refused[row])
        elif pid is None:
            reason = "missing id"
        elif not present[row]:
            reason = "no embedding: the value is null"
        elif not good_len[row]:
            reason = f"wrong dimension: {int(lengths[row])} values, the file's embeddings have {dim}"
        elif not finite[row]:
            reason = "non-finite embedding: NaN, infinite or null values"
        elif not nonzero[row]:
            reason = "all-zero embedding: no direction to compare"
        elif pid in first:
            reason = f"duplicate id: first indexed at row {first[pid]}"
        else:
            first[pid] = row
            keep.append(row)
            report.indexed += 1
            continue
        problem = SkippedRow(row, pid, reason)
        if strict:
            raise ValueError(f"{path}: {problem} (without --strict such rows are skipped and reported)")
        report.problems.append(problem)
    frame = table.drop_columns([EMBEDDING]).take(pa.array(keep, type=pa.int64())).to_pandas()
    frame["id"] = [ids[r] for r in keep]
    return frame, (vectors if len(keep) == n else vectors[keep]), report


@dataclass
class Hit:
    """One search result: product id, cosine score, and its row in ``ProductIndex.metadata``."""

    id: str
    score: float
    row: int


@dataclass(frozen=True)
class IndexSpec:
    """Kind of FAISS index and its options (only those of the kind are used)."""

    kind: str = "flat"
    nlist: int | None = None  # ivf: number of inverted lists (default from the row count)
    nprobe: int | None = None  # ivf: lists visited per query
    m: int = 32  # hnsw: graph neighbours per node
    ef_construction: int = 40  # hnsw: build-time beam width (FAISS default)
    ef_search: int = 64  # hnsw: search-time beam width

    _OPTIONS = {"flat": (), "hnsw": ("m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe")}

    @classmethod
    def parse(cls, kind: str, **options) -> "IndexSpec":
        """Validate ``options`` against ``kind``; None values are left at their defaults."""
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
        given = {k: v for k, v in options.items() if v is not None}
        wrong = sorted(set(given) - set(cls._OPTIONS[kind]))
        if wrong:
            raise ValueError(f"option(s) {', '.join(wrong)} do not apply to a {kind!r} index")
        for name, value in given.items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, not {value}")
        return cls(kind=kind, **{k: int(v) for k, v in given.items()})

    def options(self) -> dict[str, int | None]:
        """The options that mean something for this kind (what the manifest records)."""
        return {k: getattr(self, k) for k in self._OPTIONS[self.kind]}


def normalised_rows(vectors: np.ndarray, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 (n, d) copy with unit rows; refuses NaN/inf and zero rows."""
    x = np.array(np.atleast_2d(vectors), dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (n, d) array, got shape {np.shape(vectors)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the index has {dim}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{what} contain all-zero vectors: they have no direction to compare")
    x /= norms[:, None]
    return x


def id_list(ids: Iterable) -> list[str]:
    out = [str(i) for i in ids]
    dup = pd.Index(out)[pd.Index(out).duplicated()].unique()
    if len(dup):
        raise ValueError(f"duplicate product ids: {listed_names(dup)}")
    return out


def listed_names(items: Sequence, limit: int = 10) -> str:
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _new_faiss_index(spec: IndexSpec, x: np.ndarray) -> faiss.Index:
    """An empty FAISS index for ``spec`` (IVF trained on ``x``) that takes int64 labels."""
    d = x.shape[1]
    if spec.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if spec.kind == "hnsw":
        base = faiss.IndexHNSWFlat(d, spec.m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = spec.ef_construction
        base.hnsw.efSearch = spec.ef_search
        # HNSW cannot delete nodes: removals become tombstones filtered at search time.
        return faiss.IndexIDMap2(base)
    # IVF takes labels natively; IndexIDMap around IVF renumbers wrongly after remove_ids.
    nlist, nprobe = spec.nlist, spec.nprobe
    if len(x) < nlist * MIN_POINTS_PER_LIST:
        raise ValueError(f"an ivf index with nlist={nlist} needs at least {nlist * MIN_POINTS_PER_LIST} products "
                         f"to train on ({MIN_POINTS_PER_LIST} per list), got {len(x)}: "
                         "lower --nlist or use --kind flat/hnsw")
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.nprobe = nprobe
    # The hashtable direct map lets reconstruct() (vector(id)) and remove_ids() work by label.
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return ivf


def _faiss_kind(index: faiss.Index) -> str | None:
    """The kind (flat, hnsw, ivf) a FAISS index read from disk was built as by ``_new_faiss_index``;
    None for any other structure."""
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    if isinstance(index, faiss.IndexIDMap):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
    return None


def resolve_ivf(spec: IndexSpec, n: int) -> IndexSpec:
    """Fill ivf defaults from the row count: ~4 sqrt(n) lists, capped so each list gets enough points."""
    if spec.kind != "ivf":
        return spec
    nlist = spec.nlist or max(1, min(int(4 * np.sqrt(n)), n // MIN_POINTS_PER_LIST))
    nprobe = min(spec.nprobe or max(8, nlist // 16), nlist)
    return IndexSpec(kind="ivf", nlist=nlist, nprobe=nprobe)


def _recall_at_k(index: faiss.Index, x: np.ndarray, params, k: int = RECALL_K,
                 sample: int = RECALL_QUERIES, seed: int = 0) -> dict[str, float | int]:
    """Recall@k of ``index`` against exact search, over up to ``sample`` indexed vectors as queries.

    A returned product counts when its score reaches the exact k-th score: exact duplicates in a
    catalog tie, and which of several tied products is returned does not matter.
    """
    k = min(k, len(x))
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=min(sample, len(x)), replace=False))
    q = x[rows]
    true_scores, _ = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)  # (s, k), exact, no copy of x
    scores, found = index.search(q, k, params=params)  # (s, k)
    kth = true_scores[:, -1:] - 1e-5  # tolerance for float rounding between the two code paths
    hit = (found >= 0) & (scores >= kth)
    return {"k": k, "recall": float(hit.sum() / (len(rows) * k)), "queries": int(len(rows)), "count": int(len(x))}


class _ReadWriteLock:
    """Many readers or one writer. A waiting writer goes before readers that come after it, so a stream
    of searches cannot hold an update off forever. Not re-entrant: take it once per public call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def indexable_rows(path: str | Path, strict: bool, report: IndexReport | None) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(rows, vectors, file metadata) of an embedding Parquet file to index: it must record its model
    identity; unusable rows go to ``report`` (:func:`read_embedding_rows`); none usable is a ValueError."""
    from ..embeddings import read_embedding_metadata

    meta = read_embedding_metadata(path)
    if "model_id" not in meta:
        raise ValueError(f"{path} records no model identity: re-create it with `item-embed embed`")
    report = report if report is not None else IndexReport()
    frame, emb, report = read_embedding_rows(path, strict=strict, report=report)
    report.check_accounting()
    if not len(frame):
        raise ValueError(f"no usable rows in {path}: all {report.rows_in} were reported\n{report.summary()}")
    return frame, emb, meta


class ManifestFacts:
    """What an index's manifest says of it (its model, dimension, kind, catalog), read the same way by
    ``ProductIndex`` and ``MilvusIndex``: both keep the manifest in ``_manifest`` and its options in ``_spec``."""

    _manifest: dict
    _spec: IndexSpec

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def model_id(self) -> str:
        return self._manifest["model_id"]

    @property
    def kind(self) -> str:
        return self._spec.kind

    @property
    def catalog(self) -> str | None:
        return self._manifest.get("catalog")

    @property
    def image_root(self) -> str | None:
        return self._manifest.get("image_root")


class ProductIndex(ManifestFacts):
    """A FAISS index over products' unit vectors plus their ids, metadata and a manifest.

    Build with ``ProductIndex.build`` / ``from_embedding_file``, persist with ``save`` / ``load``;
    ``add`` and ``remove`` change it in place without retraining or rebuilding. Safe across threads:
    ``search``, ``search_id``, ``vector`` and ``save`` run side by side; ``add`` and ``remove`` wait
    for them and hold them off while they change the index (FAISS itself does not allow adding or
    removing during a search).
    """

    def __init__(self, index: faiss.Index, ids: list[str], labels: np.ndarray, metadata: pd.DataFrame,
                 manifest: dict, tombstones: np.ndarray | None = None) -> None:
        self._index = index
        self._ids = list(ids)
        self._labels = np.asarray(labels, dtype=np.int64)  # (n,) ascending: label -> row by searchsorted
        self._metadata = metadata.reset_index(drop=True)
        self._manifest = manifest
        self._spec = IndexSpec(kind=manifest["kind"], **manifest["options"])
        self._tombstones = np.asarray(tombstones if tombstones is not None else [], dtype=np.int64)
        self._row_of = {pid: i for i, pid in enumerate(self._ids)}
        self._lock = _ReadWriteLock()
        self._save_lock = threading.Lock()  # two saves at once would race on the same folder
        self._apply_search_options()
        self._refresh_filter()

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Iterable, metadata: pd.DataFrame | None, model_id: str,
              config_hash: str, kind: str = "flat", *, catalog: str | None = None, image_root: str | None = None,
              **options) -> "ProductIndex":
        """Index ``embeddings`` (n, d) of products ``ids`` (n,), with ``metadata`` rows aligned to them.

        options: ``nlist``, ``nprobe`` (ivf); ``m``, ``ef_construction``, ``ef_search`` (hnsw).
        Approximate kinds record their recall@10 against exact search in the manifest.
        """
        ids = id_list(ids)
        x = normalised_rows(embeddings)
        if len(x) != len(ids):
            raise ValueError(f"{len(x)} embeddings but {len(ids)} ids")
        if len(x) == 0:
            raise ValueError("no products to index")
        metadata = cls.aligned_metadata(metadata, len(ids))
        spec = resolve_ivf(IndexSpec.parse(kind, **options), len(x))
        index = _new_faiss_index(spec, x)
        labels = np.arange(len(x), dtype=np.int64)
        index.add_with_ids(x, labels)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_id": str(model_id),
            "config_hash": str(config_hash),
            "dim": int(x.shape[1]),
            "count": len(ids),
            "kind": spec.kind,
            "options": spec.options(),
            "recall_at_10": None,
            "catalog": catalog,
            "image_root": image_root,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "next_label": len(ids),
            "tombstones": [],
        }
        out = cls(index, ids, labels, metadata, manifest)
        if spec.kind != "flat":
            manifest["recall_at_10"] = _recall_at_k(index, x, out._search_params())
        return out

    @classmethod
    def from_embedding_file(cls, path: str | Path, kind: str = "flat", *, strict: bool = False,
                            report: IndexReport | None = None, **options) -> "ProductIndex":
        """Index an embedding Parquet file (``item-embed embed``), keeping its model identity and catalog.

        Unusable rows (see :func:`read_embedding_rows`) are skipped and listed in ``report``, or
        with ``strict`` the first one raises ValueError. No usable row at all is a ValueError.
        """
        frame, emb, meta = indexable_rows(path, strict, report)
        return cls.build(emb, frame["id"], frame.drop(columns=["id"]), meta["model_id"], meta.get("config_hash", ""),
                         kind, catalog=meta.get("catalog"), image_root=meta.get("image_root"), **options)

    @staticmethod
    def aligned_metadata(metadata: pd.DataFrame | None, n: int) -> pd.DataFrame:
        if metadata is None:
            return pd.DataFrame(index=range(n))
        if len(metadata) != n:
            raise ValueError(f"metadata has {len(metadata)} rows for {n} products")
        # The id lives in ids.parquet; a copy in the metadata could disagree with it.
        return metadata.drop(columns=[c for c in ("id",) if c in metadata]).reset_index(drop=True)

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, product_id: object) -> bool:
        return str(product_id) in self._row_of

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (``count`` reflects adds and removes since the last save)."""
        return json.loads(json.dumps({**self._manifest, "count": len(self)}))

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def metadata(self) -> pd.DataFrame:
        """Carried columns, one row per product in index order (``Hit.row`` indexes it)."""
        return self._metadata

    # ------------------------------------------------------------------ search

    def _apply_search_options(self) -> None:
        if self._spec.kind == "ivf":
            self._index.nprobe = self._spec.nprobe
        elif self._spec.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self._spec.ef_search

    def _refresh_filter(self) -> None:
        """Rebuild the selector hiding HNSW tombstones. Built once per change rather than per search, so
        concurrent searches never see it freed; SWIG objects do not own what they point to, hence the pair."""
        self._filter = None
        if len(self._tombstones):
            dead = faiss.IDSelectorBatch(self._tombstones)
            self._filter = (dead, faiss.IDSelectorNot(dead))

    def _search_params(self):
        """FAISS search parameters: HNSW's beam width and the filter hiding its tombstones."""
        if self._spec.kind != "hnsw":
            return None
        params = faiss.SearchParametersHNSW(efSearch=self._spec.ef_search)
        if self._filter is not None:
            params.sel = self._filter[1]
        return params

    def search(self, queries: np.ndarray, k: int = 10, exclude: list[set[str]] | None = None,
               filter=None) -> list[list[Hit]]:
        """Top-k products for each query vector.

        queries: (q, d) or (d,), normalised here; exclude: per query, ids never to return (e.g.
        the query product itself); filter: a metadata filter (text such as ``category == "bag" and
        price < 10``, see ``index.filters``, or a parsed ``Filter``): only products passing it are
        returned, and their top-k is exact whatever the kind. Returns q lists of up to k hits, best first.
        """
        with self._lock.read():
            return self._search(queries, k, exclude, filter)

    def _search(self, queries: np.ndarray, k: int, exclude: list[set[str]] | None, filter=None) -> list[list[Hit]]:
        q = normalised_rows(queries, self.dim, "queries")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} sets for {len(q)} queries")
        allowed = self._filter_rows(filter) if filter is not None else None
        if len(self) == 0 or k <= 0 or (allowed is not None and not len(allowed)):
            return [[] for _ in range(len(q))]
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        # Fetching as many extra as could be excluded keeps the filtered top-k exact.
        fetch = min(k + extra, len(self) if allowed is None else len(allowed))
        if allowed is not None:
            scores, rows, known = self._search_rows(q, fetch, allowed)
        else:
            scores, labels = self._index.search(q, fetch, params=self._search_params())  # (q, fetch) each
            rows = np.minimum(np.searchsorted(self._labels, labels), len(self._labels) - 1)
            # A label with no live row (-1 padding, or a removed product) is never reported as another product.
            known = (labels >= 0) & (self._labels[rows] == labels)
        out = []
        for i in range(len(q)):
            skip = exclude[i] if exclude else ()
            hits = []
            for score, ok, row in zip(scores[i], known[i], rows[i]):
                if not ok:
                    continue
                pid = self._ids[row]
                if pid in skip:
                    continue
                hits.append(Hit(pid, float(score), int(row)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _filter_rows(self, filter) -> np.ndarray:
        """Rows (ascending) whose metadata passes ``filter`` (text or a parsed ``Filter``), exactly."""
        from .filters import Filter, parse_filter

        f = filter if isinstance(filter, Filter) else parse_filter(filter, self._metadata)
        return np.flatnonzero(f.mask(self._metadata))

    def _search_rows(self, q: np.ndarray, fetch: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact top-``fetch`` over the given rows only: (scores, rows, known) as the search loop takes them.

        flat: FAISS searches with a selector of the rows' labels (exact, no copy). hnsw/ivf would
        miss neighbours behind a selector, so the rows' stored vectors are scanned exactly, in chunks.
        """
        labels = np.ascontiguousarray(self._labels[rows])
        if self._spec.kind == "flat":
            selector = faiss.IDSelectorBatch(labels)
            scores, found = self._index.search(q, fetch, params=faiss.SearchParameters(sel=selector))
            at = np.minimum(np.searchsorted(self._labels, found), len(self._labels) - 1)
            return scores, at, (found >= 0) & (self._labels[at] == found)
        best_scores = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_rows = np.zeros((len(q), 0), dtype=np.int64)
        for start in range(0, len(rows), FILTER_SCAN_CHUNK):
            part = rows[start : start + FILTER_SCAN_CHUNK]
            scores, idx = search(q, self._index.reconstruct_batch(labels[start : start + len(part)]), fetch)
            # Earlier rows first, then a stable sort: ties go to the lower row, as in `search`.
            both_scores = np.concatenate([best_scores, scores], axis=1)
            both_rows = np.concatenate([best_rows, part[idx]], axis=1)
            order = np.argsort(-both_scores, axis=1, kind="stable")[:, :fetch]
            best_scores = np.take_along_axis(both_scores, order, axis=1)
            best_rows = np.take_along_axis(both_rows, order, axis=1)
        return best_scores, best_rows, np.ones(best_rows.shape, dtype=bool)

    def search_id(self, product_id: str, k: int = 10, filter=None) -> list[Hit]:
        """The k products nearest to an indexed product, itself excluded (``filter``: as in ``search``)."""
        with self._lock.read():
            return self._search(self._vector(product_id)[None, :], k, exclude=[{str(product_id)}], filter=filter)[0]

    def vector(self, product_id: str) -> np.ndarray:
        """The stored (normalised) float32 (d,) vector of a product."""
        with self._lock.read():
            return self._vector(product_id)

    def _vector(self, product_id: str) -> np.ndarray:
        row = self._row_of.get(str(product_id))
        if row is None:
            raise KeyError(f"product {product_id!r} is not in the index")
        return self._index.reconstruct(int(self._labels[row]))

    # ------------------------------------------------------------------ updates

    def add(self, ids: Iterable, embeddings: np.ndarray, metadata: pd.DataFrame | None = None) -> None:
        """Add products without rebuilding; ids already indexed are refused (remove them first)."""
        with self._lock.write():
            self._add(ids, embeddings, metadata)

    def _add(self, ids: Iterable, embeddings: np.ndarray, metadata: pd.DataFrame | None) -> None:
        ids = id_list(ids)
        x = normalised_rows(embeddings, self.dim)
        if len(x) != len(ids):
            raise ValueError(f"{len(x)} embeddings but {len(ids)} ids")
        taken = [i for i in ids if i in self._row_of]
        if taken:
            raise ValueError(f"already in the index: {listed_names(taken)} (remove them first to replace them)")
        if not ids:
            return
        new = self.aligned_metadata(metadata, len(ids))
        start = int(self._manifest["next_label"])
        labels = np.arange(start, start + len(ids), dtype=np.int64)
        self._index.add_with_ids(x, labels)
        self._manifest["next_label"] = start + len(ids)
        for offset, pid in enumerate(ids):
            self._row_of[pid] = len(self._ids) + offset
        self._ids.extend(ids)
        self._labels = np.concatenate([self._labels, labels])
        # Columns missing on either side become missing values.
        self._metadata = pd.concat([self._metadata, new], ignore_index=True)

    def remove(self, ids: Iterable) -> None:
        """Remove products without rebuilding; unknown ids raise KeyError naming them."""
        with self._lock.write():
            self._remove(ids)

    def _remove(self, ids: Iterable) -> None:
        ids = list(dict.fromkeys(str(i) for i in ids))
        unknown = [i for i in ids if i not in self._row_of]
        if unknown:
            raise KeyError(f"not in the index: {listed_names(unknown)}")
        if not ids:
            return
        rows = np.array(sorted(self._row_of[i] for i in ids), dtype=np.int64)
        labels = np.ascontiguousarray(self._labels[rows])
        if self._spec.kind == "hnsw":
            self._tombstones = np.union1d(self._tombstones, labels)
            self._manifest["tombstones"] = self._tombstones.tolist()
            self._refresh_filter()
        else:
            # IVF's hashtable direct map only removes through an IDSelectorArray.
            self._index.remove_ids(faiss.IDSelectorArray(len(labels), faiss.swig_ptr(labels)))
        keep = np.ones(len(self._ids), dtype=bool)
        keep[rows] = False
        self._ids = [pid for pid, k in zip(self._ids, keep) if k]
        self._labels = self._labels[keep]
        self._metadata = self._metadata[keep].reset_index(drop=True)
        self._row_of = {pid: i for i, pid in enumerate(self._ids)}

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path, extra_files: dict[str, str] | None = None,
             keep_files: Sequence[str] = ()) -> Path:
        """Write the index to ``directory`` atomically: a temporary folder, fsynced, then renamed into place.

        extra_files: name -> text written alongside (e.g. the build's row report), in the same swap.
        keep_files: names of plain files beside the index being overwritten to carry into the new folder
        (an update keeps the build's report); anything else of the old folder goes with it.
        """
        with self._save_lock, self._lock.read():
            return self._save(directory, extra_files, keep_files)

    def _save(self, directory: str | Path, extra_files: dict[str, str] | None, keep_files: Sequence[str]) -> Path:
        target = Path(directory)
        is_index = (target / MANIFEST_FILE).is_file()
        if target.exists() and not is_index and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(f"refusing to overwrite {target}: it exists and is not an item-embed index")
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent, target.name)
        tmp = temp_folder(target)
        try:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            pd.DataFrame({"id": pd.Series(self._ids, dtype="string"), "label": self._labels}).to_parquet(
                tmp / IDS_FILE, index=False)
            self._metadata.to_parquet(tmp / METADATA_FILE, index=False)
            manifest = {**self._manifest, "count": len(self),
                        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                                  for name in DATA_FILES}}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            extra = dict(extra_files or {})
            for name, text in extra.items():
                if Path(name).name != name or name in (*DATA_FILES, MANIFEST_FILE):
                    raise ValueError(f"extra file name {name!r} is not a plain, free file name")
                (tmp / name).write_text(text, encoding="utf-8")
            kept = []
            for name in keep_files if is_index else ():
                f = target / name
                if name in (*DATA_FILES, MANIFEST_FILE, *extra) or Path(name).name != name:
                    raise ValueError(f"keep file name {name!r} is not a free file name")
                if f.is_file() and not f.is_symlink():
                    shutil.copy2(f, tmp / name)
                    kept.append(name)
            for name in (*DATA_FILES, MANIFEST_FILE, *extra, *kept):
                fsync_path(tmp / name)
            fsync_path(tmp)
            replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._manifest = manifest
        return target

    @classmethod
    def load(cls, directory: str | Path, expected_model_id: str | None = None) -> "ProductIndex":
        """Read an index saved by ``save``, verifying checksums, counts and (if given) the model identity."""
        d = Path(directory)
        if not (d / MANIFEST_FILE).is_file():
            raise IndexLoadError(f"{d} is not an index (no {MANIFEST_FILE}): build one with `item-embed index`")
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text())
            version, model_id = manifest["format_version"], manifest["model_id"]
            files, count, dim = manifest["files"], int(manifest["count"]), int(manifest["dim"])
            IndexSpec.parse(manifest["kind"], **manifest["options"])
        except (ValueError, KeyError, TypeError) as e:
            raise IndexLoadError(f"{d / MANIFEST_FILE} is corrupted ({e}): "
                                 "rebuild the index with `item-embed index`") from None
        if version != FORMAT_VERSION:
            raise IndexLoadError(f"{d} has index format {version}, this version reads {FORMAT_VERSION}: rebuild it")
        if expected_model_id is not None and model_id != expected_model_id:
            raise IndexLoadError(f"index {d} was built by model {model_id}, this model is {expected_model_id}: "
                                 "rebuild it with `item-embed index`")
        for name in DATA_FILES:
            path = d / name
            if name not in files:
                raise IndexLoadError(f"{d / MANIFEST_FILE} lists no checksum for {name}: rebuild the index")
            if not path.is_file():
                raise IndexLoadError(f"{path} is missing: the index is incomplete, rebuild it")
            if path.stat().st_size != files[name]["bytes"]:
                raise IndexLoadError(f"{path} has {path.stat().st_size} bytes, the manifest says "
                                     f"{files[name]['bytes']}: truncated or replaced, rebuild the index")
            if sha256_file(path) != files[name]["sha256"]:
                raise IndexLoadError(f"{path} fails its sha256 checksum: corrupted, rebuild the index")
        try:
            index = faiss.read_index(str(d / INDEX_FILE))
            table = pd.read_parquet(d / IDS_FILE)
            metadata = pd.read_parquet(d / METADATA_FILE)
        except Exception as e:  # the checksums matched, so this is a writer/reader mismatch
            raise IndexLoadError(f"{d}: cannot read the index files ({e})") from None
        held = _faiss_kind(index)
        if held != manifest["kind"]:
            raise IndexLoadError(f"{d}: {MANIFEST_FILE} says kind {manifest['kind']!r} but {INDEX_FILE} holds "
                                 f"{'kind ' + repr(held) if held else 'an index of no known kind'} "
                                 f"({type(index).__name__}): the files do not belong together, rebuild the index "
                                 "with `item-embed index`")
        if not len(metadata.columns):
            # Parquet keeps no row count for a table without columns.
            metadata = pd.DataFrame(index=range(len(table)))
        tombstones = manifest.get("tombstones", [])
        problems = []
        if index.d != dim:
            problems.append(f"FAISS index has dimension {index.d}, manifest {dim}")
        if not (len(table) == len(metadata) == count == index.ntotal - len(tombstones)):
            problems.append(f"counts disagree: manifest {count}, ids {len(table)}, metadata {len(metadata)}, "
                            f"FAISS {index.ntotal} minus {len(tombstones)} removed")
        if problems:
            raise IndexLoadError(f"{d} is inconsistent ({'; '.join(problems)}): rebuild it with `item-embed index`")
        return cls(index, table["id"].astype(str).tolist(), table["label"].to_numpy(), metadata, manifest, tombstones)
