"""Subcommands ``index``, ``index-update``, ``search`` and ``dedup``: thin layers over ``index``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .common import add_command, add_device_arg, add_precision_arg
from ..index.product_index import (KINDS, REPORT_FILE, UPDATE_REPORT_FILE, IndexReport, ProductIndex,
                                   read_embedding_rows)


BACKENDS = ("faiss", "milvus")
MILVUS_TOKEN_ENV = "MILVUS_TOKEN"


def check_backend(a: argparse.Namespace, folder_option: str, folder) -> None:
    """--backend faiss takes an index folder; milvus takes --uri and --collection instead."""
    if a.backend == "milvus":
        missing = [o for o, v in (("--uri", a.uri), ("--collection", a.collection)) if not v]
        if missing:
            raise ValueError(f"--backend milvus needs {' and '.join(missing)} (e.g. --uri ./products.db "
                             "--collection products)")
        if folder is not None:
            raise ValueError(f"{folder_option} is a FAISS index folder: with --backend milvus the index is "
                             "--uri and --collection")
        return
    given = [o for o, v in (("--uri", a.uri), ("--collection", a.collection)) if v]
    if given:
        raise ValueError(f"{' and '.join(given)} name a Milvus index: add --backend milvus")
    if folder is None:
        raise ValueError(f"give the index folder ({folder_option}), or --backend milvus --uri URI --collection NAME")


def _milvus_token() -> str | None:
    """A Milvus server's token from the environment (never a command-line option: those show in `ps`)."""
    return os.environ.get(MILVUS_TOKEN_ENV) or None


def _open_index(a: argparse.Namespace, folder, expected_model_id: str | None = None):
    if a.backend == "milvus":
        from ..index.milvus_index import MilvusIndex

        return MilvusIndex.open(a.uri, a.collection, expected_model_id, token=_milvus_token())
    return ProductIndex.load(folder, expected_model_id=expected_model_id)


def _index_label(a: argparse.Namespace, folder) -> str:
    if a.backend == "milvus":
        from ..index.milvus_index import shown_uri

        return f"Milvus collection {a.collection} at {shown_uri(a.uri)}"
    return str(folder)


def _write_report(path, report: IndexReport) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(report.to_json(), encoding="utf-8")
        print(f"row report: {path}")


def _print_recall(manifest: dict) -> None:
    recall = manifest.get("recall_at_10")
    if recall:
        print(f"recall@{recall['k']} vs exact search: {recall['recall']:.4f} "
              f"({recall['queries']} queries over {recall['count']} products)")


def _cmd_index_milvus(a: argparse.Namespace, options: dict) -> int:
    from ..index.milvus_index import DEFAULT_KIND, MilvusIndex

    report, notes = IndexReport(), []
    index = MilvusIndex.from_embedding_file(a.embeddings, uri=a.uri, collection=a.collection,
                                            kind=a.kind or DEFAULT_KIND, strict=a.strict, report=report,
                                            token=_milvus_token(), notes=notes, **options)
    report.check_accounting()
    for note in notes:
        print(f"note: {note}")
    manifest = index.manifest
    opts = ", ".join(f"{k}={v}" for k, v in manifest["options"].items())
    print(f"indexed {report.indexed} products into {_index_label(a, None)}: dim {index.dim}, kind {index.kind} "
          f"(Milvus {manifest['index_type']}" + (f", {opts}" if opts else "") + f"), {manifest['build_seconds']:.1f}s")
    _print_recall(manifest)
    print(report.summary())
    _write_report(a.report, report)
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    options = {"nlist": a.nlist, "nprobe": a.nprobe, "ef_search": a.ef_search}
    check_backend(a, "--out", a.out)
    if a.backend == "milvus":
        return _cmd_index_milvus(a, options)
    report = IndexReport()
    index = ProductIndex.from_embedding_file(a.embeddings, kind=a.kind or "flat", strict=a.strict, report=report,
                                             **options)
    report.check_accounting()
    # The report goes into the index folder in the same atomic swap as the index it describes.
    index.save(a.out, extra_files={REPORT_FILE: report.to_json()})
    opts = ", ".join(f"{k}={v}" for k, v in index.manifest["options"].items())
    print(f"indexed {len(index)} products: dim {index.dim}, kind {index.kind}" + (f" ({opts})" if opts else ""))
    _print_recall(index.manifest)
    print(f"index: {a.out}")
    print(report.summary())
    print(f"row report: {Path(a.out) / REPORT_FILE}")
    _write_report(a.report, report)
    return 0


