"""Subcommands ``index``, ``index-update``, ``search`` and ``dedup``: thin layers over ``index``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .common import add_command, add_device_arg, add_precision_arg
from ..index.product_index import (KINDS, REPORT_FILE, UPDATE_REPORT_FILE, IndexReport, ProductIndex,
                                   read_embedding_rows)


def _print_recall(manifest: dict) -> None:
    recall = manifest.get("recall_at_10")
    if recall:
        print(f"recall@{recall['k']} vs exact search: {recall['recall']:.4f} "
              f"({recall['queries']} queries over {recall['count']} products)")


def cmd_index(a: argparse.Namespace) -> int:
    options = {"nlist": a.nlist, "nprobe": a.nprobe, "ef_search": a.ef_search}
    report = IndexReport()
    index = ProductIndex.from_embedding_file(a.embeddings, kind=a.kind, strict=a.strict, report=report, **options)
    report.check_accounting()
    # The report goes into the index folder in the same atomic swap as the index it describes.
    index.save(a.out, extra_files={REPORT_FILE: report.to_json()})
    opts = ", ".join(f"{k}={v}" for k, v in index.manifest["options"].items())
    print(f"indexed {len(index)} products: dim {index.dim}, kind {index.kind}" + (f" ({opts})" if opts else ""))
    _print_recall(index.manifest)
    print(f"index: {a.out}")
    print(report.summary())
    print(f"row report: {Path(a.out) / REPORT_FILE}")
    return 0


def cmd_index_update(a: argparse.Namespace) -> int:
    from ..embeddings import read_embedding_metadata

    if not a.add and not a.remove:
        raise ValueError("nothing to do: give --add EMB.parquet and/or --remove ID ...")
    index = ProductIndex.load(a.index)
    before = len(index)
    if a.remove:
        index.remove(a.remove)
    report = None
    if a.add:
        model_id = read_embedding_metadata(a.add).get("model_id")
        if model_id != index.model_id:
            raise ValueError(f"{a.add} was embedded by model {model_id}, the index by {index.model_id}: "
                             "re-embed it with the index's model, or rebuild the index")
        # Unusable rows are skipped and reported, as when the index was built (--strict: refused).
        frame, emb, report = read_embedding_rows(a.add, strict=a.strict, report=IndexReport())
        report.check_accounting()
        if not len(frame):
            raise ValueError(f"no usable rows in {a.add}: all {report.rows_in} were reported\n{report.summary()}")
        index.add(frame["id"], emb, frame.drop(columns=["id"]))
    # This update's report goes into the folder in the same atomic swap as the index it changed; the
    # build's report (and the last update's, when nothing is added) stays.
    if report is None:
        index.save(a.index, keep_files=(REPORT_FILE, UPDATE_REPORT_FILE))
    else:
        index.save(a.index, extra_files={UPDATE_REPORT_FILE: report.to_json()}, keep_files=(REPORT_FILE,))
    removed = len(a.remove or [])
    print(f"removed {removed}, added {len(index) - before + removed}: {len(index)} products in {a.index}")
    if report is not None:
        print(report.summary())
        print(f"row report: {Path(a.index) / UPDATE_REPORT_FILE}")
    tombstones = len(index.manifest.get("tombstones", []))
    if tombstones > 0.2 * max(len(index), 1):
        print(f"note: {tombstones} removed products still sit in the HNSW graph; rebuild with `item-embed index` "
              "to reclaim their space and speed")
    return 0


def _hits_frame(index: ProductIndex, hits) -> pd.DataFrame:
    meta = index.metadata.iloc[[h.row for h in hits]].reset_index(drop=True)
    head = pd.DataFrame({"rank": range(1, len(hits) + 1), "id": [h.id for h in hits],
                         "score": [h.score for h in hits]})
    return pd.concat([head, meta.drop(columns=[c for c in head if c in meta])], axis=1)


def cmd_search(a: argparse.Namespace) -> int:
    if a.image is None and a.title is None and a.id is None:
        raise ValueError("give a query: --image, --title (or both), or --id")
    if a.id is not None and (a.image is not None or a.title is not None):
        raise ValueError("--id searches with an indexed product's own vector: "
                         "it cannot be combined with --image/--title")
    encoder = None
    if a.model:
        from ..encode import ItemEncoder

        encoder = ItemEncoder.from_pretrained(a.model, device=a.device, precision=a.precision)
    elif a.id is None:
        raise ValueError("--model is needed to embed an --image or --title query")
    # An index from another model lives in another vector space: its scores would be meaningless.
    index = ProductIndex.load(a.index, expected_model_id=encoder.model_id if encoder else None)
    if a.id is not None:
        hits = index.search_id(a.id, a.k)
    else:
        if a.image is not None and not Path(a.image).is_file():
            raise FileNotFoundError(f"no image file {a.image}")
        query = encoder.encode([{"id": "query", "image": a.image, "title": a.title}])
        hits = index.search(query, a.k)[0]
    table = _hits_frame(index, hits)
    if a.json:
        results = json.loads(table.to_json(orient="records"))  # NaN -> null, numpy -> Python types
        print(json.dumps({"query": {"image": a.image, "title": a.title, "id": a.id}, "index": str(a.index),
                          "model_id": index.model_id, "precision": encoder.precision if encoder else None,
                          "k": a.k, "results": results}, indent=2))
        return 0
    titles = table["title"].fillna("") if "title" in table else pd.Series([""] * len(table))
    width = max([len(str(i)) for i in table["id"]] + [2])
    print(f"{'rank':>4}  {'id':<{width}}  {'score':>7}  title")
    for rank, pid, score, title in zip(table["rank"], table["id"], table["score"], titles):
        print(f"{rank:>4}  {pid:<{width}}  {score:>7.4f}  {title}")
    return 0


def _pair_line(m: dict) -> str:
    return (f"pair precision {m['precision']:.4f}  recall {m['recall']:.4f}  F1 {m['f1']:.4f}  "
            f"({m['correct_pairs']} of {m['predicted_pairs']} predicted pairs correct, {m['true_pairs']} true pairs)")


def cmd_dedup(a: argparse.Namespace) -> int:
    from ..index.dedup import DEFAULT_THRESHOLDS, duplicate_groups, pair_metrics, suggest_threshold, sweep
    from ..embeddings import read_embeddings

    frame, emb = read_embeddings(a.embeddings)
    if a.group is not None and a.group not in frame:
        raise ValueError(f"{a.embeddings} has no column {a.group!r}")
    group = a.group or ("group" if "group" in frame else None)
    ids = frame["id"].astype(str).to_numpy()
    threshold = a.threshold
    if a.sweep:
        if group is None:
            raise ValueError("--sweep needs a ground-truth group column: give --group COL")
        results = sweep(emb, ids, frame[group], DEFAULT_THRESHOLDS, k=a.k)
        print(f"{'threshold':>9}  {'precision':>9}  {'recall':>7}  {'F1':>7}  {'groups':>6}")
        for r in results:
            print(f"{r['threshold']:>9g}  {r['precision']:>9.4f}  {r['recall']:>7.4f}  {r['f1']:>7.4f}  "
                  f"{r['groups']:>6}")
        best = suggest_threshold(results)
        print(f"suggested threshold: {best:g} (best pair F1 against {group!r})")
        if threshold is None:
            threshold = best
    if threshold is None:
        raise ValueError("give --threshold T (cosine), or --sweep to choose one from the group column")
    labels = duplicate_groups(emb, ids, threshold, k=a.k)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "dup_group": labels}).to_csv(out, index=False)
    sizes = np.bincount(labels)
    print(f"threshold {threshold:.4f}, k {a.k}: {len(ids)} products, {int((sizes >= 2).sum())} duplicate groups "
          f"covering {int(sizes[sizes >= 2].sum())} products -> {out}")
    if group is not None:
        print(_pair_line(pair_metrics(labels, frame[group])) + f" against {group!r}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    i = add_command(sub, "index", "build a nearest-product index from an embedding file",
                    description="Every row of the embedding file is indexed or reported: rows in = rows indexed + "
                                   f"rows reported. The report is printed and written to OUT/{REPORT_FILE}.")
    i.add_argument("embeddings", help="embedding .parquet from `item-embed embed`")
    i.add_argument("--out", required=True, help="index folder (replaced atomically if it holds an index)")
    i.add_argument("--kind", choices=KINDS, default="flat",
                   help="flat: exact; hnsw: graph, fast, approximate; "
                        "ivf: clustered, needs >= 39 rows per list")
    i.add_argument("--nlist", type=int, help="ivf: number of lists (default ~4 sqrt(n))")
    i.add_argument("--nprobe", type=int, help="ivf: lists searched per query (more: better recall, slower)")
    i.add_argument("--ef-search", type=int, help="hnsw: search beam width (default 64; more: better recall, slower)")
    i.add_argument("--strict", action="store_true",
                   help="stop at the first unusable row (no id, duplicate id, missing/NaN/inf/all-zero embedding, "
                        "wrong dimension) instead of skipping it; skipped rows are listed in OUT/"
                        f"{REPORT_FILE}")
    i.set_defaults(func=cmd_index)

    u = add_command(sub, "index-update", "add or remove products in an index without rebuilding it",
                    description="Removals are applied before additions, so `--remove X --add new.parquet` "
                                   "replaces product X. The index is saved back atomically.")
    u.add_argument("index", help="index folder from `item-embed index`")
    u.add_argument("--add", metavar="EMB.parquet",
                   help="embedding file (same model) of products to add; unusable rows are skipped and "
                        f"reported (printed and written to INDEX/{UPDATE_REPORT_FILE})")
    u.add_argument("--strict", action="store_true",
                   help="refuse the whole update at the first unusable row of --add instead of skipping it")
    u.add_argument("--remove", nargs="+", metavar="ID", help="ids of products to remove")
    u.set_defaults(func=cmd_index_update)

    s = add_command(sub, "search", "nearest products to an image, a title, both, or an indexed product")
    s.add_argument("--index", required=True, help="index folder from `item-embed index`")
    s.add_argument("--model", help="run folder of the model that built the index (needed for --image/--title)")
    s.add_argument("--image", help="query image file")
    s.add_argument("--title", help="query title")
    s.add_argument("--id", help="query with an indexed product (itself excluded)")
    s.add_argument("-k", type=int, default=10, help="number of results")
    s.add_argument("--json", action="store_true", help="print the results as JSON, with every carried column")
    add_device_arg(s)
    add_precision_arg(s)
    s.set_defaults(func=cmd_search)

    d = add_command(sub, "dedup", "near-duplicate groups from the k-nearest-neighbour graph")
    d.add_argument("embeddings", help="embedding .parquet from `item-embed embed`")
    d.add_argument("--threshold", type=float, help="cosine at or above which neighbours are duplicates "
                                                   "(required unless --sweep, which suggests one)")
    d.add_argument("--out", required=True, help="output CSV with columns id,dup_group")
    d.add_argument("-k", "--k", type=int, default=10, help="neighbours linked per product")
    d.add_argument("--group",
                   help="ground-truth group column for pair precision/recall/F1 (default: `group` if present)")
    d.add_argument("--sweep", action="store_true",
                   help="print pair metrics for thresholds 0.50..0.999 and suggest one "
                        "(used when --threshold is not given)")
    d.set_defaults(func=cmd_dedup)
