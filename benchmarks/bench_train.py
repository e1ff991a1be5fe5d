"""Training throughput and model FLOP utilisation of item-embed's step, against a ViLT-style reference.

item-embed: the ``Pretraining`` task of ``item_embed.train.pretrain`` (``mask_batch`` -> ONE masked
forward pass -> all five objectives, ``ItemObjectives``) -> backward -> clip -> AdamW: the step of the
training engine (``item_embed.train.engine.Engine``), without its checkpoint/log I/O.

Reference (written here, the straightforward way): transformers' ``BertModel`` fed ``inputs_embeds``
(word embeddings ++ a linear patch projection), one forward pass per objective as ViLT's
``objectives.py`` does: ITM on clean text + swapped images, MLM on masked text, MIM on masked
patches, global MLM on masked text, global MIM on masked patches (5 passes), then one backward of
the summed loss, clip, AdamW. Same encoder shape, same head sizes, same precision, same batch.

Both in fp32 and in bf16 autocast, steps interleaved (one item-embed step, one reference step, ...).
MFU = achieved FLOP/s / the 2048x2048 matmul rate of the same precision measured in this run.

    python benchmarks/bench_train.py [--quick]

With ``--device cuda`` (where a GPU is available; CI stays on CPU) the same step runs on the GPU:
models, optimiser state and batches there, bf16 autocast on CUDA only (``--precisions`` to change),
``torch.cuda.synchronize()`` before every timer read, MFU over an 8192x8192 matmul rate measured on
the GPU in the same run, and the results go to their own RESULTS.md section (``bench_train_gpu_b<batch>``).
``--batch`` (default 32, the like-for-like row) also reports a larger batch where the GPU is better used:

    python benchmarks/bench_train.py --device cuda --batch 32
    python benchmarks/bench_train.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.config import ObjectiveConfig, TrainConfig  # noqa: E402
from item_embed.data.arrays import ProductArrays, load_tokenizer  # noqa: E402
from item_embed.data.catalog import Catalog  # noqa: E402
from item_embed.model.attention import Dropout  # noqa: E402
from item_embed.model.encoder import build_model, minilm_model_config  # noqa: E402
from item_embed.model.objectives import (  # noqa: E402
    IGNORE, ItemObjectives, ITMHead, PatchHead, WordHead, mask_batch, patch_targets, special_token_ids,
)
from item_embed.train.engine import adamw, batch_indices, lr_at, param_groups, step_seed  # noqa: E402
from item_embed.train.pretrain import Pretraining  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

BATCH = 32  # default; --batch
IMAGE, PATCH, MAX_TEXT = 96, 16, 40
TARGET_RATIO = 2.5
TARGET_MFU = 0.50
# item-embed runs the paper's linear patch projection (ModelConfig's default, no shape slice), as the reference does.
STEM_NOTE = "linear patch projection, as the reference; not the recipe's conv stem"


# --------------------------------------------------------------------------- data

def load_products(n: int):
    """hm-dev rows (title + description, so every row fills the 40 text tokens), else synthetic."""
    path = C.SHARED_DATA / "hm-dev.parquet"
    if path.exists():
        frame = pd.read_parquet(path).head(n)
        source = f"{path.name} (first {n} rows, title + description cut to {MAX_TEXT} tokens)"
        use_desc = True
    else:
        from item_embed.data.synthetic import generate_catalog

        frame = generate_catalog(n_products=max(2, n // 3), image_size=IMAGE).head(n)
        source = f"synthetic catalog ({len(frame)} rows, titles; {path} not found)"
        use_desc = False
    products = [p for chunk in Catalog(frame).iter_chunks(IMAGE, use_description=use_desc) for p in chunk]
    return products, source


# --------------------------------------------------------------------------- the reference

class ViltStyleReference(nn.Module):
    """BertModel on ``inputs_embeds``; one forward per objective (ViLT-style ``infer`` per ``compute_*``)."""

    def __init__(self, mc) -> None:
        super().__init__()
        h = mc.hidden_size
        bc = BertConfig(
            vocab_size=mc.vocab_size, hidden_size=h, num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_heads, intermediate_size=mc.intermediate_size,
            max_position_embeddings=mc.max_position_embeddings, hidden_dropout_prob=mc.dropout,
            attention_probs_dropout_prob=mc.dropout, layer_norm_eps=mc.layer_norm_eps, type_vocab_size=2,
        )
        bc._attn_implementation = "sdpa"
        self.bert = BertModel(bc, add_pooling_layer=False)
        self.patch_size = mc.patch_size
        self.patch_proj = nn.Linear(mc.patch_dim, h)
        self.image_pos = nn.Parameter(torch.randn(1, mc.num_patches, h) * 0.02)
        self.mask_patch = nn.Parameter(torch.randn(1, 1, h) * 0.02)
        eps = mc.layer_norm_eps
        self.itm_head = ITMHead(h)
        self.mlm_head = WordHead(h, h, mc.vocab_size, eps)
        self.gmlm_head = WordHead(2 * h, h, mc.vocab_size, eps)
        self.mim_head = PatchHead(h, h, mc.patch_dim, eps)
        self.gmim_head = PatchHead(2 * h, h, mc.patch_dim, eps)

    def infer(self, input_ids, text_mask, images, mim_mask=None):
        """One full encoder pass: (B, T) ids + (B, S, S, 3) uint8 images -> (B, T + N, H)."""
        words = self.bert.embeddings.word_embeddings(input_ids)  # (B, T, H)
        p = self.patch_size
        b, s = images.shape[:2]
        g = s // p
        x = images.float() / 127.5 - 1.0
        patches = x.reshape(b, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
        pe = self.patch_proj(patches)  # (B, N, H)
        if mim_mask is not None:
            pe = torch.where(mim_mask.unsqueeze(-1), self.mask_patch.to(pe.dtype), pe)
        pe = pe + self.image_pos
        embeds = torch.cat([words, pe], dim=1)
        ones = torch.ones(b, g * g, dtype=torch.long, device=input_ids.device)
        types = torch.cat([torch.zeros_like(input_ids), ones], dim=1)
        mask = torch.cat([text_mask.long(), ones], dim=1)
        return self.bert(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types).last_hidden_state

    def losses(self, batch, mb) -> dict[str, torch.Tensor]:
        t = batch.input_ids.shape[1]
        word_w = self.bert.embeddings.word_embeddings.weight
        out: dict[str, torch.Tensor] = {}
        # 1. ITM: clean text, half the images swapped.
        h = self.infer(batch.input_ids, batch.text_mask, mb.images)
        rows = mb.itm_labels != IGNORE
        out["itm"] = F.cross_entropy(self.itm_head(h[rows, 0]).float(), mb.itm_labels[rows])
        # 2. MLM: masked text, own images; each masked word from its own output.
        rows, pos = torch.nonzero(mb.mlm_labels != IGNORE, as_tuple=True)
        labels = mb.mlm_labels[rows, pos]
        h = self.infer(mb.input_ids, batch.text_mask, batch.images)
        out["mlm"] = F.cross_entropy(self.mlm_head(h[rows, pos], word_w).float(), labels)
        # 3. MIM: clean text, masked patches; each patch from its own output.
        prow, ppatch = torch.nonzero(mb.mim_mask, as_tuple=True)
        target = patch_targets(batch.images, self.patch_size)[prow, ppatch]
        h = self.infer(batch.input_ids, batch.text_mask, batch.images, mb.mim_mask)
        out["mim"] = F.mse_loss(self.mim_head(h[prow, t + ppatch]).float(), target)
        # 4. Global MLM: masked text again, [CLS] + position embedding.
        h = self.infer(mb.input_ids, batch.text_mask, batch.images)
        posemb = self.bert.embeddings.position_embeddings.weight[pos].to(h.dtype)
        out["global_mlm"] = F.cross_entropy(
            self.gmlm_head(torch.cat([h[rows, 0], posemb], -1), word_w).float(), labels)
        # 5. Global MIM: masked patches again, [CLS] + patch position embedding.
        h = self.infer(batch.input_ids, batch.text_mask, batch.images, mb.mim_mask)
        posemb = self.image_pos[0, ppatch].to(h.dtype)
        out["global_mim"] = F.mse_loss(self.gmim_head(torch.cat([h[prow, 0], posemb], -1)).float(), target)
        out["loss"] = sum(out.values())
        return out


# --------------------------------------------------------------------------- steps

WI_BEFORE = "PyTorch dropout + SDPA + default AdamW"
WI_ATTN0 = "attention dropout 0"
WI_DROP0 = "dropout 0"
WHATIFS = (WI_BEFORE, WI_ATTN0, WI_DROP0)


def use_torch_defaults(model) -> None:
    """The step before: ``nn.Dropout`` for the cheap dropout, transformers' SDPA attention."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    model.bert.config._attn_implementation = "sdpa"