def cmd_index_update(a: argparse.Namespace) -> int:
    if not a.add and not a.remove:
        raise ValueError("nothing to do: give --add EMB.parquet and/or --remove ID ...")
    check_backend(a, "INDEX", a.index)
    if a.backend == "milvus":
        return _cmd_index_update_milvus(a)
    index = ProductIndex.load(a.index)
    before = len(index)
    if a.remove:
        index.remove(a.remove)
    report = None
    if a.add:
        frame, emb, report = _rows_to_add(a, index)
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
        _write_report(a.report, report)
    tombstones = len(index.manifest.get("tombstones", []))
    if tombstones > 0.2 * max(len(index), 1):
        print(f"note: {tombstones} removed products still sit in the HNSW graph; rebuild with `item-embed index` "
              "to reclaim their space and speed")
    return 0


def _rows_to_add(a: argparse.Namespace, index):
    """The usable rows of ``--add`` (an embedding file of the index's model); unusable ones are skipped
    and reported, as when the index was built (--strict: refused)."""
    from ..embeddings import read_embedding_metadata

    model_id = read_embedding_metadata(a.add).get("model_id")
    if model_id != index.model_id:
        raise ValueError(f"{a.add} was embedded by model {model_id}, the index by {index.model_id}: "
                         "re-embed it with the index's model, or rebuild the index")
    frame, emb, report = read_embedding_rows(a.add, strict=a.strict, report=IndexReport())
    report.check_accounting()
    if not len(frame):
        raise ValueError(f"no usable rows in {a.add}: all {report.rows_in} were reported\n{report.summary()}")
    return frame, emb, report


def _cmd_index_update_milvus(a: argparse.Namespace) -> int:
    """Everything is checked first (ids to remove exist, ids to add are free, the file's model is the
    collection's); then removals, then additions."""
    index = _open_index(a, None)
    before = len(index)
    add, report = None, None
    if a.add:
        frame, emb, report = _rows_to_add(a, index)
        add = (frame["id"], emb, frame.drop(columns=["id"]))
    ignored = index.update(add=add, remove=a.remove)
    removed = len(set(a.remove or []))
    added = 0 if add is None else len(add[0])
    print(f"removed {removed}, added {added}: {before - removed + added} products in {_index_label(a, None)}")
    if ignored:
        print(f"note: the collection has no field for column(s) {', '.join(ignored)}: not stored "
              "(rebuild the index to carry them)")
    if report is not None:
        print(report.summary())
        _write_report(a.report, report)
    return 0


