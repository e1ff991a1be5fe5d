"""Crash and resume: SIGKILL the trainer at random points (one inside a checkpoint write),
resume each time, and end with exactly the weights of an uninterrupted run."""

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
from safetensors.numpy import load_file

STEPS = 40


def _cmd(catalog: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "item_embed", "train", str(catalog), "--out", str(run), "--preset", "tiny",
            "--steps", str(STEPS), "--batch-size", "32", "--save-every", "2", "--precision", "fp32",
            "--no-progress", "--resume"]


def _logged_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)


def _kill_at_step(cmd: list[str], run: Path, target: int, env: dict) -> tuple[int, int]:
    """Start training, SIGKILL it once the log reaches ``target``; returns (exit code, step reached)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _logged_steps(run) >= target:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    return proc.returncode, _logged_steps(run)


def test_sigkill_and_resume_match_uninterrupted_run(tiny_catalog, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cmd(tiny_catalog, reference), env=env, check=True, capture_output=True)

    run = tmp_path / "crashed"
    rng = random.Random()  # different kill points every run; printed for reproduction
    targets = sorted(rng.sample(range(3, STEPS - 2), 5))
    print("kill targets:", targets)
    # One crash inside a checkpoint write: the trainer kills itself after writing part of step 8's files.
    crash = subprocess.run(_cmd(tiny_catalog, run), env={**env, "ITEM_EMBED_FAULT": "mid-write:step-00000008"},
                           capture_output=True)
    assert crash.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step-00000008").is_dir(), "the fault did not hit the checkpoint write"
    for target in targets:
        code, reached = _kill_at_step(_cmd(tiny_catalog, run), run, target, env)
        assert code == -signal.SIGKILL and reached < STEPS, f"run ended before the kill at step {target}"
    final = subprocess.run(_cmd(tiny_catalog, run), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs after crashes at {targets}")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
