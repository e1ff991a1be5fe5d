"""``embed --engine ray``: a catalog's embeddings from a pool of Ray actors, one model load each.

The work is a Ray Data pipeline of two stages:

- **read**: one read task streams the catalog's raw rows with the catalog's own reader
  (:meth:`Catalog.iter_parts`: CSV/TSV, JSON(L), Parquet, a URI, WebDataset shards), one block per
  chunk of ``4 * batch_size`` rows, its rows numbered as in the catalog. Ray's own readers would
  read the same file differently (CSV type inference turns id ``007`` into 7, one bad line fails
  the whole file, no row numbers), so the rows and their reasons would differ from ``embed``'s.
  A local catalog is read on the driver's node; images stay as the paths/URIs/bytes of the rows.
- **encode**: ``map_batches`` with a callable class on ``actors`` actors (a fixed pool), each
  loading the model once and, per chunk, applying the catalog's row check
  (``Catalog.submit_row``: ids, text, image fetch and decode, the same reasons) and
  :meth:`ItemEncoder.encode_batched`, the single-process path's batching.

The driver takes the chunks back in row order, decides duplicate ids with the single-process rule
(the first usable row with an id claims it), and writes the same committed parts, manifest and row
report as :func:`item_embed.embeddings.embed_catalog` (:mod:`item_embed.embed_parts`), so that
``index``, ``evaluate`` and ``dedup`` read the output as they read any other, and a rerun continues
after the last committed part. Ray itself is imported only here, on this path.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from . import embed_parts
from .data.catalog import Catalog, CatalogError, CatalogReport, Problem, Product
from .data.images import ImageLimits
from .data.remote import is_remote
from .embed_parts import PART_ROWS

MISSING_RAY = "--engine ray needs Ray Data, an optional extra: pip install 'item-embed[ray]'"
LOCAL_OBJECT_STORE = 512 * 1024**2  # the local Ray's shared memory: chunks in flight, not the catalog
POOL_START_TIMEOUT = 1800  # seconds for every actor to be up (a cluster's autoscaler may add nodes)


def import_ray():
    """The ``ray`` module with Ray Data, or a ValueError telling how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{MISSING_RAY} ({e})") from None
    return ray


# ------------------------------------------------------------------ the driver


@dataclass
class RayPlan:
    """Where and how the actors run (resolved once Ray is up)."""

    actors: int
    cpus: float  # Ray CPUs reserved by each actor; its torch and decode threads
    gpus: float
    device: str
    precision: str  # resolved: bf16 or fp32

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


@dataclass
class ModelInfo:
    """What the output records about the model (``embed_parts.fingerprint``, ``embedding_metadata``):
    read in the driver, which never encodes."""

    model_id: str
    cfg: Any
    dim: int
    precision: str

    @classmethod
    def load(cls, run_dir: str | Path) -> "ModelInfo":
        from .encode import ItemEncoder

        enc = ItemEncoder.from_pretrained(run_dir, device="cpu", precision="fp32")
        return cls(enc.model_id, enc.cfg, enc.dim, enc.precision)