def _hits_frame(index, hits) -> pd.DataFrame:
    if getattr(index, "backend", "faiss") == "milvus":
        meta = pd.DataFrame([h.metadata for h in hits], columns=index.columns)
    else:
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
    check_backend(a, "--index", a.index)
    # An index from another model lives in another vector space: its scores would be meaningless.
    index = _open_index(a, a.index, expected_model_id=encoder.model_id if encoder else None)
    if a.id is not None:
        hits = index.search_id(a.id, a.k, filter=a.filter)
    else:
        if a.image is not None and not Path(a.image).is_file():
            raise FileNotFoundError(f"no image file {a.image}")
        query = encoder.encode([{"id": "query", "image": a.image, "title": a.title}])
        hits = index.search(query, a.k, filter=a.filter)[0]
    table = _hits_frame(index, hits)
    if a.json:
        results = json.loads(table.to_json(orient="records"))  # NaN -> null, numpy -> Python types
        print(json.dumps({"query": {"image": a.image, "title": a.title, "id": a.id, "filter": a.filter},
                          "index": _index_label(a, a.index), "model_id": index.model_id,
                          "precision": encoder.precision if encoder else None,
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
    from ..embeddings import read_embeddings
    from ..index.dedup import (Neighbourhood, duplicate_groups, find_duplicates, pair_metrics, suggest_threshold,
                               sweep_margins)

    cosine = None
    if a.threshold != "auto":
        try:
            cosine = float(a.threshold)
        except ValueError:
            raise ValueError(f"--threshold takes 'auto' or a cosine, not {a.threshold!r}") from None
        if a.margin is not None:
            raise ValueError("give --threshold (a cosine) or --margin (a closeness cut), not both")
    frame, emb = read_embeddings(a.embeddings)
    if a.group is not None and a.group not in frame:
        raise ValueError(f"{a.embeddings} has no column {a.group!r}")
    group = a.group or ("group" if "group" in frame else None)
    ids = frame["id"].astype(str).to_numpy()
    margin = a.margin
    if a.sweep and group is None:
        raise ValueError("--sweep needs a ground-truth group column: give --group COL")
    hood = Neighbourhood(emb, a.k, a.background) if cosine is None or a.sweep else None  # one search for both
    if a.sweep:
        results, auto = sweep_margins(emb, ids, frame[group], hood=hood)
        print(f"{'margin':>7}  {'pairs':>8}  {'precision':>9}  {'recall':>6}  {'F1':>6}  {'groups':>6}  {'largest':>7}")
        for r in results:
            print(f"{r['margin']:>7.2f}  {r['predicted_pairs']:>8}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  "
                  f"{r['f1']:>6.4f}  {r['groups']:>6}  {r['largest']:>7}" + ("  <- auto" if r["auto"] else ""))
        best = suggest_threshold(results, key="margin")
        row = next(r for r in results if r["margin"] == best)
        auto_f1 = next(r for r in results if r["auto"])["f1"]
        if row["auto"]:
            print(f"suggested: auto (margin {best:.3f}; best pair F1 {row['f1']:.4f} against {group!r})")
        else:
            print(f"suggested: --margin {best:.2f} (best pair F1 {row['f1']:.4f} against {group!r}; "
                  f"auto, {auto.margin:.3f}, gives {auto_f1:.4f})")
        if cosine is None and margin is None:
            margin = best
    if cosine is not None:
        labels = duplicate_groups(emb, ids, cosine, k=a.k)
        setting = f"cosine threshold {cosine:.4f}"
    else:
        result = find_duplicates(emb, ids, "auto" if margin is None else margin, hood=hood)
        if result.auto is not None:
            print(result.auto.describe())
        labels, setting = result.labels, f"margin {result.margin:.4f}"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "dup_group": labels}).to_csv(out, index=False)
    sizes = np.bincount(labels)
    print(f"{setting}, k {a.k}: {len(ids)} products, {int((sizes >= 2).sum())} duplicate groups "
          f"covering {int(sizes[sizes >= 2].sum())} products (largest {int(sizes.max(initial=0))}) -> {out}")
    if group is not None:
        print(_pair_line(pair_metrics(labels, frame[group])) + f" against {group!r}")
    return 0


def add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Milvus backend (instead of a FAISS index folder; "
                             "needs `pip install 'item-embed[milvus]'`)")
    g.add_argument("--backend", choices=BACKENDS, default="faiss",
                   help="faiss: an index folder on this machine; milvus: a Milvus collection (--uri, --collection)")
    g.add_argument("--uri", help="milvus: a Milvus Lite database file ending in .db (embedded, no server: "
                                 "./products.db) or a Milvus server or cluster (http://HOST:19530; a token is read "
                                 f"from ${MILVUS_TOKEN_ENV})")
    g.add_argument("--collection", help="milvus: the collection (an alias that a rebuild moves to the new one)")


def register(sub: argparse._SubParsersAction) -> None:
    i = add_command(sub, "index", "build a nearest-product index from an embedding file",
                    description="Every row of the embedding file is indexed or reported: rows in = rows indexed + "
                                   f"rows reported. The report is printed and written to OUT/{REPORT_FILE} "
                                   "(and to --report). With --backend milvus the ids, vectors and carried columns "
                                   "go into a Milvus collection instead of a folder.")
    i.add_argument("embeddings", help="embedding .parquet from `item-embed embed`")
    i.add_argument("--out", help="faiss: index folder (replaced atomically if it holds an index)")
    i.add_argument("--kind", choices=KINDS,
                   help="flat: exact; hnsw: graph, fast, approximate; ivf: clustered, needs >= 39 rows per list "
                        "(default: flat with faiss, hnsw with milvus)")
    i.add_argument("--nlist", type=int, help="ivf: number of lists (default ~4 sqrt(n))")
    i.add_argument("--nprobe", type=int, help="ivf: lists searched per query (more: better recall, slower)")
    i.add_argument("--ef-search", type=int, help="hnsw: search beam width (default 64; more: better recall, slower)")
    i.add_argument("--strict", action="store_true",
                   help="stop at the first unusable row (no id, duplicate id, missing/NaN/inf/all-zero embedding, "
                        "wrong dimension) instead of skipping it; skipped rows are listed in OUT/"
                        f"{REPORT_FILE}")
    i.add_argument("--report", metavar="FILE.json", help="also write the row report here (with --backend milvus, "
                                                         "the only place it is written)")
    add_backend_args(i)
    i.set_defaults(func=cmd_index)

    u = add_command(sub, "index-update", "add or remove products in an index without rebuilding it",
                    description="Removals are applied before additions, so `--remove X --add new.parquet` "
                                   "replaces product X. The index is saved back atomically.")
    u.add_argument("index", nargs="?", help="index folder from `item-embed index` (faiss)")
    u.add_argument("--add", metavar="EMB.parquet",
                   help="embedding file (same model) of products to add; unusable rows are skipped and "
                        f"reported (printed and written to INDEX/{UPDATE_REPORT_FILE})")
    u.add_argument("--strict", action="store_true",
                   help="refuse the whole update at the first unusable row of --add instead of skipping it")
    u.add_argument("--remove", nargs="+", metavar="ID", help="ids of products to remove")
    u.add_argument("--report", metavar="FILE.json", help="also write the row report of --add here")
    add_backend_args(u)
    u.set_defaults(func=cmd_index_update)

    s = add_command(sub, "search", "nearest products to an image, a title, both, or an indexed product")
    s.add_argument("--index", help="index folder from `item-embed index` (faiss)")
    s.add_argument("--model", help="run folder of the model that built the index (needed for --image/--title)")
    s.add_argument("--image", help="query image file")
    s.add_argument("--title", help="query title")
    s.add_argument("--id", help="query with an indexed product (itself excluded)")
    s.add_argument("-k", type=int, default=10, help="number of results")
    s.add_argument("--json", action="store_true", help="print the results as JSON, with every carried column")
    s.add_argument("--filter", metavar="EXPR",
                   help="only products whose metadata passes, e.g. 'category == \"bag\" and price < 10': "
                        "== != < <= > >=, in [...], not in [...], is None, and / or / not, parentheses; a missing "
                        "value never passes a comparison; exact top-k with faiss, evaluated by Milvus with milvus")
    add_backend_args(s)
    add_device_arg(s)
    add_precision_arg(s)
    s.set_defaults(func=cmd_search)

    d = add_command(sub, "dedup", "near-duplicate groups from the k-nearest-neighbour graph",
                    description="Links each product to those of its k nearest neighbours that are much nearer than "
                                "its R-th neighbour (closeness = ln((1 - cos_R) / (1 - cos)), so a model's overall "
                                "cosine level does not matter); duplicate groups are the connected components. The "
                                "default cut (auto) is the valley between the duplicate and non-duplicate modes of "
                                "the products' nearest-neighbour closeness when it is clearly bimodal, else the level "
                                "a nearest neighbour reaches by chance for about one product of the catalog (strict); "
                                "it is printed with its reason. See item_embed.index.dedup.")
    d.add_argument("embeddings", help="embedding .parquet from `item-embed embed`")
    d.add_argument("--out", required=True, help="output CSV with columns id,dup_group")
    d.add_argument("--threshold", default="auto",
                   help="auto: cut links by closeness at the level chosen from the catalog's own neighbours; "
                        "a number: an absolute cosine instead (neighbours at or above it are linked; cosine "
                        "levels differ between models, so a fixed one can join a whole catalog)")
    d.add_argument("--margin", type=float,
                   help="a fixed closeness cut instead of auto: ln of how many times nearer than the R-th "
                        "neighbour a duplicate is (2: e^2 = 7.4 times); --sweep suggests one")
    d.add_argument("-k", "--k", type=int, default=10, help="neighbours linked per product")
    d.add_argument("--background", type=int, default=50,
                   help="R: the neighbour rank that closeness is measured against (groups up to about R products)")
    d.add_argument("--group",
                   help="ground-truth group column for pair precision/recall/F1 (default: `group` if present)")
    d.add_argument("--sweep", action="store_true",
                   help="print pair precision/recall/F1 at the cuts that link 90%%..10%% of the products and at "
                        "auto, suggest the best, and use it unless --threshold or --margin is given")
    d.set_defaults(func=cmd_dedup)
