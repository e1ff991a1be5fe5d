"""Embedding files: embed a catalog (one process or a torchrun job), bad rows, read them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from item_embed.cli import main
from item_embed.embeddings import read_embedding_metadata, read_embeddings
from item_embed.encode import ItemEncoder
from item_embed.runtime import resolve_precision


def test_embed_and_evaluate(tiny_catalog, tiny_run, tmp_path, capsys):
    emb_path = tmp_path / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(emb_path), "--no-progress",
                 "--batch-size", "16"]) == 0
    frame, emb = read_embeddings(emb_path)
    catalog = pd.read_csv(tiny_catalog)
    assert list(frame["id"]) == list(catalog["id"])
    for col in ("title", "group", "category", "colour", "pattern"):
        assert list(frame[col]) == list(catalog[col]), f"{col} not carried through"
    assert emb.shape == (len(catalog), 64 + 32)  # tiny preset: [CLS] and the shape slice
    # The file's embeddings are what the library call gives, at the precision the file records
    # (the CLI's `auto`: bf16 on CPUs with native bf16 units, fp32 elsewhere).
    precision = read_embedding_metadata(emb_path)["precision"]
    assert precision == resolve_precision("auto", "cpu")
    lib = ItemEncoder.from_pretrained(tiny_run, precision=precision).encode(
        [{"title": t, "image": tiny_catalog.parent / p} for t, p in zip(catalog["title"][:5], catalog["image"][:5])])
    if precision == "fp32":
        np.testing.assert_allclose(emb[:5], lib, atol=1e-5)
    else:  # bf16 sums in another order for another batch: equal to bf16's rounding, not bit for bit
        assert (emb[:5] * lib).sum(axis=1).min() > 0.999

    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", str(emb_path), "--group", "group", "--labels", "category,colour",
                 "--out", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert result["retrieval"]["queries"] == len(catalog)  # every synthetic product has >= 2 listings
    assert 0.0 <= result["retrieval"]["R@1"] <= 1.0
    assert set(result) == {"retrieval", "knn:category", "knn:colour"}
    assert "R@1=" in capsys.readouterr().out


def test_embed_reports_bad_rows_and_strict_stops(tiny_catalog, tiny_run, tmp_path, capsys):
    frame = pd.read_csv(tiny_catalog)
    frame.loc[3, "image"] = "images/does-not-exist.jpg"
    frame.loc[5, "id"] = frame.loc[4, "id"]
    bad = tiny_catalog.parent / "bad.csv"
    frame.to_csv(bad, index=False)
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(bad), "--model", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    written, _ = read_embeddings(out)
    assert len(written) == len(frame) - 2
    report = json.loads((tmp_path / "emb.report.json").read_text())
    assert report["rows_in"] == len(frame) and report["rows_reported"] == 2
    reasons = {p["row"]: p["reason"] for p in report["problems"]}
    assert "not found" in reasons[3] and "duplicate id" in reasons[5]
    printed = capsys.readouterr().out
    assert f"row 3 (id {frame.loc[3, 'id']!r})" in printed

    assert main(["embed", str(bad), "--model", str(tiny_run), "--out", str(tmp_path / "x.parquet"),
                 "--no-progress", "--strict"]) == 2
    assert frame.loc[3, "id"] in capsys.readouterr().err


def test_two_process_embed_writes_shards_equal_to_one_process(tiny_catalog, tiny_run, tmp_path):
    import numpy as np
    import pandas as pd

    from item_embed.embeddings import read_embedding_metadata, read_embeddings

    frame = pd.read_csv(tiny_catalog)
    frame.loc[2, "image"] = "images/missing.jpg"  # a bad row in rank 0's share
    frame.loc[len(frame) - 1, "id"] = frame.loc[0, "id"]  # rank 1 holds a duplicate of rank 0's first id
    catalog = tiny_catalog.parent / "sharded.csv"
    frame.to_csv(catalog, index=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # fp32: bf16 rounds differently in other batches, and the shards batch other products together.
    embed = ["-m", "item_embed", "embed", str(catalog), "--model", str(tiny_run), "--no-progress", "--precision", "fp32"]
    single, sharded = tmp_path / "single.parquet", tmp_path / "sharded"
    subprocess.run([sys.executable, *embed, "--out", str(single)], env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, *embed, "--out", str(sharded)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    manifest = json.loads((sharded / "manifest.json").read_text())
    assert [p["file"] for p in manifest["parts"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert manifest["rows_in"] == len(frame) == manifest["rows_used"] + manifest["rows_reported"]
    assert manifest["rows_reported"] == 2
    report = json.loads((sharded / "report.json").read_text())
    assert {p["row"] for p in report["problems"]} == {2, len(frame) - 1}
    a_frame, a = read_embeddings(single)
    b_frame, b = read_embeddings(sharded)
    assert list(a_frame["id"]) == list(b_frame["id"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert read_embedding_metadata(sharded)["model_id"] == manifest["model_id"]


# ----------------------------------------------------------------- exact ids and bad lines through the CLI

BIG = 2**53  # 2**53 + 1 has no float64: an id that passes through float comes out as 2**53


def _write_arrow(path, columns: dict) -> None:
    """A Parquet file written by pyarrow alone (no pandas metadata, as Spark or DuckDB write it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_int64_ids_past_2_53_stay_exact_through_embed_index_and_search(tiny_run, tmp_path, capsys):
    import pyarrow as pa

    ids = [BIG + i for i in range(30)]
    ids.insert(7, None)
    colours = ["red", "blue", "green", "black", "white"]
    catalog = tmp_path / "big.parquet"
    _write_arrow(catalog, {"id": pa.array(ids, pa.int64()),
                           "title": [f"{colours[i % 5]} shoe size {i}" for i in range(len(ids))]})
    exact = [str(i) for i in ids if i is not None]
    emb, ix = tmp_path / "emb.parquet", tmp_path / "index"
    assert main(["embed", str(catalog), "--model", str(tiny_run), "--out", str(emb), "--no-progress"]) == 0
    report = json.loads((tmp_path / "emb.report.json").read_text())
    assert (report["rows_in"], report["rows_used"], report["rows_reported"]) == (31, 30, 1)
    assert report["problems"] == [{"row": 7, "id": None, "reason": "missing id"}]  # and no false duplicates
    frame, _ = read_embeddings(emb)
    assert list(frame["id"]) == exact

    assert main(["index", str(emb), "--out", str(ix)]) == 0
    from item_embed.index.product_index import ProductIndex

    assert ProductIndex.load(ix).ids == exact
    capsys.readouterr()
    assert main(["search", "--index", str(ix), "--id", str(BIG + 1), "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 5 and {r["id"] for r in results} <= set(exact) - {str(BIG + 1)}
    assert main(["search", "--index", str(ix), "--id", str(BIG + 29), "-k", "29", "--json"]) == 0
    assert {r["id"] for r in json.loads(capsys.readouterr().out)["results"]} == set(exact) - {str(BIG + 29)}


def test_padded_and_multiline_ids_are_refused_alike_by_embed_and_index(tiny_run, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = ["ok", " padded", "new\nline", "a  b", "tab\tid", "trail "]
    catalog = tmp_path / "ids.parquet"
    _write_arrow(catalog, {"id": ids, "title": [f"mug {i}" for i in range(len(ids))]})
    emb = tmp_path / "emb.parquet"
    assert main(["embed", str(catalog), "--model", str(tiny_run), "--out", str(emb), "--no-progress"]) == 0
    report = json.loads((tmp_path / "emb.report.json").read_text())
    refused = [(p["row"], p["id"], p["reason"]) for p in report["problems"]]
    assert refused == [(1, " padded", "id has leading or trailing whitespace"),
                       (2, "new\nline", "id contains a control character (U+000A)"),
                       (4, "tab\tid", "id contains a control character (U+0009)"),
                       (5, "trail ", "id has leading or trailing whitespace")]
    frame, _ = read_embeddings(emb)
    assert list(frame["id"]) == ["ok", "a  b"]  # kept exactly: inner spaces are not collapsed

    # An embedding file made elsewhere with such ids: the index refuses them with the same reasons.
    table = pq.read_table(emb)
    made = tmp_path / "made.parquet"
    pq.write_table(table.set_column(0, "id", pa.array([" padded", "a  b"])), made)
    ix = tmp_path / "index"
    assert main(["index", str(made), "--out", str(ix)]) == 0
    from item_embed.index.product_index import REPORT_FILE, ProductIndex

    ix_report = json.loads((ix / REPORT_FILE).read_text())
    assert [(p["row"], p["id"], p["reason"]) for p in ix_report["problems"]] == [
        (0, " padded", "id has leading or trailing whitespace")]
    assert ProductIndex.load(ix).ids == ["a  b"]
    capsys.readouterr()
    assert main(["search", "--index", str(ix), "--id", "a  b", "-k", "1", "--json"]) == 0


def test_embed_reports_malformed_csv_lines_and_strict_names_the_line(tiny_run, tmp_path, capsys):
    catalog = tmp_path / "bad.csv"
    catalog.write_text('id,title\n'
                       'p1,red shoe\n'
                       'p2,blue shoe,EXTRA\n'
                       'p3,"green shoe\n'
                       'p4,black shoe\n'
                       'p5\n'
                       'p6,"white, shoe"\n')
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(catalog), "--model", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((tmp_path / "emb.report.json").read_text())
    assert report["rows_in"] == 6 == report["rows_used"] + report["rows_reported"]
    assert [(p["row"], p["id"], p["reason"]) for p in report["problems"]] == [
        (1, "p2", "bad CSV line: line 3 has 3 fields, the header has 2"),
        (2, "p3", ("bad CSV line: line 4 has 3 fields, the header has 2 (the record runs on to line 7: "
                   "a quote that is never closed?)")),
        (4, "p5", "bad CSV line: line 6 has 1 field, the header has 2"),
    ]
    assert report["reported_by_reason"] == {"bad CSV line": 3}
    frame, _ = read_embeddings(out)
    assert list(frame["id"]) == ["p1", "p4", "p6"] and frame["title"].tolist()[-1] == "white, shoe"
    assert "skipped row 1 (id 'p2'): bad CSV line: line 3" in capsys.readouterr().out

    assert main(["embed", str(catalog), "--model", str(tiny_run), "--out", str(tmp_path / "x.parquet"),
                 "--no-progress", "--strict"]) == 2
    assert "row 1 (id 'p2'): bad CSV line: line 3 has 3 fields, the header has 2" in capsys.readouterr().err
