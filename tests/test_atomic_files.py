"""Crash leftovers: folder swaps with no moment without the folder, stale temporaries cleaned, a torn
log line survived, renames made durable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from item_embed import atomic_files, embeddings
from item_embed.atomic_files import exchange, remove_stale, replace_folder, temp_folder
from item_embed.checkpoint import CheckpointError
from item_embed.index.product_index import MANIFEST_FILE, ProductIndex
from item_embed.train.engine import _truncate_metrics


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(text)
    return path


def _exchange_works(tmp_path: Path) -> bool:
    a, b = _folder(tmp_path / "probe-a", "a"), _folder(tmp_path / "probe-b", "b")
    return exchange(a, b)


def test_replacing_a_folder_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """Every file-system step of a replacement leaves a complete folder at the target (a reader or a
    restart in between finds the old or the new one, never nothing)."""
    if not _exchange_works(tmp_path):
        pytest.skip("this file system has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    target = _folder(tmp_path / "index", "old")
    seen = []
    real_replace, real_exchange = os.replace, atomic_files.exchange

    def watch(fn):
        def step(*args):
            result = fn(*args)
            seen.append((target / "manifest.json").read_text() if (target / "manifest.json").exists() else None)
            return result
        return step

    monkeypatch.setattr(atomic_files.os, "replace", watch(real_replace))
    monkeypatch.setattr(atomic_files, "exchange", watch(real_exchange))
    for i in range(3):
        new = temp_folder(target)
        (new / "manifest.json").write_text(f"new {i}")
        replace_folder(new, target)
    assert seen and None not in seen, f"the target was missing after a step: {seen}"
    assert (target / "manifest.json").read_text() == "new 2"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index")] == [], "a temporary was left behind"


def test_index_save_over_an_index_swaps_in_one_step(tmp_path, monkeypatch):
    if not _exchange_works(tmp_path):
        pytest.skip("this file system has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    rng = np.random.default_rng(0)
    out = tmp_path / "idx"

    build(5, rng).save(out)
    missing = []
    real_replace = os.replace

    def spy(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if not (out / MANIFEST_FILE).is_file():
            missing.append((src, dst))

    monkeypatch.setattr(atomic_files.os, "replace", spy)
    build(7, rng).save(out)
    assert not missing, f"no index at {out} after {missing}"
    assert len(ProductIndex.load(out)) == 7


def build(n: int, rng=None) -> ProductIndex:
    vectors = (rng or np.random.default_rng(0)).standard_normal((n, 8)).astype(np.float32)
    return ProductIndex.build(vectors, [f"p{i}" for i in range(n)], None, model_id="m", config_hash="c")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_are_removed_and_live_work_is_kept(tmp_path):
    host = atomic_files._tag().split("-")[0]
    dead = _folder(tmp_path / f".idx.tmp-{host}-{_dead_pid()}-abc", "x")
    dead_old = _folder(tmp_path / f".idx.old-{host}-{_dead_pid()}-abc", "x")
    live = _folder(tmp_path / f".idx.tmp-{host}-{os.getpid()}-abc", "x")
    foreign_new = _folder(tmp_path / ".idx.tmp-0badc0de-12-abc", "x")
    foreign_old = _folder(tmp_path / ".idx.tmp-0badc0de-13-abc", "x")
    two_days = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (two_days, two_days))
    other_name = _folder(tmp_path / f".other.tmp-{host}-{_dead_pid()}-abc", "x")

    removed = remove_stale(tmp_path, "idx")
    assert sorted(removed) == sorted([dead, dead_old, foreign_old])
    assert live.exists() and foreign_new.exists() and other_name.exists()
    assert other_name in remove_stale(tmp_path)  # any name


def test_index_save_cleans_a_killed_save(tmp_path):
    """A save killed half-way leaves its temporary folder; the next save removes it."""
    out = tmp_path / "idx"
    build(2).save(out)
    code = ("import os, signal, numpy as np\n"
            "from item_embed.index import product_index as pi\n"
            "def killed(tmp, target): os.kill(os.getpid(), signal.SIGKILL)\n"
            "pi.replace_folder = killed\n"
            f"pi.ProductIndex.build(np.eye(3, 4, dtype=np.float32), ['a', 'b', 'c'], None, 'm', 'c').save({str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    leftovers = list(tmp_path.glob(".idx.tmp-*"))
    assert len(leftovers) == 1
    assert len(ProductIndex.load(out)) == 2, "the old index must still be in place"
    build(1).save(out)
    assert not list(tmp_path.glob(".idx.*")), "the killed save's folder is still there"


def test_a_torn_last_log_line_is_dropped_and_a_damaged_one_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    _truncate_metrics(log, 4)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".metrics*")), "the rewrite left its temporary file"

    log.write_text('{"step": 1}\n{"step": 2, "lo\n\n\n')  # torn, then blank lines
    _truncate_metrics(log, 5)
    assert log.read_text() == '{"step": 1}\n'

    for damaged in ("not json", "[1, 2]", "7"):
        log.write_text(f'{{"step": 1}}\n{damaged}\n{{"step": 2}}\n')
        with pytest.raises(CheckpointError, match=r"metrics.jsonl line 2"):
            _truncate_metrics(log, 2)


def test_a_committed_embedding_file_survives_a_power_cut(tmp_path, monkeypatch):
    """The rename into place is made durable: the folder holding the output is fsynced after it."""
    synced = []
    monkeypatch.setattr(embeddings, "fsync_path", lambda p: synced.append((Path(p), (tmp_path / "e.parquet").exists())))
    stream = embeddings.ParquetStream(tmp_path / "e.parquet", {})
    stream.write(pa.table({"id": ["a"]}))
    assert stream.commit()
    assert (tmp_path, True) in synced
