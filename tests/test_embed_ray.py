"""``embed --engine ray`` on a local Ray with 2 actors: the same output as the single-process ``embed``
(ids in order, carried columns, fp32 vectors within 1e-5), the same rows reported with the same
reasons, a folder ``index`` reads, a rerun that continues an unfinished output; and the message when
Ray is not installed. One Ray session for the module (its start-up is the slow part)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from item_embed.cli import main
from item_embed.embeddings import read_embeddings

# Ray's own deprecation notices (its DataContext copies itself field by field).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

BATCH, PART_ROWS = "4", "32"  # chunks of 16 rows, 2 per part: ~8 chunks spread over the actors


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bad_catalog(tiny_catalog) -> Path:
    """The tiny catalog with bad rows of each kind the row check reports, spread over chunks and parts:
    a missing image, a duplicate id (across a chunk boundary), an id whose first row is bad (so its
    later row is used), a missing id, a padded id, a row with neither title nor image, a CSV line with
    a field too many and a title that is not UTF-8."""
    frame = pd.read_csv(tiny_catalog, dtype=str, keep_default_na=False)
    frame.loc[5, "image"] = "images/missing.jpg"
    frame.loc[40, "id"] = frame.loc[3, "id"]
    frame.loc[50, "image"] = "images/missing-too.jpg"
    frame.loc[70, "id"] = frame.loc[50, "id"]
    frame.loc[12, "id"] = ""
    frame.loc[20, "id"] = " padded"
    frame.loc[30, ["title", "image"]] = ""
    frame.loc[90, "title"] = "@@LATIN1@@"
    lines = frame.to_csv(index=False, lineterminator="\n").splitlines(keepends=True)
    lines.insert(1 + 60, "extra,Extra field row,images/x.jpg,g,c,red,plain,SURPLUS\n")  # becomes row 60
    data = "".join(lines).encode("utf-8").replace(b"@@LATIN1@@", "Caf\xe9 cushion".encode("latin-1"))
    path = tiny_catalog.parent / "ray-bad.csv"
    path.write_bytes(data)
    return path


# Rows from 60 on are one further down than in the frame (the extra CSV line is row 60).
EXPECTED_REASONS = {5: "bad image", 12: "missing id", 20: "leading or trailing whitespace",
                    30: "no usable image and no title", 40: "duplicate id: first seen at row 3",
                    50: "bad image", 60: "bad CSV line", 91: "title is not valid UTF-8"}


def _embed(catalog: Path, run: Path, out: Path, *extra: str) -> None:
    assert main(["embed", str(catalog), "--model", str(run), "--out", str(out), "--batch-size", BATCH,
                 "--part-rows", PART_ROWS, "--precision", "fp32", "--no-progress", *extra]) == 0


def _problems(report: dict) -> list[tuple]:
    return [(p["row"], p["id"], p["reason"]) for p in report["problems"]]


def _assert_same(ray_out: Path, ref_out: Path, ray_report: Path, ref_report: Path) -> None:
    fr, er = read_embeddings(ray_out)
    fs, es = read_embeddings(ref_out)
    pd.testing.assert_frame_equal(fr, fs)  # ids in the same order, carried columns, has_image/has_title
    np.testing.assert_allclose(er, es, atol=1e-5, rtol=0)
    rr, rs = (json.loads(p.read_text()) for p in (ray_report, ref_report))
    assert _problems(rr) == _problems(rs)
    assert rr == rs  # counts, reasons by kind, source
    assert rr["rows_in"] == rr["rows_used"] + rr["rows_reported"] == len(fr) + len(rr["problems"])


@pytest.fixture(scope="module")
def single_process(bad_catalog, tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-ref") / "emb"
    _embed(bad_catalog, tiny_run, out)
    return out


def test_ray_engine_matches_single_process_embed_and_index_reads_it(ray_session, bad_catalog, tiny_run,
                                                                      single_process, tmp_path, capsys):
    out = tmp_path / "emb"
    _embed(bad_catalog, tiny_run, out, "--engine", "ray", "--actors", "2")
    printed = capsys.readouterr().out
    assert "2 Ray actors x 1 thread" in printed  # both actors took chunks
    _assert_same(out, single_process, out / "report.json", single_process / "report.json")
    report = json.loads((out / "report.json").read_text())
    reported = {p["row"]: p["reason"] for p in report["problems"]}
    assert set(reported) == set(EXPECTED_REASONS)
    for row, reason in EXPECTED_REASONS.items():
        assert reason in reported[row], (row, reported[row])
    # The manifest lists the same parts (row ranges, counts) as the single-process output's.
    mr, ms = (json.loads((d / "manifest.json").read_text()) for d in (out, single_process))
    assert [(p["row_range"], p["count"]) for p in mr["parts"]] == [(p["row_range"], p["count"]) for p in ms["parts"]]
    assert {k: v for k, v in mr.items() if k != "parts"} == {k: v for k, v in ms.items() if k != "parts"}

    from item_embed.index.product_index import ProductIndex

    frame, _ = read_embeddings(out)
    assert main(["index", str(out), "--out", str(tmp_path / "index")]) == 0
    assert ProductIndex.load(tmp_path / "index").ids == frame["id"].tolist()


def test_ray_engine_continues_an_unfinished_output_into_one_file(ray_session, bad_catalog, tiny_run,
                                                                  single_process, tmp_path):
    """A single-file output whose first two parts were committed (here by the single-process engine)
    is finished by the Ray engine (one actor): the committed parts stay, the rest is embedded, the
    file joined."""
    import shutil

    out = tmp_path / "emb.parquet"
    parts = tmp_path / "emb.parquet.parts"
    shutil.copytree(single_process, parts)
    for f in parts.glob("part-*"):
        if int(f.name[5:10]) >= 2:
            f.unlink()
    (parts / "report.json").unlink()
    manifest = json.loads((parts / "manifest.json").read_text())
    for key in ("parts", "rows_in", "rows_used", "rows_reported"):
        manifest.pop(key)
    (parts / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    kept = {f.name: f.read_bytes() for f in parts.glob("part-0000[01].*")}
    assert len(kept) == 4

    _embed(bad_catalog, tiny_run, out, "--engine", "ray", "--actors", "1")
    assert not parts.exists()
    _assert_same(out, single_process, tmp_path / "emb.report.json", single_process / "report.json")
    # The committed rows were not embedded again: the first parts' vectors are the same bits.
    fr, er = read_embeddings(out)
    _, es = read_embeddings(single_process)
    committed = sum(p["count"] for p in json.loads((single_process / "manifest.json").read_text())["parts"][:2])
    assert 0 < committed < len(fr)
    np.testing.assert_array_equal(er[:committed], es[:committed])


def _in_process_pipeline(model_override=None):
    """``embed_ray._run_pipeline`` without actors: the actor class run in this process, chunk by chunk
    (the driver's logic, fast)."""
    import pickle

    from item_embed import embed_ray

    def run(catalog, model, plan, batch_size, start, stats, t0):
        actor = embed_ray._ChunkEncoder(model_override or model, "cpu", plan.precision, batch_size, 1,
                                        embed_ray.row_checker(catalog), catalog.extra_columns)
        for part in catalog.iter_parts(start, None, batch_size * 4):
            result = actor._result(pickle.dumps(part))
            if isinstance(result, embed_ray._Failure):
                result.raise_it()
            rows, items, vectors, worker, _ready = result
            yield rows, items, vectors, worker

    return run


def test_strict_stops_at_the_same_row_with_the_same_message(ray_session, bad_catalog, tiny_run, tmp_path,
                                                            monkeypatch, capsys):
    from item_embed import embed_ray

    args = ["--batch-size", BATCH, "--precision", "fp32", "--no-progress", "--strict"]
    assert main(["embed", str(bad_catalog), "--model", str(tiny_run), "--out", str(tmp_path / "a"), *args]) == 2
    expected = capsys.readouterr().err
    assert "row 5 (id 'p0001-1'): bad image" in expected
    monkeypatch.setattr(embed_ray, "_run_pipeline", _in_process_pipeline())
    assert main(["embed", str(bad_catalog), "--model", str(tiny_run), "--out", str(tmp_path / "b"), *args,
                 "--engine", "ray"]) == 2
    assert capsys.readouterr().err == expected


def test_an_actor_that_cannot_load_the_model_fails_in_one_line(ray_session, tiny_catalog, tiny_run, tmp_path,
                                                               monkeypatch, capsys):
    from item_embed import embed_ray

    monkeypatch.setattr(embed_ray, "_run_pipeline", _in_process_pipeline(model_override=str(tmp_path / "gone")))
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(tmp_path / "e"),
                 "--engine", "ray", "--precision", "fp32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("item-embed embed: error: --engine ray: an actor on ") and "could not load the model" in err
    assert len(err.splitlines()) == 1


def test_without_ray_the_engine_names_the_extra(tiny_catalog, tiny_run, tmp_path):
    """Ray is an optional extra: in a Python where ``import ray`` fails, the CLI imports and runs, and
    ``--engine ray`` says what to install, before any work."""
    code = ("import sys; sys.modules['ray'] = None\n"  # import ray -> ImportError
            "from item_embed.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "e"
    proc = subprocess.run([sys.executable, "-c", code, "embed", str(tiny_catalog), "--model", str(tiny_run),
                           "--out", str(out), "--engine", "ray", "--no-progress"],
                          check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("item-embed embed: error: --engine ray needs Ray Data")
    assert "pip install 'item-embed[ray]'" in proc.stderr
    assert not out.exists()