# Both systems' optimiser: the engine's AdamW groups with every parameter at the base lr (the lr does
# not change a step's cost; the engine's 10x groups for ITEm's from-scratch parts would only split them).
NEW_LR_SCALE = 1.0


class Runner:
    """One trainable system (item-embed or the reference) and its optimiser; ``step(i)`` runs step i."""

    def __init__(self, name, data, tokenizer, mc, tcfg, ocfg, reference: bool, torch_defaults: bool = False,
                 attention_dropout: float | None = None, device: str = "cpu") -> None:
        self.name, self.data, self.mc, self.tcfg, self.ocfg, self.reference = name, data, mc, tcfg, ocfg, reference
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.specials = special_token_ids(tokenizer)
        self.mask_id = tokenizer.mask_token_id
        if reference:
            self.model = ViltStyleReference(mc)
            item = build_model(mc, tcfg.seed)  # same MiniLM starting weights for the encoder
            self.model.bert.load_state_dict(item.bert.state_dict())
            del item
            trained = self.model
        else:
            # What `item-embed train` trains: encoder + objective heads as the engine's Task.
            model = build_model(mc, tcfg.seed)
            if torch_defaults:
                use_torch_defaults(model)
            if attention_dropout is not None:
                for layer in model.bert.encoder.layer:
                    layer.attention.self.dropout.p = attention_dropout
            self.task = Pretraining(model, ItemObjectives(model, ocfg), data, tokenizer)
            self.model, self.objectives = self.task.model, self.task.objectives
            trained = self.task
        trained.to(self.device)
        trained.train()
        # param_groups reads only named_parameters() at scale 1, so the reference module takes it too.
        groups = param_groups(trained, tcfg.weight_decay, NEW_LR_SCALE)
        if torch_defaults:  # the step before: AdamW's default implementation
            self.opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.98))
        else:  # the engine's (fused) AdamW, for item-embed and the reference alike
            self.opt = adamw(groups, tcfg.lr, self.device)
        self.params = [p for grp in self.opt.param_groups for p in grp["params"]]

    def masked(self, step):
        """Step ``step``'s batch and its swapped/masked copy, with the engine's seeds: the same for both
        systems (item-embed's through ``Pretraining.batch``, exactly what the engine calls)."""
        cfg = self.tcfg
        torch.manual_seed(step_seed(cfg.seed, step, 2))  # dropout
        g = torch.Generator().manual_seed(step_seed(cfg.seed, step, 3))
        rows = batch_indices(len(self.data), cfg.batch_size, cfg.seed, step)
        if not self.reference:
            mb = self.task.batch(rows, g)
            return None, mb
        batch = self.data.batch(rows)
        mb = mask_batch(batch, self.ocfg, self.mc.num_patches, self.specials, self.mask_id, self.mc.vocab_size, g)
        return batch, mb

    def on_device(self, batch, mb):
        """What the step feeds its system, on the runner's device (item-embed needs only ``mb``)."""
        if not self.cuda:
            return batch, mb
        if self.reference:
            batch = batch.to(self.device)
        return batch, mb.to(self.device)

    def autocast(self, precision: str):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def now(self) -> float:
        """perf_counter, after the GPU's queued work is done (on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def forward(self, batch, mb):
        if self.reference:
            return self.model.losses(batch, mb)
        return self.task(mb)

    def step(self, step: int, precision: str, parts: dict | None = None) -> float:
        """Run one full optimiser step; returns its wall time (s). ``parts`` collects a breakdown."""
        t0 = self.now()
        total = 10**6
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, total, self.tcfg)
        batch, mb = self.on_device(*self.masked(step))
        t1 = self.now()
        ctx = self.autocast(precision)
        with ctx:
            losses = self.forward(batch, mb)
        t2 = self.now()
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        t3 = self.now()
        torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip)
        self.opt.step()
        last = {k: float(v.detach()) for k, v in losses.items()}
        t4 = self.now()
        if not all(math.isfinite(v) for v in last.values()):
            raise RuntimeError(f"{self.name}: non-finite loss {last}")
        if parts is not None:
            for k, v in (("data+mask", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2),
                         ("clip+AdamW", t4 - t3)):
                parts.setdefault(k, []).append(v)
        return t4 - t0


# --------------------------------------------------------------------------- timing

CLEAN_CORES = C.CLEAN_CORES  # a step during which other processes used more CPU than this is not counted


def timed_steps(runners, prec: str, want: int, counter: list[int], budget: C.IdleBudget, verbose: bool = False,
                check: bool = True):
    """Interleaved steps until every runner has ``want`` steps during which no other process used
    more than CLEAN_CORES cores (or 3 x ``want`` rounds have run: the machine is shared).
    ``check=False`` (GPU runs: the host CPU's other users do not slow the GPU's work) counts every step.

    Returns (clean, dirty): per runner name, lists of (seconds, parts) and (seconds, others' cores, parts).
    """
    clean = {r.name: [] for r in runners}
    dirty = {r.name: [] for r in runners}
    last_dirty = False
    for _ in range(3 * want):
        if all(len(v) >= want for v in clean.values()):
            break
        if last_dirty and budget.left > 0:
            budget.wait()  # after a noisy step, let the other jobs finish before timing again
        last_dirty = False
        msg = []
        for r in runners:
            if len(clean[r.name]) >= want:
                continue
            p: dict = {}
            if not check:
                t = r.step(counter[0], prec, p)
                clean[r.name].append((t, {k: v[0] for k, v in p.items()}))
                msg.append(f"{r.name} {t * 1e3:.1f} ms")
                continue
            with C.Interference() as it:
                t = r.step(counter[0], prec, p)
            if it.cores <= CLEAN_CORES:
                clean[r.name].append((t, {k: v[0] for k, v in p.items()}))
            else:
                dirty[r.name].append((t, it.cores, {k: v[0] for k, v in p.items()}))
                last_dirty = True
            msg.append(f"{r.name} {t:.2f}s" + ("" if it.cores <= CLEAN_CORES else f" (others {it.cores:.1f} cores: "
                                                                                  "not counted)"))
        counter[0] += 1
        if verbose:
            print(f"  {prec} step {counter[0]}: " + ", ".join(msg), flush=True)
    return clean, dirty


# --------------------------------------------------------------------------- where the forward's time goes

CATEGORIES = (
    ("matmuls (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("dropout RNG (bernoulli_ / random_)", ("aten::bernoulli_", "aten::random_")),
    ("copies and casts (copy_)", ("aten::copy_",)),
    ("softmax / log-softmax / GELU / LayerNorm", ("aten::_softmax", "aten::_log_softmax", "aten::gelu",
                                                  "aten::native_layer_norm")),
)


# On CUDA: GPU kernel time per op (dropout is one fused kernel there; attention one SDPA kernel).
CUDA_CATEGORIES = (
    ("matmuls (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (SDPA kernels)", ("aten::_flash_attention_forward", "aten::_efficient_attention_forward",
                                  "aten::_scaled_dot_product_flash_attention",
                                  "aten::_scaled_dot_product_efficient_attention",
                                  "aten::_cudnn_attention_forward")),
    ("dropout (native_dropout / bernoulli_)", ("aten::native_dropout", "aten::bernoulli_")),
    ("copies and casts (copy_)", ("aten::copy_",)),
    ("softmax / log-softmax / GELU / LayerNorm", ("aten::_softmax", "aten::_log_softmax", "aten::gelu",
                                                  "aten::native_layer_norm")),
)


def profile_forward(runner: Runner, step: int, prec: str) -> tuple[dict[str, float], float, list[str]]:
    """Share of self CPU time per op category in one forward pass (torch.profiler), its total, top ops.

    On CUDA: share of GPU kernel time, attributed to the aten op that launched each kernel."""
    from torch.profiler import ProfilerActivity, profile

    batch, mb = runner.on_device(*runner.masked(step))
    ctx = lambda: runner.autocast(prec)  # noqa: E731
    with ctx():
        runner.forward(batch, mb)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        with ctx():
            runner.forward(batch, mb)
        if runner.cuda:
            torch.cuda.synchronize(runner.device)
    events = prof.key_averages(group_by_input_shape=True)
    categories = CATEGORIES
    own = lambda e: e.self_cpu_time_total  # noqa: E731
    if runner.cuda:
        from torch.autograd import DeviceType

        categories = CUDA_CATEGORIES
        events = [e for e in events if e.device_type == DeviceType.CPU]  # ops; their kernels' time below
        own = lambda e: e.self_device_time_total  # noqa: E731
    total = sum(own(e) for e in events)
    shares = {name: sum(own(e) for e in events if e.key in ops) / total for name, ops in categories}
    shares["everything else (adds, muls, indexing, overhead)"] = 1.0 - sum(shares.values())
    top = sorted(events, key=lambda e: -own(e))[:6]
    shape = lambda e: max((list(x) for x in (e.input_shapes or []) if x), key=len, default="")  # noqa: E731
    tops = [f"{e.key} {shape(e)} {own(e) / total:.0%}" for e in top]
    return shares, total / 1e3, tops


# --------------------------------------------------------------------------- FLOPs

def analytic_flops(mc, batch, mb, reference: bool) -> dict[str, float]:
    """Training FLOPs (fwd + bwd) of one step, by the formula printed in the report.

    Matmul weights: 6 FLOPs per weight per token (2 forward, 2 grad-input, 2 grad-weight; the patch
    projection has no grad-input: 4). Attention: 12 * L * S^2 * H per sequence (QK^T and AV, 2 * 2 *
    S^2 * H forward per layer, x3 with backward). Heads count their own matmuls on the rows they see.
    """
    h, L, inter, v = mc.hidden_size, mc.num_layers, mc.intermediate_size, mc.vocab_size
    b, t = mb.input_ids.shape
    n = mc.num_patches
    s = t + n
    enc_params = L * (4 * h * h + 2 * h * inter)
    enc = 6 * enc_params * b * s + 12 * L * s * s * h * b
    patch = 4 * mc.patch_dim * h * b * n
    passes = 5 if reference else 1
    matched = torch.ones(b, dtype=torch.bool) if reference else mb.matched
    k_text = int(((mb.mlm_labels != IGNORE) & matched.unsqueeze(1)).sum())
    k_patch = int((mb.mim_mask & matched.unsqueeze(1)).sum())
    k_itm = int((mb.itm_labels != IGNORE).sum())
    heads = 6 * (
        k_itm * (h * h + 2 * h)
        + k_text * ((h * h + h * v) + (2 * h * h + h * v))
        + k_patch * ((h * h + h * mc.patch_dim) + (2 * h * h + h * mc.patch_dim))
    )
    return {"encoder": passes * enc, "patch": passes * patch, "heads": heads,
            "total": passes * (enc + patch) + heads, "seq": s, "k_text": k_text, "k_patch": k_patch,
            "enc_params": enc_params}


def counted_matmul_flops(runner: Runner, step: int) -> float:
    """torch's FlopCounterMode over one fwd + bwd (mm/addmm/bmm: attention only where SDPA falls back to bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, mb = runner.on_device(*runner.masked(step))
    with FlopCounterMode(display=False) as fc:
        losses = runner.forward(batch, mb)
        losses["loss"].backward()
    runner.opt.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


# --------------------------------------------------------------------------- main

def gpu_context(device: torch.device, load_start, load_end, wall: float) -> str:
    """Command, GPU and host, date (the GPU counterpart of ``C.run_context``)."""
    from datetime import datetime, timezone

    m = C.machine()
    props = torch.cuda.get_device_properties(device)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = (f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
           f"{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor})")
    return (f"- Command: `{C.command_line()}` ({wall:.0f} s wall)\n"
            f"- Machine: GPU {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}); host {m['cpu']} ({m['cores']} cores, {m['memory']}, "
            f"python {m['python']})\n"
            f"- When: {when}; host load average (1/5/15 min) at start {C._fmt_load(load_start)}, "
            f"at end {C._fmt_load(load_end)} (on the GPU every timed step is counted: no CPU-load filter)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps each, short matmul timing")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the models, optimiser state and batches live (default cpu; CI stays on cpu)")
    ap.add_argument("--batch", type=int, default=BATCH,
                    help=f"batch size (default {BATCH}, the like-for-like row; larger to fill a GPU)")
    ap.add_argument("--steps", type=int,
                    help="timed steps per system and precision (default 10, quick 2; cuda 50, quick 5)")
    ap.add_argument("--warmup", type=int,
                    help="untimed steps per system and precision (default 2, quick 1; cuda 5, quick 2)")
    ap.add_argument("--wait-quiet", type=float, default=None,
                    help="seconds to wait for the 1-min load to drop below 1.5 (default 180, quick 0; cuda 0)")
    ap.add_argument("--precisions", default=None, help="comma list (default fp32,bf16; cuda bf16)")
    ap.add_argument("--idle-budget", type=float, default=None,
                    help="seconds, in all, to wait for other jobs after a noisy step (default 900, quick 30; "
                         "unused on cuda)")
    ap.add_argument("--no-results", action="store_true",
                    help="print only; leave RESULTS.md alone (--quick never writes it)")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    batch_size = a.batch
    if cuda:
        steps = a.steps or (5 if a.quick else 50)
        warmup = a.warmup if a.warmup is not None else (2 if a.quick else 5)
    else:
        steps = a.steps or (2 if a.quick else 10)
        warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    wait = a.wait_quiet if a.wait_quiet is not None else (0 if a.quick or cuda else 180)
    precisions = [p for p in (a.precisions or ("bf16" if cuda else "fp32,bf16")).split(",") if p]
    mm_seconds = 1.0 if a.quick else 3.0
    mm_n = 8192 if cuda else 2048  # CUDA: large enough for the GPU's peak
    mm_precs = precisions if cuda else ["fp32", "bf16"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # Time units of the report: seconds on CPU, milliseconds on the GPU.
    unit, u, ud = ("ms", 1e3, 1) if cuda else ("s", 1.0, 2)

    wall0 = time.perf_counter()
    tokenizer = load_tokenizer()
    mc = minilm_model_config(image_size=IMAGE, patch_size=PATCH, max_text_len=MAX_TEXT, image_stem="linear")
    products, source = load_products(8 * batch_size)
    data = ProductArrays.build(products, tokenizer, mc.max_text_len, mc.image_size)
    tcfg = TrainConfig(batch_size=batch_size)
    ocfg = ObjectiveConfig()  # the recipe's five objectives (their weights do not change a step's cost)
    item = Runner("item-embed", data, tokenizer, mc, tcfg, ocfg, reference=False, device=a.device)
    ref = Runner("reference", data, tokenizer, mc, tcfg, ocfg, reference=True, device=a.device)
    where = f"; device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}" if cuda else ""
    print(f"data: {source}; batch {batch_size}, image {IMAGE}/{PATCH} = {mc.num_patches} patches, "
          f"max text {MAX_TEXT}; {steps} timed steps after {warmup} warm-up, interleaved{where}", flush=True)

    load1, quiet = C.wait_for_quiet(1.5, wait)
    budget = C.IdleBudget(a.idle_budget if a.idle_budget is not None else (30 if a.quick else 900))
    load_start = C.loadavg()
    rates = {p: [C.matmul_rate(dtypes[p], mm_seconds, a.device, mm_n)] for p in mm_precs}
    print(f"matmul {mm_n}^3{' on ' + a.device if cuda else ''}: "
          + ", ".join(f"{p} {rates[p][0] / 1e9:.0f} GFLOP/s" for p in mm_precs), flush=True)

    times: dict[tuple[str, str], list[float]] = {}
    parts: dict[tuple[str, str], dict] = {}
    noisy: dict[tuple[str, str], list[float]] = {}
    counter = [0]
    for prec in precisions:
        for _ in range(warmup):
            for r in (item, ref):
                r.step(counter[0], prec)
            counter[0] += 1
        clean, dirty = timed_steps((item, ref), prec, steps, counter, budget, verbose=not cuda, check=not cuda)
        for name in clean:
            # With too few clean steps, fall back to all of them (and say so in the report).
            few = len(clean[name]) < 3
            times[(name, prec)] = [t for t, _ in clean[name]] if not few else \
                [t for t, _ in clean[name]] + [d[0] for d in dirty[name]]
            noisy[(name, prec)] = [d[1] for d in dirty[name]]
            pr = parts.setdefault((name, prec), {})
            # The breakdown from the same steps as the times (all of them in the fallback).
            for p_ in [p_ for _, p_ in clean[name]] + ([d[2] for d in dirty[name]] if few else []):
                for k, v in p_.items():
                    pr.setdefault(k, []).append(v)
        if cuda:
            print(f"  {prec}: " + ", ".join(
                f"{n} median {statistics.median(times[(n, prec)]) * 1e3:.1f} ms/step" for n in clean), flush=True)
    step_no = counter[0]
    for p in mm_precs:
        rates[p].append(C.matmul_rate(dtypes[p], mm_seconds, a.device, mm_n))
    load_end = C.loadavg()
    peak = {k: max(v) for k, v in rates.items()}

    # FLOPs of the timed steps: analytic per step (masks vary a little), and FlopCounterMode once.
    flops = {}
    for r in (item, ref):
        per = [analytic_flops(mc, *r.masked(s), reference=r.reference)["total"] for s in range(step_no)]
        flops[r.name] = statistics.mean(per)
    fi = analytic_flops(mc, *item.masked(0), reference=False)
    fr = analytic_flops(mc, *ref.masked(0), reference=True)
    counted = {r.name: counted_matmul_flops(r, 0) for r in (item, ref)}

    # What-ifs on the same item-embed step: the step before (PyTorch's dropout, SDPA attention, AdamW's
    # default implementation), attention dropout 0 (common in newer pre-training; hidden dropout stays),
    # and no dropout at all.
    nodrop_cfg = minilm_model_config(image_size=IMAGE, patch_size=PATCH, max_text_len=MAX_TEXT, image_stem="linear",
                                     dropout=0.0)
    variants = {
        WI_BEFORE: Runner(WI_BEFORE, data, tokenizer, mc, tcfg, ocfg, reference=False, torch_defaults=True,
                          device=a.device),
        WI_ATTN0: Runner(WI_ATTN0, data, tokenizer, mc, tcfg, ocfg, reference=False, attention_dropout=0.0,
                         device=a.device),
        WI_DROP0: Runner(WI_DROP0, data, tokenizer, nodrop_cfg, tcfg, ocfg, reference=False, device=a.device),
    }
    whatif: dict[str, dict[str, float]] = {}
    wi_steps = 1 if a.quick else (20 if cuda else 4)
    for prec in precisions:
        for r in (item, *variants.values()):
            r.step(counter[0], prec)
        counter[0] += 1
        clean, dirty = timed_steps((item, *variants.values()), prec, wi_steps, counter, budget, check=not cuda)
        whatif[prec] = {n: statistics.median([x[0] for x in (clean[n] or dirty[n])]) for n in clean}
    del variants

    if cuda:
        try:
            prof = {prec: profile_forward(item, counter[0], prec) for prec in precisions}
        except Exception as e:  # noqa: BLE001 - the breakdown is extra; (a) and (b) stand without it
            print(f"profile skipped: {type(e).__name__}: {e}", flush=True)
            prof = None
    else:
        prof = {prec: profile_forward(item, counter[0], prec) for prec in precisions}

    # What-if: AdamW's update as configured (per-parameter loop on CPU) vs fused=True on the same grads.
    adamw = {}
    item.step(counter[0], "bf16")
    batch, mb = item.on_device(*item.masked(counter[0]))
    with item.autocast("bf16"):
        item.forward(batch, mb)["loss"].backward()
    for fused in (False, True):
        opt = torch.optim.AdamW(param_groups(item.task, 0.01, NEW_LR_SCALE), lr=1e-6, fused=fused)
        opt.step()
        best = float("inf")
        for _ in range(20 if cuda else 5):
            t0 = item.now()
            opt.step()
            best = min(best, item.now() - t0)
        adamw["fused" if fused else "default"] = best
        del opt
    n_params = sum(p.numel() for p in item.params)

    # ------------------------------------------------------------------ report
    rows, md_rows, summary = [], [], {}
    for prec in precisions:
        res = {}
        for name in ("item-embed", "reference"):
            ts = times[(name, prec)]
            med = statistics.median(ts)
            sps = batch_size / med
            achieved = flops[name] / med
            mfu = achieved / peak[prec]
            res[name] = (sps, mfu)
            dropped = len(noisy[(name, prec)])
            counted_steps = f"{len(ts)}" + (f" (+{dropped} dropped)" if dropped else "")
            row = [f"{name} ({'1 pass' if name == 'item-embed' else '5 passes'})", prec, counted_steps,
                   f"{med * u:.{ud}f}", f"{min(ts) * u:.{ud}f}-{max(ts) * u:.{ud}f}", f"{sps:.1f}",
                   f"{flops[name] / 1e9:.0f}", f"{achieved / 1e9:.0f}", f"{mfu:.{1 if cuda else 0}%}"]
            rows.append(row)
            md_rows.append(row)
        summary[prec] = (res["item-embed"][0] / res["reference"][0], res["item-embed"][1])
    headers = ["system", "precision", "steps timed", f"median {unit}/step", f"range {unit}", "samples/s",
               "GFLOP/step", "achieved GFLOP/s", "MFU"]
    print()
    print(C.text_table(headers, rows))
    print()
    for prec, (ratio, mfu) in summary.items():
        if cuda:
            print(f"{prec}: item-embed / reference = {ratio:.2f}x (the CPU target >= {TARGET_RATIO}x: "
                  f"{'met' if ratio >= TARGET_RATIO else 'not met'} here); item-embed MFU {mfu:.1%} of the "
                  f"measured {prec} matmul rate (the {TARGET_MFU:.0%} target is stated for CPU)")
        else:
            print(f"{prec}: item-embed / reference = {ratio:.2f}x (target >= {TARGET_RATIO}x: "
                  f"{'PASS' if ratio >= TARGET_RATIO else 'MISS'}); item-embed MFU {mfu:.0%} "
                  f"(target >= {TARGET_MFU:.0%}: {'PASS' if mfu >= TARGET_MFU else 'MISS'})")
    bd_rows = []
    pd = 1 if cuda else 0  # decimals of "of peak" percentages
    for prec in precisions:
        pr = parts[("item-embed", prec)]
        tot = sum(statistics.median(v) for v in pr.values())
        fwd, bwd = statistics.median(pr["forward"]), statistics.median(pr["backward"])
        # Forward = 1/3 of the matmul FLOPs (2 of 6 per weight), backward the other 2/3.
        f_rate, b_rate = flops["item-embed"] / 3 / fwd, flops["item-embed"] * 2 / 3 / bwd
        bd_rows.append([prec] + [f"{statistics.median(pr[k]) * u:.{ud + 1}f} ({statistics.median(pr[k]) / tot:.0%})"
                                 for k in ("data+mask", "forward", "backward", "clip+AdamW")]
                       + [f"{f_rate / 1e9:.0f} ({f_rate / peak[prec]:.{pd}%})",
                          f"{b_rate / 1e9:.0f} ({b_rate / peak[prec]:.{pd}%})"])
    bd_headers = ["precision", f"data+mask {unit}", f"forward {unit}", f"backward {unit}", f"clip+AdamW {unit}",
                  "forward GFLOP/s (of peak)", "backward GFLOP/s (of peak)"]
    time_kind = "GPU kernel time" if cuda else "self CPU time"
    if prof is not None:
        prof_headers = ["op category"] + [f"{prec} forward" for prec in precisions]
        prof_rows = [[cat] + [f"{prof[prec][0][cat]:.0%}" for prec in precisions] for cat in prof[precisions[0]][0]]
        prof_rows.append(["(profiled forward, ms)"] + [f"{prof[prec][1]:.0f}" if not cuda else f"{prof[prec][1]:.2f}"
                                                       for prec in precisions])
    print(f"\nitem-embed step breakdown (median {'milliseconds' if cuda else 'seconds'} per step):")
    print(C.text_table(bd_headers, bd_rows))
    if prof is not None:
        print(f"\nitem-embed forward, share of {time_kind} by op (torch.profiler, one forward; profiled time "
              "includes the profiler's own overhead):")
        print(C.text_table(prof_headers, prof_rows))
        for prec in precisions:
            print(f"  top ops {prec}: " + "; ".join(prof[prec][2]))
    default_opt = "CUDA: foreach" if cuda else "CPU: per-parameter loop"
    print(f"\nAdamW update alone over {n_params / 1e6:.1f}M params: default ({default_opt}) "
          f"{adamw['default'] * 1e3:.{2 if cuda else 0}f} ms, fused=True {adamw['fused'] * 1e3:.{2 if cuda else 0}f} ms")
    wi_headers = ["precision", f"as shipped {unit}/step"] + [
        f"{n} {unit}/step (as shipped's speed-up over it)" for n in WHATIFS]
    wi_rows = [[prec, f"{w['item-embed'] * u:.{ud + 1}f}"] + [
        f"{w[n] * u:.{ud + 1}f} ({w[n] / w['item-embed']:.2f}x)" for n in WHATIFS]
        for prec, w in whatif.items()]
    print("\nwhat-ifs (same step, interleaved):")
    print(C.text_table(wi_headers, wi_rows))
    formula = (
        f"FLOPs/step = passes x [6 x P_enc x B x S + 12 x L x S^2 x H x B + 4 x (3p^2 x H) x B x N] + heads, "
        f"heads = 6 x [K_itm (H^2+2H) + K_txt ((H^2+HV) + (2H^2+HV)) + K_patch ((H^2+3p^2 H) + (2H^2+3p^2 H))]; "
        f"P_enc = L (4H^2 + 2 H I) = {fi['enc_params'] / 1e6:.2f}M (L={mc.num_layers}, H={mc.hidden_size}, "
        f"I={mc.intermediate_size}, V={mc.vocab_size}), B={batch_size}, S = T + N = {fi['seq']}, "
        f"K = masked words / patches / ITM rows the heads see "
        f"(item-embed: matched rows only, ~{fi['k_text']} words and {fi['k_patch']} patches per step; "
        f"reference: all rows, ~{fr['k_text']} and {fr['k_patch']}); passes = 1 (item-embed) or 5 (reference)."
    )
    print("\n" + formula)
    first = {"item-embed": fi["total"], "reference": fr["total"]}  # step 0, the step FlopCounterMode saw
    check = "step 0: " + "; ".join(
        f"{n}: analytic {first[n] / 1e9:.2f} GFLOP vs torch FlopCounterMode {counted[n] / 1e9:.2f} GFLOP "
        f"({counted[n] / first[n] - 1:+.2%})" for n in counted)
    if cuda:
        check += (" (FlopCounterMode, fp32 fwd + bwd on the GPU: mm/addmm/bmm plus its formulas for the fused "
                  "CUDA SDPA attention kernels)")
    else:
        check += (" (FlopCounterMode counts mm/addmm/bmm: item-embed's CPU attention is written out as two "
                  "matmuls, and the reference's SDPA runs its math fallback with attention dropout in training)")
    print("cross-check: " + check)
    if cuda:
        print(f"matmul rate {mm_n}^3 on the GPU (max of start/end): "
              + ", ".join(f"{p} {peak[p] / 1e9:.0f} GFLOP/s" for p in mm_precs))
    else:
        print(f"matmul rate (max of start/end): fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")

    wall = time.perf_counter() - wall0
    if C.leave_results(a):
        return 0
    if cuda:
        body = gpu_body(a, locals())
        name = f"bench_train_gpu_b{batch_size}"
        C.update_results(name, f"(a) Training throughput and (b) MFU on the GPU, batch {batch_size}", body)
        print(f"\nwrote {C.RESULTS} (section {name})")
        return 0
    ctx = C.run_context(load_start, load_end, quiet, wall)
    ratio_lines = "\n".join(
        f"- **{prec}**: item-embed / reference = **{ratio:.2f}x** (target >= {TARGET_RATIO}x): "
        f"{C.verdict(ratio >= TARGET_RATIO)}. item-embed MFU **{mfu:.0%}** (target >= {TARGET_MFU:.0%}): "
        f"{C.verdict(mfu >= TARGET_MFU)}."
        for prec, (ratio, mfu) in summary.items())
    body = f"""{ctx}
- Setup: preset minilm (6 layers, H 384, 12 heads), image {IMAGE} / patch {PATCH} = {mc.num_patches} patches ({STEM_NOTE}),
  max text {MAX_TEXT} tokens, batch {batch_size}, all five objectives, AdamW + grad clip; data {source}.
  {warmup} warm-up + {steps} timed steps per system and precision, interleaved step by step. samples/s =
  batch / median step time. A step during which other processes used more than {CLEAN_CORES} cores
  (from /proc/stat, this process excluded) is dropped and re-run after the machine is idle again
  ("dropped" column; {budget.waited:.0f} s spent waiting for other jobs in this run). Reference = transformers `BertModel(inputs_embeds=...)`, one pass per
  objective (ITM, MLM, MIM, global MLM, global MIM), same head sizes (the library's head classes),
  masked losses on all rows (ViLT has no swapped rows in its masked passes).

{C.markdown_table(headers, md_rows)}

{ratio_lines}

**Matmul rate** (2048x2048, best of the start/end measurements of this run): fp32
{peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s. MFU = achieved FLOP/s over the rate of
the precision used.

**FLOP count** (analytic, per step): {formula}
Cross-check: {check}.

**item-embed step breakdown** (median seconds per step; % of the step):

{C.markdown_table(bd_headers, bd_rows)}

Forward = 1/3 and backward = 2/3 of the step's FLOPs. Where one forward's time goes (torch.profiler,
share of self CPU time; the profiler adds its own overhead):

{C.markdown_table(prof_headers, prof_rows)}

Top ops: """ + "; ".join(f"{prec}: " + ", ".join(prof[prec][2]) for prec in precisions) + f""".

What-ifs (same item-embed step, interleaved with the step as shipped, median of a few steps; the benchmark
swaps parts of the shipped model: "{WI_BEFORE}" puts back `nn.Dropout`, transformers' SDPA attention and
AdamW's default implementation; the others set the dropout probabilities to 0):

{C.markdown_table(wi_headers, wi_rows)}

AdamW update alone over {n_params / 1e6:.1f}M parameters (incl. the 11.7M-row word embedding, which
gets a dense gradient from the tied MLM heads): default (on CPU a per-parameter loop)
{adamw['default'] * 1e3:.0f} ms, `fused=True` (what the engine uses) {adamw['fused'] * 1e3:.0f} ms.
"""
    section = "bench_train" if batch_size == BATCH else f"bench_train_b{batch_size}"
    C.update_results(section, "(a) Training throughput and (b) model FLOP utilisation", body)
    print(f"\nwrote {C.RESULTS}")
    return 0


def gpu_body(a, v: dict) -> str:
    """The RESULTS.md section of a ``--device cuda`` run (``v``: main's locals)."""
    batch_size, mc, prof, precisions = v["batch_size"], v["mc"], v["prof"], v["precisions"]
    ctx = gpu_context(v["dev"], v["load_start"], v["load_end"], v["wall"])
    ratio_lines = "\n".join(
        f"- **{prec}**: item-embed / reference = **{ratio:.2f}x** (the CPU target is >= {TARGET_RATIO}x: "
        f"{'met here too' if ratio >= TARGET_RATIO else '**not met** here'}). item-embed MFU **{mfu:.1%}** of the "
        f"{prec} matmul rate measured on this GPU (the {TARGET_MFU:.0%} target is stated for CPU; "
        f"reported, not judged)."
        for prec, (ratio, mfu) in v["summary"].items())
    like = ("the like-for-like row: same batch as the CPU section" if batch_size == BATCH else
            f"a larger batch than the CPU section's {BATCH}, where the GPU is better used")
    synthetic = ("" if "synthetic" not in v["source"] else
                 " (../shared/data is not on the GPU machine, so the script fell back to synthetic products: "
                 "their titles are shorter than the CPU section's title + description, and a batch's text is "
                 f"padded to its longest row, not to {MAX_TEXT}: S = T + N is smaller than the CPU section's "
                 f"{MAX_TEXT} + {mc.num_patches} (FLOP count below; per-step FLOPs are counted on the actual "
                 "batches) and fewer masked words reach the MLM heads, so the rows are not like-for-like with "
                 "the CPU section's; T varies from batch to batch, and a new shape costs the SDPA kernel a new "
                 "plan now and then: the slow maxima in 'range')")
    peak = v["peak"]
    rate = ", ".join(f"{p} {peak[p] / 1e12:.1f} TFLOP/s" for p in v["mm_precs"])
    prof_part = ""
    if prof is not None:
        prof_part = f"""

Where one forward's GPU time goes (torch.profiler with CUDA activity: kernel time attributed to the aten
op that launched it; the profiler adds its own overhead):

{C.markdown_table(v["prof_headers"], v["prof_rows"])}

Top ops: """ + "; ".join(f"{prec}: " + ", ".join(prof[prec][2]) for prec in precisions) + "."
    return f"""{ctx}
- Setup: preset minilm (6 layers, H 384, 12 heads), image {IMAGE} / patch {PATCH} = {mc.num_patches} patches ({STEM_NOTE}),
  max text {MAX_TEXT} tokens, batch {batch_size} ({like}), all five objectives, AdamW + grad clip;
  data {v["source"]}{synthetic}. Models, optimiser state and batches on the GPU
  (masking on the host as in the training engine, then copied over: inside the timed step);
  {", ".join(precisions)} autocast on CUDA. {v["warmup"]} warm-up + {v["steps"]} timed steps per system and precision,
  interleaved step by step, `torch.cuda.synchronize()` before every timer read. samples/s = batch / median
  step time. Reference as in the CPU section (transformers `BertModel(inputs_embeds=...)`, one pass per
  objective).

{C.markdown_table(v["headers"], v["md_rows"])}

{ratio_lines}

**Matmul rate** ({v["mm_n"]}x{v["mm_n"]} `torch.mm` on the GPU, best of the start/end measurements of this run):
{rate}. MFU = achieved FLOP/s (analytic count below) over that rate.

**FLOP count** (analytic, per step): {v["formula"]}
Cross-check: {v["check"]}.

**item-embed step breakdown** (median milliseconds per step; % of the step):

{C.markdown_table(v["bd_headers"], v["bd_rows"])}

Forward = 1/3 and backward = 2/3 of the step's FLOPs.{prof_part}

What-ifs (same item-embed step, interleaved with the step as shipped, median of {v["wi_steps"]} steps; the benchmark
swaps parts of the shipped model as in the CPU section):

{C.markdown_table(v["wi_headers"], v["wi_rows"])}

AdamW update alone over {v["n_params"] / 1e6:.1f}M parameters: default (on CUDA the foreach implementation)
{v["adamw"]['default'] * 1e3:.2f} ms, `fused=True` {v["adamw"]['fused'] * 1e3:.2f} ms.
"""


if __name__ == "__main__":
    raise SystemExit(main())
