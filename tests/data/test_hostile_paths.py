"""Hostile image paths: each is one row reported with its own reason, never the end of the run.

A symlink loop, a file name over 255 bytes, a NUL byte, a directory, a FIFO and a device
(``/dev/zero``, given as an absolute path, which the root guard allows) each used to abort the
catalog read (RuntimeError, OSError, ValueError out of a decode thread) or be called "not found";
a FIFO opened for reading would block the run for good. Everything is generated under tmp_path;
every call that could block runs in a thread with a deadline, and a FIFO left with a blocked
reader is released so the test process can still exit.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from item_embed.data.catalog import Catalog, CatalogReport
from item_embed.data.images import ImageError, load_image_array

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, /dev/zero and symlinks are POSIX")

DEADLINE_S = 120.0
S = 32


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _release(fifo: Path) -> None:
    """Let a reader blocked on ``fifo`` go: open a writer (which its open waits for) and close it (EOF)."""
    for _ in range(20):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader (any more)
            return
        os.close(fd)


def _within(fn, fifos=(), seconds: float = DEADLINE_S):
    """``fn()``'s result, failing (not hanging) when it has not returned in ``seconds``."""
    out: dict = {}

    def work() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the test thread
            out["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung:
        for fifo in fifos:
            _release(fifo)
        thread.join(10)
    assert not hung, f"still running after {seconds:g} s: blocked reading a FIFO or device?"
    if "error" in out:
        raise out["error"]
    return out["value"]


# (id, image value, reason substrings); None value: a good image written for the row.
ROWS: list[tuple[str, str | None, list[str] | None]] = [
    ("good-0", None, None),
    ("loop", "loop_a.png", ["bad image", "symlink loop"]),
    ("long-name", "x" * 300 + ".png", ["bad image", "file name too long", "304 bytes"]),
    ("nul", "images/a\0b.png", ["bad image", "contains a NUL byte"]),
    ("good-1", None, None),
    ("directory", "images", ["bad image", "is a directory"]),
    ("fifo", "pipe.png", ["bad image", "is a FIFO"]),
    ("link-to-fifo", "pipe_link.png", ["bad image", "is a FIFO"]),
    ("dev-zero", "/dev/zero", ["bad image", "is a device"]),
    ("missing", "images/nope.png", ["bad image", "not found"]),
    ("good-2", None, None),
]
GOOD_IDS = [pid for pid, _, reasons in ROWS if reasons is None]


def write_hostile_catalog(folder: Path) -> tuple[Path, Path]:
    """A Parquet catalog (Parquet keeps a NUL in a string) beside its hostile files; returns (catalog, fifo)."""
    (folder / "images").mkdir(parents=True)
    (folder / "loop_a.png").symlink_to("loop_b.png")
    (folder / "loop_b.png").symlink_to("loop_a.png")
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    (folder / "pipe_link.png").symlink_to("pipe.png")
    images = []
    for row, (pid, value, _) in enumerate(ROWS):
        if value is None:
            value = f"images/{pid}.png"
            (folder / value).write_bytes(_png(row))
        images.append(value)
    frame = pd.DataFrame({"id": [r[0] for r in ROWS], "title": [f"Product {r[0]}" for r in ROWS], "image": images})
    path = folder / "catalog.parquet"
    frame.to_parquet(path)
    return path, fifo


def check_report(report: dict) -> None:
    assert report["rows_in"] == len(ROWS)
    assert report["rows_in"] == report["rows_used"] + report["rows_reported"]
    assert report["rows_used"] == len(GOOD_IDS)
    problems = {p["row"]: p for p in report["problems"]}
    for row, (pid, _, reasons) in enumerate(ROWS):
        if reasons is None:
            assert row not in problems, (row, pid, problems.get(row))
            continue
        assert row in problems, f"row {row} ({pid}) should be reported"
        assert problems[row]["id"] == pid
        for word in reasons:
            assert word in problems[row]["reason"], (row, pid, problems[row]["reason"])


def test_each_hostile_path_alone_gets_its_reason(tmp_path: Path) -> None:
    _, fifo = write_hostile_catalog(tmp_path)
    for pid, value, reasons in ROWS:
        if value is None or reasons is None:
            continue
        with pytest.raises(ImageError) as info:
            _within(lambda v=value: load_image_array(v, S, tmp_path), [fifo], seconds=30)
        for word in reasons[1:]:
            assert word in str(info.value), (pid, str(info.value))
        assert "\0" not in str(info.value) and len(str(info.value)) < 400, (pid, str(info.value))


def test_catalog_reports_every_hostile_row_and_uses_the_rest(tmp_path: Path) -> None:
    catalog_path, fifo = write_hostile_catalog(tmp_path)
    catalog = Catalog.open(catalog_path)
    report = CatalogReport()
    products = _within(lambda: catalog.load_all(S, report=report, chunk_size=4, workers=2), [fifo])
    report.check_accounting()
    assert [p.id for p in products] == GOOD_IDS
    check_report(json.loads(json.dumps(report.to_dict())))


def test_symlink_to_a_device_inside_the_root_is_refused(tmp_path: Path) -> None:
    """A link to /dev/zero inside the root resolves outside it: the root guard refuses it first."""
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="escapes"):
        _within(lambda: load_image_array("zero.png", S, tmp_path), seconds=30)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(_png(0))
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image_array("secret.png", S, tmp_path)
    finally:
        path.chmod(0o600)


def test_embed_cli_skips_and_reports_hostile_rows(tiny_run: Path, tmp_path: Path) -> None:
    from item_embed.cli import main
    from item_embed.embeddings import read_embeddings

    catalog_path, fifo = write_hostile_catalog(tmp_path / "shop")
    out = tmp_path / "emb.parquet"
    rc = _within(lambda: main(["embed", str(catalog_path), "--model", str(tiny_run), "--out", str(out),
                               "--no-progress"]), [fifo])
    assert rc == 0
    check_report(json.loads((tmp_path / "emb.report.json").read_text()))
    frame, _ = read_embeddings(out)
    assert frame["id"].tolist() == GOOD_IDS
