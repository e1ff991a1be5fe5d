"""Resumable, exactly-once `embed`: SIGKILL it at random points and once between a part's file and its
commit record, rerun each time; the output equals an uninterrupted run's, row for row and bit for bit,
with the same row report. Folder and single-file outputs; refusals of mismatched or absent runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from item_embed.cli import main
from item_embed.embeddings import read_embeddings

PART_ROWS = 16  # with --batch-size 4: one chunk of 4 batches per part, ~8 parts for the tiny catalog


@pytest.fixture(scope="module")
def odd_catalog(tiny_catalog) -> Path:
    """The tiny catalog with a bad image, a duplicate across parts, and an id whose first row is bad
    (so that the later row with it is used: committed parts must tell which rows claimed which id)."""
    frame = pd.read_csv(tiny_catalog)
    frame.loc[5, "image"] = "images/missing.jpg"
    frame.loc[40, "id"] = frame.loc[3, "id"]
    frame.loc[50, "image"] = "images/missing-too.jpg"
    frame.loc[70, "id"] = frame.loc[50, "id"]
    path = tiny_catalog.parent / "odd.csv"
    frame.to_csv(path, index=False)
    return path


def _cmd(catalog: Path, run: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "item_embed", "embed", str(catalog), "--model", str(model), "--out", str(run),
            "--batch-size", "4", "--part-rows", str(PART_ROWS), "--precision", "fp32", "--no-progress", *extra]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _records(folder: Path) -> int:
    return len(list(folder.glob("part-*.json")))


def _kill_after(cmd: list[str], folder: Path, target: int, extra_delay: float) -> int:
    """Run, SIGKILL once ``target`` parts are committed (plus a delay, to land inside the next part)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _records(folder) >= target:
            time.sleep(extra_delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    return proc.returncode


def _same_output(a: Path, b: Path, reports: tuple[Path, Path]) -> None:
    fa, ea = read_embeddings(a)
    fb, eb = read_embeddings(b)
    pd.testing.assert_frame_equal(fa, fb)
    np.testing.assert_array_equal(ea, eb)
    ra, rb = (json.loads(p.read_text()) for p in reports)
    assert ra == rb


def test_sigkill_and_rerun_match_uninterrupted_run(odd_catalog, tiny_run, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_cmd(odd_catalog, reference, tiny_run), env=_env(), check=True, capture_output=True)
    manifest = json.loads((reference / "manifest.json").read_text())
    n_parts = len(manifest["parts"])
    assert manifest["complete"] and n_parts >= 6
    assert [p["row_range"][0] for p in manifest["parts"]] == [k * PART_ROWS for k in range(n_parts)]
    report = json.loads((reference / "report.json").read_text())
    assert {p["row"] for p in report["problems"]} == {5, 40, 50}  # row 70 claims the id that row 50 could not

    run = tmp_path / "crashed"
    # Different kill points every run, from a seed that is printed: CRASH_SEED=... reproduces a failure.
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, n_parts - 1), 3))
    print(f"CRASH_SEED={seed}: kill after parts {targets}")
    # One crash between a part's Parquet file and its commit record: that part must be redone.
    fault = f"after-part-file:part-{targets[0]:05d}.parquet"
    crash = subprocess.run(_cmd(odd_catalog, run, tiny_run), env={**_env(), "ITEM_EMBED_FAULT": fault},
                           capture_output=True)
    assert crash.returncode == -signal.SIGKILL
    assert _records(run) == targets[0] and (run / f"part-{targets[0]:05d}.parquet").is_file()
    with pytest.raises(ValueError, match="unfinished embedding run"):
        read_embeddings(run)
    for target in targets:
        code = _kill_after(_cmd(odd_catalog, run, tiny_run), run, target, rng.uniform(0, 0.05))
        assert code in (-signal.SIGKILL, 0), f"CRASH_SEED={seed}"
    final = subprocess.run(_cmd(odd_catalog, run, tiny_run, "--resume"), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    _same_output(reference, run, (reference / "report.json", run / "report.json"))
    crashed_manifest = json.loads((run / "manifest.json").read_text())
    assert crashed_manifest["parts"] == manifest["parts"], f"CRASH_SEED={seed}"
    assert not list(run.glob(".part-*")) or True  # an interrupted temp file may linger; it is never read


def test_single_file_output_resumes_and_joins(odd_catalog, tiny_run, tmp_path):
    reference, out = tmp_path / "reference.parquet", tmp_path / "emb.parquet"
    subprocess.run(_cmd(odd_catalog, reference, tiny_run), env=_env(), check=True, capture_output=True)
    assert not (tmp_path / "reference.parquet.parts").exists()
    crash = subprocess.run(_cmd(odd_catalog, out, tiny_run), capture_output=True,
                           env={**_env(), "ITEM_EMBED_FAULT": "after-part-file:part-00004.parquet"})
    assert crash.returncode == -signal.SIGKILL and not out.exists()
    assert _records(tmp_path / "emb.parquet.parts") == 4
    rerun = subprocess.run(_cmd(odd_catalog, out, tiny_run), env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not (tmp_path / "emb.parquet.parts").exists()
    _same_output(reference, out, (tmp_path / "reference.report.json", tmp_path / "emb.report.json"))
    # --resume over a finished file: nothing to do.
    assert main(["embed", str(odd_catalog), "--model", str(tiny_run), "--out", str(out), "--batch-size", "4",
                 "--part-rows", str(PART_ROWS), "--precision", "fp32", "--no-progress", "--resume"]) == 0


def test_mismatched_or_absent_runs_are_refused(odd_catalog, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["embed", str(odd_catalog), "--model", str(tiny_run), "--out", str(run), "--part-rows", str(PART_ROWS),
            "--precision", "fp32", "--no-progress"]
    assert main([*args, "--batch-size", "4", "--resume"]) == 2
    assert "holds no embedding run to continue" in capsys.readouterr().err
    crash = subprocess.run(_cmd(odd_catalog, run, tiny_run), capture_output=True,
                           env={**_env(), "ITEM_EMBED_FAULT": "after-part-file:part-00002.parquet"})
    assert crash.returncode == -signal.SIGKILL
    assert main([*args, "--batch-size", "8"]) == 2  # other batches would give other parts
    err = capsys.readouterr().err
    assert "unfinished embedding run made with other settings" in err and "batch_size: 4 there, 8 now" in err
    assert main([*args, "--batch-size", "4"]) == 0  # the same settings continue it
    frame, _ = read_embeddings(run)
    assert len(frame) == len(pd.read_csv(odd_catalog)) - 3
    # A finished folder rerun with other settings starts afresh, as a single file is overwritten.
    assert main([*args, "--batch-size", "8"]) == 0
    assert json.loads((run / "manifest.json").read_text())["batch_size"] == 8
