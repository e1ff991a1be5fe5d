"""The training step never makes the host wait for the device.

On a GPU, reading a value back (``.item()``, ``bool(tensor)``, ``float(loss)``) or an op whose output
size depends on the data (``nonzero``, indexing with a boolean mask) stalls the host until the device
has caught up, so it cannot queue the next kernels meanwhile. On the CPU the same calls are harmless
but visible to a dispatch mode: :class:`SyncWatch` records each, and ``Engine._device_step`` (forward,
backward and AdamW of ITEm pre-training, with every objective) must run without any.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from item_embed.cli import main
from item_embed.train.engine import Engine

aten = torch.ops.aten
# Ops that read device memory on the host, or whose output size is known only from the data.
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten.equal.default, aten._unique2.default, aten.unique_consecutive.default,
          aten.repeat_interleave.Tensor}
_MASKED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Tensor methods that copy to the host without an op the dispatch mode would see on the CPU.
_HOST_COPIES = ("tolist", "numpy", "cpu", "item")


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class SyncWatch(TorchDispatchMode):
    """Records every op under it (``seen``) and those that would stall a GPU's host (``syncs``), and
    the host copies of ``_HOST_COPIES`` made meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.syncs: list[str] = []
        self._methods: dict = {}

    def __enter__(self) -> "SyncWatch":
        self._methods = {name: getattr(torch.Tensor, name) for name in _HOST_COPIES}
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, self._recorded(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _recorded(self, name: str, method):
        def copy_to_host(tensor, *args, **kwargs):
            self.syncs.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)

        return copy_to_host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(str(func.overloadpacket))
        if func in _READS:
            self.syncs.append(str(func))
        elif func in _MASKED and len(args) > 1 and any(_is_mask(t) for t in (args[1] or [])):
            self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def test_the_watch_sees_what_stalls_a_gpu():
    x = torch.randn(6, 3)
    mask = x[:, 0] > 0
    for stall in (lambda: bool(mask.any()), lambda: x[mask], lambda: float(x.sum()), lambda: mask.nonzero(),
                  lambda: x.__setitem__(mask, 0.0), lambda: x.tolist(), lambda: x.cpu()):
        with SyncWatch() as w:
            stall()
        assert w.syncs, stall
    with SyncWatch() as w:  # gathering with indices made beforehand is fine
        x[torch.tensor([0, 2])].sum()
    assert not w.syncs


def _watch_device_steps(monkeypatch, context) -> list[SyncWatch]:
    watches: list[SyncWatch] = []
    device_step = Engine._device_step

    def watched(self, *args, **kwargs):
        with context(), SyncWatch() as w:
            values = device_step(self, *args, **kwargs)
        watches.append(w)
        return values

    monkeypatch.setattr(Engine, "_device_step", watched)
    return watches


RECIPE_STEP = ["--preset", "tiny", "--steps", "2", "--batch-size", "16", "--grad-accum", "2", "--no-progress",
               "--warm-start-epochs", "1", "--itm-hard", "0.5", "--heldout", "0", "--save-every", "1000"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_pretraining_step_reads_nothing_back_from_the_device(tiny_catalog, tmp_path, monkeypatch, precision):
    """Every objective (ITM with hard negatives, MLM, MIM, both global heads, view alignment), gradient
    accumulation, clipping and fused AdamW: no op in the step would stall a GPU."""
    from contextlib import nullcontext

    watches = _watch_device_steps(monkeypatch, nullcontext)
    run = tmp_path / "run"
    assert main(["train", str(tiny_catalog), "--out", str(run), "--precision", precision, *RECIPE_STEP]) == 0
    for line in (run / "metrics.jsonl").read_text().splitlines():  # every objective ran in both steps
        assert {"itm", "mlm", "mim", "global_mlm", "global_mim", "align_joint", "align_title"} <= set(json.loads(line))
    item_steps = [w for w in watches if {"aten.nll_loss_forward", "aten.mse_loss"} <= w.seen]
    assert len(item_steps) == 2 and len(watches) > 2  # the image warm start's steps are watched too
    for w in watches:
        assert {"aten.native_layer_norm_backward", "aten._fused_adamw_"} <= w.seen  # backward and AdamW seen
        assert not w.syncs, w.syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_pretraining_step_on_a_gpu_runs_under_sync_debug_mode_error(tiny_catalog, tmp_path, monkeypatch):
    from contextlib import contextmanager

    @contextmanager
    def sync_errors():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    watches = _watch_device_steps(monkeypatch, sync_errors)
    assert main(["train", str(tiny_catalog), "--out", str(tmp_path / "run"), "--device", "cuda",
                 "--precision", "bf16", *RECIPE_STEP]) == 0
    assert watches
