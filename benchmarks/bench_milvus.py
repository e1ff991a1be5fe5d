"""Milvus Lite vs FAISS as the search backend: build time, queries/s and recall@10, side by side, at 100k.

Systems, on the same unit vectors, metadata and queries:
- FAISS flat (``ProductIndex`` kind flat): exact, the reference for recall;
- FAISS HNSW (``ProductIndex`` kind hnsw, the library's M=32, efConstruction=40, efSearch=64);
- Milvus Lite HNSW (``MilvusIndex`` kind hnsw, the same M / efConstruction / ef), embedded in this
  process (``--uri BENCH.db``): inserts over its local gRPC adapter, FAISS HNSW per segment inside;
- Milvus Lite FLAT (``MilvusIndex`` kind flat): exact brute force inside Milvus Lite.
Each is timed on query batches of 100 and on single queries; recall@10 counts a returned product when
its score reaches the exact 10th score. A filtered row searches with ``category == "c3"`` (10% of the
products pass): FAISS filtered search is exact by construction; Milvus's is approximate (its beam is
widened by 1/share, see ``MilvusIndex._search_params``) and its recall is against the exact filtered top-10.

Vectors: random unit vectors (384-d) by default, the hard case for HNSW; ``--embeddings FILE`` uses
an embedding file instead (rows beyond --n dropped; queries are held-out rows of the same file).

    python benchmarks/bench_milvus.py [--n 100000] [--queries 1000] [--embeddings FILE] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.index.product_index import ProductIndex  # noqa: E402

K = 10
BATCH = 100
FILTER = 'category == "c3"'


def data(n: int, queries: int, dim: int, embeddings: str | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    if embeddings:
        from item_embed.embeddings import read_embeddings

        frame, x = read_embeddings(embeddings)
        x = np.asarray(x, dtype=np.float32)
        if len(x) < queries + 100:
            raise SystemExit(f"{embeddings} has {len(x)} rows: too few for {queries} held-out queries")
        order = rng.permutation(len(x))
        q, x = x[order[:queries]], x[order[queries:][:n]]
        source = f"{embeddings} ({len(x)} indexed + {queries} held-out queries, {x.shape[1]}-d)"
    else:
        x = rng.standard_normal((n + queries, dim), dtype=np.float32)
        q, x = x[:queries], x[queries:]
        source = f"random unit vectors ({n} x {dim}, {queries} more as queries)"
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    meta = pd.DataFrame({"category": [f"c{i % 10}" for i in range(len(x))],
                         "price": rng.uniform(0, 100, len(x)).round(2)})
    return x, [f"p{i}" for i in range(len(x))], meta, q, source


def run_queries(index, q: np.ndarray, batch: int, filter=None) -> tuple[float, list[list]]:
    """(queries/s, hits) over all of ``q`` in batches of ``batch`` (batch 1: single queries)."""
    hits: list[list] = []
    t0 = time.perf_counter()
    for s in range(0, len(q), batch):
        hits += index.search(q[s : s + batch], K, filter=filter)
    return len(q) / (time.perf_counter() - t0), hits


def recall(hits, exact_hits) -> float:
    found = total = 0
    for got, want in zip(hits, exact_hits):
        if not want:
            continue
        kth = want[-1].score - 1e-5
        found += sum(1 for h in got[:K] if h.score >= kth)
        total += len(want)
    return found / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="indexed products")
    p.add_argument("--queries", type=int, default=1000, help="queries for batched runs (single: a fifth)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--embeddings", help="an embedding .parquet to use instead of random vectors")
    p.add_argument("--db", help="Milvus Lite database to build in (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="10k products, 200 queries (not for quoting)")
    p.add_argument("--no-results", action="store_true", help="print only; do not update RESULTS.md")
    a = p.parse_args()
    if a.quick:
        a.n, a.queries = 10_000, 200

    from item_embed.index.milvus_index import MilvusIndex

    x, ids, meta, q, source = data(a.n, a.queries, a.dim, a.embeddings)
    single = q[: max(20, len(q) // 5)]
    filtered_q = q[: max(20, len(q) // 5)]
    tmp = tempfile.TemporaryDirectory(prefix="bench_milvus_")
    db = a.db or str(Path(tmp.name) / "bench.db")
    load_start = C.loadavg()
    _, quiet = C.wait_for_quiet(1.5, 0)
    t_all = time.perf_counter()
    rows = []

    t0 = time.perf_counter()
    exact = ProductIndex.build(x, ids, meta, "bench", "cfg", "flat")
    exact_build = time.perf_counter() - t0
    qps_b, exact_hits = run_queries(exact, q, BATCH)
    qps_1, _ = run_queries(exact, single, 1)
    qps_f, exact_filtered = run_queries(exact, filtered_q, BATCH, FILTER)
    rows.append(["FAISS flat (exact)", f"{exact_build:.1f}", f"{qps_b:,.0f}", f"{qps_1:,.0f}", "1.000",
                 f"{qps_f:,.0f}", "1.000"])
    print(rows[-1], flush=True)

    systems = [
        ("FAISS HNSW", lambda: ProductIndex.build(x, ids, meta, "bench", "cfg", "hnsw")),
        ("Milvus Lite HNSW", lambda: MilvusIndex.build(x, ids, meta, "bench", "cfg", uri=db, collection="bench_hnsw",
                                                       kind="hnsw", check_recall=False)),
        ("Milvus Lite FLAT", lambda: MilvusIndex.build(x, ids, meta, "bench", "cfg", uri=db, collection="bench_flat",
                                                       kind="flat")),
    ]
    for name, build in systems:
        gc.collect()
        t0 = time.perf_counter()
        index = build()
        seconds = time.perf_counter() - t0
        qps_b, hits = run_queries(index, q, BATCH)
        qps_1, _ = run_queries(index, single, 1)
        qps_f, fhits = run_queries(index, filtered_q, BATCH, FILTER)
        rows.append([name, f"{seconds:.1f}", f"{qps_b:,.0f}", f"{qps_1:,.0f}", f"{recall(hits, exact_hits):.3f}",
                     f"{qps_f:,.0f}", f"{recall(fhits, exact_filtered):.3f}"])
        print(rows[-1], flush=True)
        del index
    wall = time.perf_counter() - t_all
    headers = ["system", "build s", f"q/s (batches of {BATCH})", "q/s (single)", "recall@10",
               f"q/s filtered ({FILTER}, 10%)", "filtered recall@10"]
    print()
    print(C.text_table(headers, rows))
    print()
    print(C.run_context(load_start, C.loadavg(), quiet, wall))
    print(f"- Data: {source}; {len(q)} batched queries, {len(single)} single, {len(filtered_q)} filtered")
    body = (f"{C.run_context(load_start, C.loadavg(), quiet, wall)}\n"
            f"- Data: {source}; {len(q)} batched queries, {len(single)} single, {len(filtered_q)} filtered. "
            "Recall@10 against FAISS flat (exact); filtered recall against the exact filtered top-10.\n\n"
            f"{C.markdown_table(headers, rows)}")
    print()
    print(body)
    if not (a.no_results or a.quick):
        C.update_results("bench_milvus", "Milvus Lite vs FAISS as the search backend (bench_milvus.py)", body)
    tmp.cleanup()


if __name__ == "__main__":
    main()