class RaySession:
    """``with RaySession(address, ...)``: join the cluster at ``address``, or (None) start a local Ray on
    this machine, quietly, shut down on exit. An already initialised Ray (``ray.init`` by the caller)
    is used as it is and left running."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address, self.num_cpus = address, num_cpus
        self.started = False
        self.local = address is None

    def __enter__(self) -> "RaySession":
        ray = import_ray()
        if ray.is_initialized():
            self.local = False  # the caller's Ray: resolve what depends on the hardware there
            return self
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if self.address is None:
            ray.init(address="local", num_cpus=self.num_cpus, object_store_memory=LOCAL_OBJECT_STORE, **quiet)
        else:
            ray.init(address=self.address, **quiet)
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def plan_actors(actors: int | None, device: str | None, precision: str, local: bool) -> RayPlan:
    """Resources per actor from the running Ray: the CPUs (and GPUs) shared evenly among ``actors``.

    ``actors`` None: one per GPU when encoding on GPUs, else one per 4 CPUs (at least 1). ``device``
    None: cuda when the cluster has GPUs. ``precision`` auto is resolved on the actors' hardware
    (here for a local Ray, by a probe task on a cluster)."""
    import ray

    from .runtime import resolve_precision

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    device = device or ("cuda" if gpus >= 1 else "cpu")
    cuda = device.startswith("cuda")
    if cuda and gpus <= 0:
        raise ValueError(f"--device {device}: the Ray cluster has no GPUs")
    if actors is None:
        actors = int(gpus) if cuda else max(1, cpus // 4)
    if actors < 1:
        raise ValueError(f"--actors must be >= 1, not {actors}")
    per_gpu = min(1.0, gpus / actors) if cuda else 0.0
    per_cpu = float(max(1, cpus // actors))
    if precision == "auto":
        if local:
            precision = resolve_precision("auto", "cuda" if cuda else "cpu")
        else:
            probe = ray.remote(resolve_precision).options(num_cpus=per_cpu, num_gpus=per_gpu)
            precision = ray.get(probe.remote("auto", "cuda" if cuda else "cpu"))
    else:
        precision = resolve_precision(precision, "cpu")  # validates the name; bf16/fp32 stay as given
    return RayPlan(actors, per_cpu, per_gpu, device, precision)


def embed_catalog_ray(catalog: Catalog, model: str | Path, out: str | Path, batch_size: int = 64,
                      strict: bool = False, report: CatalogReport | None = None, progress: bool = True, *,
                      resume: bool = False, part_rows: int = PART_ROWS, precision: str = "auto",
                      device: str | None = None, address: str | None = None, actors: int | None = None,
                      stats: dict[str, float] | None = None) -> int:
    """:func:`item_embed.embeddings.embed_catalog` on Ray: the same output (a ``.parquet`` file or a
    folder of committed parts + manifest + report), the same row report, the same rows reported.

    ``model``: the run folder (each actor loads it, so on a cluster it must be at this path on every
    node, as must relative image paths; the catalog rows are read on this node). ``address``: the
    Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None starts a local Ray here
    and stops it at the end (an already initialised Ray is used as it is). ``actors``: the pool
    size (see :func:`plan_actors`). ``stats``, when given, receives seconds from the call to Ray being up
    (``ray_start``), to the first chunk back (``first_chunk``: the pool's start-up and model loads come
    before it), to every actor being up (``pool_ready``: started, model loaded), to each chunk back
    (``chunks``: [(seconds, rows, the actor's host:pid)]) and to the end
    (``done``), and the plan (``actors``, ``threads``, ``precision``). Returns the products written.
    """
    from .embeddings import (aligned_part_rows, copy_report, embedding_metadata, finished_output, is_single_file,
                             join_parts, read_embedding_table, report_beside, work_folder)

    t0 = time.perf_counter()
    stats = stats if stats is not None else {}
    import_ray()  # before any work: a clear message when the extra is missing
    report = report if report is not None else CatalogReport()
    out = Path(out)
    single = is_single_file(out)
    folder = work_folder(out) if single else out
    if single and resume and not folder.exists() and out.is_file():
        copy_report(report, embed_parts.read_report(report_beside(out)))  # finished and joined already
        return read_embedding_table(out).num_rows
    info = ModelInfo.load(model)
    part_rows = aligned_part_rows(part_rows, batch_size)
    with RaySession(address, num_cpus=max(_cores(), actors or 1)) as session:
        stats["ray_start"] = time.perf_counter() - t0
        plan = plan_actors(actors, device, precision, session.local)
        stats.update(actors=plan.actors, threads=plan.threads, precision=plan.precision)
        info.precision = plan.precision
        fp = embed_parts.fingerprint(catalog, info, batch_size, part_rows, 1)
        metadata = embedding_metadata(info, catalog)
        joining = single and embed_parts.finished(folder, fp)
        state = embed_parts.prepare_folder(folder, fp, resume or joining)
        if state == "done":
            return finished_output(folder, out, joining, metadata, report)
        if state == "resume" and progress:
            print(f"continuing the unfinished embedding run in {folder}")
        share, records = _embed_share(catalog, str(model), plan, info, folder, batch_size, strict, progress,
                                      part_rows, metadata, stats, t0)
    copy_report(report, share)
    if report.used == 0:
        raise ValueError(f"no usable products in {catalog.source}: nothing to embed")
    embed_parts.finish(folder, fp, records, report)
    stats["done"] = time.perf_counter() - t0
    if not single:
        return report.used
    return join_parts(folder, out, metadata, report)


def row_checker(catalog: Catalog) -> Catalog:
    """A catalog without rows, with ``catalog``'s columns, image root and fetch options: what an actor
    needs to check rows as ``catalog`` does (sent to each actor instead of the catalog itself)."""
    return Catalog(pd.DataFrame(columns=catalog.column_names), catalog.columns, catalog.image_root, catalog.source,
                   fetch=catalog.fetch)


def _cores() -> int:
    """The cores this process may use (its affinity, where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _committed_prefix(folder: Path, part_rows: int, report: CatalogReport, seen: dict[str, int]
                      ) -> tuple[list[dict], int, bool]:
    """The parts already committed, in order: (their records, the row after them, whether they end
    the catalog); their reports go to ``report`` and the ids their rows claimed to ``seen``."""
    records: list[dict] = []
    start = 0
    while True:
        record = embed_parts.load_record(folder, len(records))
        if record is None or record["row_start"] != start:
            return records, start, False
        records.append(record)
        embed_parts.add_report(report, record["report"])
        seen.update(embed_parts.claimed_ids(folder, record))
        start = record["row_stop"]
        if record["row_stop"] - record["row_start"] < part_rows:
            return records, start, True  # the catalog's last part: nothing after it


class _Done:
    """A product the actors embedded, as the part writer needs it (row, id, which modalities)."""

    __slots__ = ("id", "image", "row", "text")

    def __init__(self, row: int, pid: str, has_text: bool, has_image: bool) -> None:
        self.row, self.id = row, pid
        self.text, self.image = (True if has_text else None), (True if has_image else None)


def _embed_share(catalog: Catalog, model: str, plan: RayPlan, info: ModelInfo, folder: Path, batch_size: int,
                 strict: bool, progress: bool, part_rows: int, metadata: dict[bytes, bytes], stats: dict,
                 t0: float) -> tuple[CatalogReport, list[dict]]:
    """``embed_parts.embed_share`` (one process's share: the whole catalog) with the row checks and
    the encoding done by the actors; the parts and their records are the same."""
    from .embeddings import embedding_table

    report = CatalogReport(source=catalog.source)
    seen: dict[str, int] = {}
    records, start, ended = _committed_prefix(folder, part_rows, report, seen)
    committed_problems = len(report.problems)
    n = catalog.known_len()
    if ended or (n is not None and start >= n):
        return report, records  # every row is in a committed part: no actors to start
    writer: embed_parts.PartWriter | None = None
    carried = catalog.extra_columns

    def commit(row_stop: int) -> None:
        nonlocal committed_problems
        mine = [p for p in report.problems[committed_problems:] if p.row < row_stop]
        committed_problems += len(mine)
        records.append(writer.commit(row_stop, mine))

    last_row = start - 1
    with tqdm(total=n, initial=start, disable=not progress, desc="embed (ray)", dynamic_ncols=True) as bar:
        for rows, items, vectors, _ in _run_pipeline(catalog, model, plan, batch_size, start, stats, t0):
            bar.update(len(rows))
            products, keep = [], []  # the products written, the rows of ``vectors`` they have
            embedded = 0
            for item in items:  # duplicates and accounting in row order, as Catalog._collect
                report.rows_in += 1
                if isinstance(item, _Done):
                    embedded += 1
                    first = seen.get(item.id)
                    if first is None:
                        seen[item.id] = item.row
                        report.used += 1
                        report.text_only += item.image is None
                        report.image_only += item.text is None
                        products.append(item)
                        keep.append(embedded - 1)
                        continue
                    # Embedded by the actor, which cannot see earlier chunks' ids: dropped here.
                    item = Problem(item.row, item.id, f"duplicate id: first seen at row {first}")
                if strict:
                    raise CatalogError(f"{catalog.source}: {item}")
                report.problems.append(item)
            vectors = vectors[keep] if len(keep) != embedded else vectors
            part_of = rows.index.to_numpy() // part_rows
            for index in np.unique(part_of):  # a chunk never straddles parts (aligned), but be general
                part = rows.loc[rows.index[part_of == index]]
                lo, hi = int(part.index[0]), int(part.index[-1])
                mine = [i for i, p in enumerate(products) if lo <= p.row <= hi]
                if writer is not None and writer.index != index:
                    commit(writer.row_start + part_rows)
                    writer = None
                if writer is None:
                    writer = embed_parts.PartWriter(folder, int(index), int(index) * part_rows, metadata)
                if mine:
                    chosen = [products[i] for i in mine]
                    writer.add(embedding_table(part, chosen, carried, vectors[mine], info.dim), chosen)
                last_row = hi
        if writer is not None:
            commit(last_row + 1)
    return report, records


def _run_pipeline(catalog: Catalog, model: str, plan: RayPlan, batch_size: int, start: int, stats: dict,
                  t0: float) -> Iterator[tuple[pd.DataFrame, list, np.ndarray, str]]:
    """(raw carried columns indexed by row, each row's ``_Done`` or ``Problem``, the vectors of the
    ``_Done`` rows, the actor) per chunk of rows from ``start``, in row order."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    # One chunk per block (so that chunks go to the actors one at a time); no chunk before every actor
    # is up (else the first one up takes the first chunks; on a cluster too small for the pool, a
    # timeout that says so rather than a wait without end); outputs in input order; no progress bars
    # of Ray's own. The Dataset keeps a copy of the context: restored once it is made.
    settings = {"target_max_block_size": 1, "wait_for_min_actors_s": POOL_START_TIMEOUT,
                "enable_progress_bars": False, "print_on_execution_start": False}
    saved = {k: getattr(ctx, k) for k in settings if hasattr(ctx, k)}
    saved_order = ctx.execution_options.preserve_order
    for k in saved:
        setattr(ctx, k, settings[k])
    ctx.execution_options.preserve_order = True
    try:
        chunk = batch_size * 4
        local = not is_remote(catalog.location)
        ds = ray.data.read_datasource(_datasource_class()(catalog, start, chunk, local), num_cpus=0)
        ds = ds.map_batches(
            _ChunkEncoder, batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.cpus, num_gpus=plan.gpus or None,
            fn_constructor_kwargs=dict(model=model, device=plan.device, precision=plan.precision,
                                       batch_size=batch_size, threads=plan.threads, checker=row_checker(catalog),
                                       carried=catalog.extra_columns))
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = saved_order
    waiting: dict[int, bytes] = {}
    expected = start
    wall0 = time.time() - (time.perf_counter() - t0)  # the call's start on the wall clock
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # Ray Data's notices of execution start, end and disabled bars
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for first, blob in zip(batch.column("first").to_pylist(), batch.column("result").to_pylist()):
                waiting[first] = blob
            while expected in waiting:  # in row order (preserve_order makes this immediate)
                result = pickle.loads(waiting.pop(expected))
                if isinstance(result, _Failure):
                    result.raise_it()
                rows, items, vectors, worker, ready = result
                now = time.perf_counter() - t0
                stats.setdefault("first_chunk", now)
                stats.setdefault("chunks", []).append((now, len(rows), worker))
                # The pool was up when its last actor was (a wall clock: the actors' own, here).
                stats["pool_ready"] = max(stats.get("pool_ready", 0.0), ready - wall0)
                expected = int(rows.index[-1]) + 1
                yield rows, items, vectors, worker
    finally:
        data_log.setLevel(level)
    if waiting:
        raise AssertionError(f"chunks from rows {sorted(waiting)} came back without the rows before them")


@functools.cache
def _datasource_class():
    """The Ray Data datasource class (made on first use: ``ray`` is imported only on this path)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class CatalogRows(Datasource):
        """The catalog's raw rows from ``start``, one block per chunk: ``first`` (its first row number)
        and ``rows`` (the pickled DataFrame, indexed by row number: values exactly as read)."""

        def __init__(self, catalog: Catalog, start: int, chunk: int, local: bool) -> None:
            super().__init__()
            self.catalog, self.start, self.chunk, self.local = catalog, start, chunk, local

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        @property
        def supports_distributed_reads(self) -> bool:
            return not self.local  # a local file is read on the driver's node

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            catalog, start, chunk = self.catalog, self.start, self.chunk

            def read() -> Iterator[pa.Table]:
                for part in catalog.iter_parts(start, None, chunk):
                    if len(part):
                        yield pa.table({"first": pa.array([int(part.index[0])], pa.int64()),
                                        "rows": pa.array([pickle.dumps(part, protocol=5)], pa.binary())})

            try:
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            except TypeError:  # older Ray Data: the schema was a field of the metadata
                meta = BlockMetadata(num_rows=None, size_bytes=None, schema=None, input_files=None,
                                     exec_stats=None)
            return [ReadTask(read, meta)]

    return CatalogRows


@dataclass
class _Failure:
    """What an actor sends back instead of a chunk when it cannot work: the driver raises it, in one
    line (Ray's own errors bury the cause in pages of remote traceback)."""

    what: str  # "load" (the model: a user error, e.g. a path missing on that node) or "chunk"
    node: str
    error: str
    trace: str = ""

    def raise_it(self) -> None:
        if self.what == "load":
            raise ValueError(f"--engine ray: an actor on {self.node} could not load the model: {self.error}")
        raise RuntimeError(f"--engine ray: an actor on {self.node} failed on a chunk: {self.error}\n{self.trace}")


class _ChunkEncoder:
    """The actor: loads the model once, then per chunk checks the rows as ``Catalog`` does and encodes
    the usable ones with the single-process batching."""

    def __init__(self, model: str, device: str, precision: str, batch_size: int, threads: int, checker: Catalog,
                 carried: list[str]) -> None:
        import socket

        import torch

        from .encode import ItemEncoder

        self.node, self.failure = socket.gethostname(), None
        self.worker = f"{self.node}:{os.getpid()}"
        torch.set_num_threads(threads)  # the actor's share of the node, not every core
        try:
            self.encoder = ItemEncoder.from_pretrained(model, device=device, precision=precision)
        except Exception as e:  # noqa: BLE001 - any failure is reported with the first chunk, see _Failure
            self.failure = _Failure("load", self.node, f"{type(e).__name__}: {e}")
        self.checker, self.carried, self.batch_size = checker, carried, batch_size
        self.limits = ImageLimits()
        self.decode = ThreadPoolExecutor(max_workers=threads)
        self.fetch: list[ThreadPoolExecutor] = []  # the catalog's fetch pool, started on a remote image
        self.ready = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [pickle.dumps(self._result(blob), protocol=5) for blob in batch.column("rows").to_pylist()]
        return pa.table({"first": batch.column("first"), "result": pa.array(results, pa.binary())})

    def _result(self, blob: bytes) -> tuple | _Failure:
        if self.failure is not None:
            return self.failure
        try:
            return self.embed(pickle.loads(blob))
        except Exception as e:  # noqa: BLE001 - sent to the driver with its traceback
            import traceback

            return _Failure("chunk", self.node, f"{type(e).__name__}: {e}", traceback.format_exc())

    def embed(self, part: pd.DataFrame) -> tuple[pd.DataFrame, list, np.ndarray, str, float]:
        cfg = self.encoder.cfg
        jobs = [self.checker.submit_row(row, rec, cfg.image_size, cfg.use_description, self.limits, self.decode,
                                         self.fetch)
                for row, rec in zip(part.index, part.to_dict("records"))]
        checked = [job.result() for job in jobs]
        products = [p for p in checked if isinstance(p, Product)]
        vectors = self.encoder.encode_batched(products, self.batch_size)
        items = [_Done(p.row, p.id, p.text is not None, p.image is not None) if isinstance(p, Product) else p
                 for p in checked]
        return part[self.carried], items, vectors, self.worker, self.ready

