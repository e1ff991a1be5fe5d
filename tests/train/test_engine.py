"""The shared training engine: exact resume (also after SIGKILL), accumulation, lr groups, budgets, DDP."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from item_embed.cli import main
from item_embed.config import TrainConfig
from item_embed.train.engine import Budget, lr_at

TRAIN = ["--preset", "tiny", "--batch-size", "8", "--no-progress", "--precision", "fp32"]


def test_resume_reproduces_uninterrupted_run(tiny_catalog, tiny_run, tmp_path):
    """Stop after step 3 (drop later state), resume: the final weights equal the uninterrupted run's."""
    run = tmp_path / "resumed"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "model.safetensors").unlink()
    assert main(["train", str(tiny_catalog), "--out", str(run), "--steps", "6", "--save-every", "3",
                 "--resume", *TRAIN]) == 0
    a, b = load_file(str(tiny_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)), "resumed log repeats or skips steps"


def test_a_step_that_fails_still_leaves_the_step_before_it_in_the_log(tiny_catalog, tmp_path, monkeypatch):
    """A step's line is written once the next step is queued: when that next step fails, the line is
    written anyway (and the run's error is what surfaces)."""
    from item_embed.train.engine import Engine

    device_step = Engine._device_step

    def fail_at_third(self, *args, **kwargs):
        if self.step == 2:
            raise RuntimeError("the device fell over")
        return device_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_device_step", fail_at_third)
    run = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="fell over"):
        main(["train", str(tiny_catalog), "--out", str(run), "--steps", "6", "--save-every", "100", *TRAIN])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_skips_a_corrupted_checkpoint(tiny_catalog, tiny_run, tmp_path, capsys):
    run = tmp_path / "corrupt"
    shutil.copytree(tiny_run, run)
    weights = run / "checkpoints" / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert main(["train", str(tiny_catalog), "--out", str(run), "--steps", "6", "--save-every", "3",
                 "--resume", *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint step-00000006" in out and "resumed from step-00000003" in out


def test_gradient_accumulation_matches_the_full_batch(tiny_catalog, tmp_path):
    """2 micro-batches of 8 follow the loss curve of batches of 16 (each micro-batch averages its own tokens).
    View alignment is left out: its in-batch negatives are the micro-batch's rows, so it differs by design."""
    full, accum = tmp_path / "full", tmp_path / "accum"
    for run, extra in ((full, []), (accum, ["--grad-accum", "2"])):
        assert main(["train", str(tiny_catalog), "--out", str(run), "--steps", "5", "--save-every", "100",
                     *TRAIN, "--batch-size", "16", "--loss-weights", "align=0", *extra]) == 0
    a = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (accum / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(a, b, rtol=0.03)


def test_new_lr_scale_groups_only_what_starts_from_scratch(tiny_catalog):
    from item_embed.config import ObjectiveConfig, model_config_for
    from item_embed.data.arrays import ProductArrays, load_tokenizer
    from item_embed.model.dual import DualModel
    from item_embed.model.encoder import ItemModel
    from item_embed.model.objectives import ItemObjectives
    from item_embed.train.dual import DualTraining
    from item_embed.train.engine import param_groups
    from item_embed.train.pretrain import Pretraining

    from item_embed.data.catalog import Product

    cfg = model_config_for("tiny", image_stem="linear")
    data = ProductArrays.build([Product(0, "a", "a mug", None)], load_tokenizer(), cfg.max_text_len, cfg.image_size)
    model = ItemModel(cfg)
    heads = ItemObjectives(model, ObjectiveConfig())
    task = Pretraining(model, heads, data, load_tokenizer())
    assert len(param_groups(task, 0.01, 1.0)) == 2  # scale 1: the plain decay / no-decay split
    groups = param_groups(task, 0.01, 10.0)
    scaled = {id(p) for g in groups if g["lr_scale"] == 10.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in scaled}
    assert names == {n for n, _ in model.named_parameters() if not n.startswith("bert.")}
    assert {"patch_embed.weight", "image_pos", "mask_patch"} <= names
    assert all(id(p) in scaled for p in heads.parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(task.parameters()))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.image_pos) in no_decay and id(model.mask_patch) in no_decay
    assert id(model.patch_embed.weight) not in no_decay

    dual = DualModel(cfg)
    scaled = {id(p) for g in param_groups(DualTraining(dual, data), 0.01, 10.0) if g["lr_scale"] == 10.0
              for p in g["params"]}
    names = {n for n, p in dual.named_parameters() if id(p) in scaled}
    assert names == {n for n, _ in dual.named_parameters() if not n.startswith("text.bert.")}
    assert "image.patch_embed.weight" in names and "logit_scale" in names


def test_checkpoints_from_before_the_lr_scale_resume_as_they_ran():
    from item_embed.config import TrainConfig

    saved = TrainConfig(steps=3).to_dict()
    del saved["new_lr_scale"]
    assert TrainConfig.from_saved(saved).new_lr_scale == 1.0
    assert TrainConfig.from_saved(TrainConfig(new_lr_scale=3.0).to_dict()).new_lr_scale == 3.0


def test_budget_schedule():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1)
    by_steps = Budget(steps=50)
    assert [by_steps.lr(s, 123.0, cfg) for s in range(50)] == [lr_at(s, 50, cfg) for s in range(50)]
    assert not by_steps.done(49, 1e9) and by_steps.done(50, 0.0)
    by_time = Budget(seconds=10.0)
    assert by_time.progress(1000, 5.0) == 0.5 and not by_time.done(10**6, 9.99) and by_time.done(1, 10.0)
    assert by_time.lr(0, 0.5, cfg) == pytest.approx(0.5, abs=1e-3)  # half-way through the 1 s warm-up
    assert by_time.lr(0, 1.0, cfg) == pytest.approx(1.0, abs=1e-3)  # warm-up done
    assert by_time.lr(0, 5.5, cfg) == pytest.approx(0.5, abs=1e-3)  # cosine half-way
    assert by_time.lr(0, 9.99, cfg) < 1e-3
    both = Budget(steps=100, seconds=10.0)
    assert both.done(100, 1.0) and both.done(3, 10.0) and not both.done(99, 9.9)
    with pytest.raises(ValueError):
        Budget()


CRASH_STEPS = 40


def _cmd(catalog: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "item_embed", "train", str(catalog), "--out", str(run), "--preset", "tiny",
            "--steps", str(CRASH_STEPS), "--batch-size", "32", "--save-every", "2", "--precision", "fp32",
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
    """SIGKILL the trainer at random steps and once inside a checkpoint write, resume each time: the
    weights end exactly as an uninterrupted run's, and the log holds each step once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cmd(tiny_catalog, reference), env=env, check=True, capture_output=True)

    run = tmp_path / "crashed"
    # Different kill points every run, from a seed that is printed: CRASH_SEED=... reproduces a failure.
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    targets = sorted(random.Random(seed).sample(range(3, CRASH_STEPS - 2), 5))
    print(f"CRASH_SEED={seed}: kill targets {targets}")
    # One crash inside a checkpoint write: the trainer kills itself after writing part of step 8's files.
    crash = subprocess.run(_cmd(tiny_catalog, run), env={**env, "ITEM_EMBED_FAULT": "mid-write:step-00000008"},
                           capture_output=True)
    assert crash.returncode == -signal.SIGKILL
    leftovers = lambda: list((run / "checkpoints").glob(".step-00000008.tmp-*"))  # noqa: E731
    assert leftovers(), "the fault did not hit the checkpoint write"
    # A kill can also tear the log's last line; resuming must drop it, not stop on it.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.2')
    for target in targets:
        code, reached = _kill_at_step(_cmd(tiny_catalog, run), run, target, env)
        assert code == -signal.SIGKILL and reached < CRASH_STEPS, f"run ended before the kill at step {target}"
    final = subprocess.run(_cmd(tiny_catalog, run), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert not leftovers(), "the killed checkpoint write was not cleaned up"

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs after crashes at {targets} (CRASH_SEED={seed})")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, CRASH_STEPS + 1))


DDP_STEPS = 12
# Each rank averages its own masked tokens/patches and DDP averages the ranks, where one process
# averages over the whole batch: per-step losses differ slightly (measured: <= 0.4% over 20 steps).
TOLERANCE = 0.02


def _train_args(catalog, run) -> list[str]:
    return ["-m", "item_embed", "train", str(catalog), "--out", str(run), "--preset", "tiny", "--steps", str(DDP_STEPS),
            "--batch-size", "16", "--lr", "1e-3", "--new-lr-scale", "1", "--precision", "fp32", "--save-every", "6",
            "--no-progress"]


def _losses(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_two_process_loss_curve_matches_one_process(tiny_catalog, tmp_path):
    """torchrun with 2 CPU processes (gloo) follows the 1-process loss curve at the same global batch."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, *_train_args(tiny_catalog, single)], env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, *_train_args(tiny_catalog, double)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = _losses(single), _losses(double)
    assert [r["step"] for r in b] == list(range(1, DDP_STEPS + 1)), "rank 0 alone must log, once per step"
    for x, y in zip(a, b):
        # Not "loss" or "align": view alignment's in-batch negatives are each rank's own rows.
        assert y["align"] > 0
        for key in ("mlm", "mim", "global_mlm", "global_mim", "itm"):
            assert abs(x[key] - y[key]) <= TOLERANCE * abs(x[key]), f"step {x['step']} {key}: {x[key]} vs {y[key]}"
    assert sorted(p.name for p in (double / "checkpoints").iterdir()) == ["step-00000006", "step-00000012"]
    assert (double / "model.safetensors").is_file()
    # Rank 0 alone prints the summary.
    assert "trained 12 steps" in done.stdout and done.stdout.count("trained 12 steps") == 1


def test_the_engine_s_adamw_is_fused_on_the_cpu_and_steps_as_the_default_one():
    import torch

    from item_embed.train.engine import adamw

    torch.manual_seed(0)
    start = [torch.randn(50, 7), torch.randn(7)]
    runs = []
    for fused in (True, False):
        params = [p.clone().requires_grad_() for p in start]
        groups = [{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "weight_decay": 0.0}]
        opt = adamw(groups, 1e-2, "cpu") if fused else torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98))
        assert bool(opt.defaults["fused"]) == fused
        for step in range(3):
            opt.zero_grad()
            sum(((p - step) ** 2).sum() for p in params).backward()
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
