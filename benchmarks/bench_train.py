"""Training throughput and model FLOP utilisation of item-embed's step, against a ViLT-style reference.

item-embed: ``mask_batch`` -> ONE masked forward pass -> all five objectives -> backward -> clip ->
AdamW (the loop body of ``item_embed.train.train``, without its checkpoint/log I/O).

Reference (written here, the straightforward way): transformers' ``BertModel`` fed ``inputs_embeds``
(word embeddings ++ a linear patch projection), one forward pass per objective as ViLT's
``objectives.py`` does: ITM on clean text + swapped images, MLM on masked text, MIM on masked
patches, global MLM on masked text, global MIM on masked patches (5 passes), then one backward of
the summed loss, clip, AdamW. Same encoder shape, same head sizes, same precision, same batch.

Both in fp32 and in bf16 autocast, steps interleaved (one item-embed step, one reference step, ...).
MFU = achieved FLOP/s / the 2048x2048 matmul rate of the same precision measured in this run.

    python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.catalog import Catalog  # noqa: E402
from item_embed.config import ObjectiveConfig, TrainConfig  # noqa: E402
from item_embed.data import ProductArrays, load_tokenizer  # noqa: E402
from item_embed.model import minilm_model_config  # noqa: E402
from item_embed.objectives import (  # noqa: E402
    IGNORE, ItemObjectives, ITMHead, PatchHead, WordHead, mask_batch, patch_targets, special_token_ids,
)
from item_embed.train import _param_groups, _step_seed, batch_indices, build_model, lr_at  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

BATCH = 32
IMAGE, PATCH, MAX_TEXT = 96, 16, 40
TARGET_RATIO = 2.5
TARGET_MFU = 0.50


# --------------------------------------------------------------------------- data

def load_products(n: int):
    """hm-dev rows (title + description, so every row fills the 40 text tokens), else synthetic."""
    path = C.SHARED_DATA / "hm-dev.parquet"
    if path.exists():
        frame = pd.read_parquet(path).head(n)
        source = f"{path.name} (first {n} rows, title + description cut to {MAX_TEXT} tokens)"
        use_desc = True
    else:
        from item_embed.synthetic import generate_catalog

        frame = generate_catalog(n_products=max(2, n // 3), image_size=IMAGE).head(n)
        source = f"synthetic catalog ({len(frame)} rows, titles)"
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
        types = torch.cat([torch.zeros_like(input_ids), torch.ones(b, g * g, dtype=torch.long)], dim=1)
        mask = torch.cat([text_mask.long(), torch.ones(b, g * g, dtype=torch.long)], dim=1)
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

class Runner:
    """One trainable system (item-embed or the reference) and its optimiser; ``step(i)`` runs step i."""

    def __init__(self, name, data, tokenizer, mc, tcfg, reference: bool, sdpa_math: bool = False) -> None:
        self.name, self.data, self.mc, self.tcfg, self.reference = name, data, mc, tcfg, reference
        self.sdpa_math = sdpa_math  # what-if: force SDPA's math backend (QK^T, softmax, AV as plain ops)
        self.specials = special_token_ids(tokenizer)
        self.mask_id = tokenizer.mask_token_id
        if reference:
            self.model = ViltStyleReference(mc)
            item = build_model(mc, tcfg.seed)  # same MiniLM starting weights for the encoder
            self.model.bert.load_state_dict(item.bert.state_dict())
            del item
            modules = [self.model]
        else:
            self.model = build_model(mc, tcfg.seed)
            self.objectives = ItemObjectives(self.model, tcfg.objectives)
            modules = [self.model, self.objectives]
        for m in modules:
            m.train()
        self.opt = torch.optim.AdamW(_param_groups(modules, tcfg.weight_decay), lr=tcfg.lr, betas=(0.9, 0.98))
        self.params = [p for grp in self.opt.param_groups for p in grp["params"]]
        self.autocast = None

    def masked(self, step):
        cfg = self.tcfg
        torch.manual_seed(_step_seed(cfg.seed, step, 2))
        g = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 3))
        batch = self.data.batch(batch_indices(len(self.data), cfg.batch_size, cfg.seed, step))
        mb = mask_batch(batch, cfg.objectives, self.mc.num_patches, self.specials, self.mask_id,
                        self.mc.vocab_size, g)
        return batch, mb

    def forward(self, batch, mb):
        if self.reference:
            return self.model.losses(batch, mb)
        out = self.model(mb.input_ids, mb.text_mask, mb.images, mb.has_image, mb.mim_mask)
        return self.objectives(self.model, out, mb)

    def step(self, step: int, precision: str, parts: dict | None = None) -> float:
        """Run one full optimiser step; returns its wall time (s). ``parts`` collects a breakdown."""
        t0 = time.perf_counter()
        total = 10**6
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, total, self.tcfg)
        batch, mb = self.masked(step)
        t1 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        backend = sdpa_kernel(SDPBackend.MATH) if self.sdpa_math else nullcontext()
        with ctx, backend:
            losses = self.forward(batch, mb)
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip)
        self.opt.step()
        last = {k: float(v.detach()) for k, v in losses.items()}
        t4 = time.perf_counter()
        if not all(math.isfinite(v) for v in last.values()):
            raise RuntimeError(f"{self.name}: non-finite loss {last}")
        if parts is not None:
            for k, v in (("data+mask", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2),
                         ("clip+AdamW", t4 - t3)):
                parts.setdefault(k, []).append(v)
        return t4 - t0


# --------------------------------------------------------------------------- timing

CLEAN_CORES = C.CLEAN_CORES  # a step during which other processes used more CPU than this is not counted


def timed_steps(runners, prec: str, want: int, counter: list[int], budget: C.IdleBudget, verbose: bool = False):
    """Interleaved steps until every runner has ``want`` steps during which no other process used
    more than CLEAN_CORES cores (or 3 x ``want`` rounds have run: the machine is shared).

    Returns (clean, dirty): per runner name, lists of (seconds, parts) and (seconds, others' cores).
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
            with C.Interference() as it:
                t = r.step(counter[0], prec, p)
            if it.cores <= CLEAN_CORES:
                clean[r.name].append((t, {k: v[0] for k, v in p.items()}))
            else:
                dirty[r.name].append((t, it.cores))
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
    ("dropout RNG (bernoulli_)", ("aten::bernoulli_",)),
    ("copies and casts (copy_)", ("aten::copy_",)),
    ("softmax / log-softmax / GELU / LayerNorm", ("aten::_softmax", "aten::_log_softmax", "aten::gelu",
                                                  "aten::native_layer_norm")),
)


def profile_forward(runner: Runner, step: int, prec: str) -> tuple[dict[str, float], float, list[str]]:
    """Share of self CPU time per op category in one forward pass (torch.profiler), its total, top ops."""
    from torch.profiler import ProfilerActivity, profile

    batch, mb = runner.masked(step)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else nullcontext
    with ctx():
        runner.forward(batch, mb)  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with ctx():
            runner.forward(batch, mb)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key in ops) / total for name, ops in CATEGORIES}
    shares["everything else (adds, muls, indexing, overhead)"] = 1.0 - sum(shares.values())
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    shape = lambda e: max((list(x) for x in (e.input_shapes or []) if x), key=len, default="")  # noqa: E731
    tops = [f"{e.key} {shape(e)} {e.self_cpu_time_total / total:.0%}" for e in top]
    return shares, total / 1e3, tops


# --------------------------------------------------------------------------- FLOPs

def matmul_rate(dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of back-to-back 2048x2048 @ 2048x2048 products (best of several timed blocks)."""
    n = 2048
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        reps, t0 = 4, time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
    return best


def analytic_flops(mc, batch, mb, reference: bool) -> dict[str, float]:
    """Training FLOPs (fwd + bwd) of one step, by the formula printed in the report.

    Matmul weights: 6 FLOPs per weight per token (2 forward, 2 grad-input, 2 grad-weight; the patch
    projection has no grad-input: 4). Attention: 12 * L * S^2 * H per sequence (QK^T and AV, 2 * 2 *
    S^2 * H forward per layer, x3 with backward). Heads count their own matmuls on the rows they see.
    """
    h, L, inter, v = mc.hidden_size, mc.num_layers, mc.intermediate_size, mc.vocab_size
    b, t = batch.input_ids.shape
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

    batch, mb = runner.masked(step)
    with FlopCounterMode(display=False) as fc:
        losses = runner.forward(batch, mb)
        losses["loss"].backward()
    runner.opt.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps each, short matmul timing")
    ap.add_argument("--steps", type=int, help="timed steps per system and precision (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps per system and precision (default 2, quick 1)")
    ap.add_argument("--wait-quiet", type=float, default=None,
                    help="seconds to wait for the 1-min load to drop below 1.5 (default 180, quick 0)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--idle-budget", type=float, default=None,
                    help="seconds, in all, to wait for other jobs after a noisy step (default 900, quick 30)")
    ap.add_argument("--no-results", action="store_true",
                    help="print only; leave RESULTS.md alone (--quick never writes it)")
    a = ap.parse_args()
    steps = a.steps or (2 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    wait = a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 180)
    precisions = [p for p in a.precisions.split(",") if p]
    mm_seconds = 1.0 if a.quick else 3.0

    wall0 = time.perf_counter()
    tokenizer = load_tokenizer()
    mc = minilm_model_config(image_size=IMAGE, patch_size=PATCH, max_text_len=MAX_TEXT)
    products, source = load_products(8 * BATCH)
    data = ProductArrays.build(products, tokenizer, mc.max_text_len, mc.image_size)
    tcfg = TrainConfig(batch_size=BATCH, objectives=ObjectiveConfig())
    item = Runner("item-embed", data, tokenizer, mc, tcfg, reference=False)
    ref = Runner("reference", data, tokenizer, mc, tcfg, reference=True)
    print(f"data: {source}; batch {BATCH}, image {IMAGE}/{PATCH} = {mc.num_patches} patches, "
          f"max text {MAX_TEXT}; {steps} timed steps after {warmup} warm-up, interleaved", flush=True)

    load1, quiet = C.wait_for_quiet(1.5, wait)
    budget = C.IdleBudget(a.idle_budget if a.idle_budget is not None else (30 if a.quick else 900))
    load_start = C.loadavg()
    rates = {"fp32": [matmul_rate(torch.float32, mm_seconds)], "bf16": [matmul_rate(torch.bfloat16, mm_seconds)]}
    print(f"matmul 2048^3: fp32 {rates['fp32'][0] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'][0] / 1e9:.0f} GFLOP/s",
          flush=True)

    times: dict[tuple[str, str], list[float]] = {}
    parts: dict[tuple[str, str], dict] = {}
    noisy: dict[tuple[str, str], list[float]] = {}
    counter = [0]
    for prec in precisions:
        for _ in range(warmup):
            for r in (item, ref):
                r.step(counter[0], prec)
            counter[0] += 1
        clean, dirty = timed_steps((item, ref), prec, steps, counter, budget, verbose=True)
        for name in clean:
            # With too few clean steps, fall back to all of them (and say so in the report).
            times[(name, prec)] = [t for t, _ in clean[name]] if len(clean[name]) >= 3 else \
                [t for t, _ in clean[name]] + [t for t, _ in dirty[name]]
            noisy[(name, prec)] = [c for _, c in dirty[name]]
            pr = parts.setdefault((name, prec), {})
            for _, p_ in clean[name]:
                for k, v in p_.items():
                    pr.setdefault(k, []).append(v)
    step_no = counter[0]
    rates["fp32"].append(matmul_rate(torch.float32, mm_seconds))
    rates["bf16"].append(matmul_rate(torch.bfloat16, mm_seconds))
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

    # What-ifs on the same item-embed step: dropout 0 (MiniLM's config has 0.1 on hidden states and
    # attention probabilities: Bernoulli draws on CPU are slow, and attention dropout keeps SDPA on its
    # math path), and dropout 0 with SDPA forced to the math path (its fused CPU kernel's backward is slow
    # in bf16).
    nodrop_cfg = minilm_model_config(image_size=IMAGE, patch_size=PATCH, max_text_len=MAX_TEXT, dropout=0.0)
    variants = {
        "dropout 0": Runner("dropout 0", data, tokenizer, nodrop_cfg, tcfg, reference=False),
        "dropout 0 + SDPA math": Runner("dropout 0 + SDPA math", data, tokenizer, nodrop_cfg, tcfg,
                                        reference=False, sdpa_math=True),
    }
    whatif: dict[str, dict[str, float]] = {}
    for prec in precisions:
        for r in (item, *variants.values()):
            r.step(counter[0], prec)
        counter[0] += 1
        clean, dirty = timed_steps((item, *variants.values()), prec, 1 if a.quick else 4, counter, budget)
        whatif[prec] = {n: statistics.median([t for t, _ in (clean[n] or dirty[n])]) for n in clean}
    del variants

    prof = {prec: profile_forward(item, counter[0], prec) for prec in precisions}

    # What-if: AdamW's update as configured (per-parameter loop on CPU) vs fused=True on the same grads.
    adamw = {}
    item.step(counter[0], "bf16")
    batch, mb = item.masked(counter[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        item.forward(batch, mb)["loss"].backward()
    for fused in (False, True):
        opt = torch.optim.AdamW(_param_groups([item.model, item.objectives], 0.01), lr=1e-6, fused=fused)
        opt.step()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        adamw["fused" if fused else "default"] = best
    n_params = sum(p.numel() for p in item.params)

    # ------------------------------------------------------------------ report
    rows, md_rows, summary = [], [], {}
    for prec in precisions:
        res = {}
        for name in ("item-embed", "reference"):
            ts = times[(name, prec)]
            med = statistics.median(ts)
            sps = BATCH / med
            achieved = flops[name] / med
            mfu = achieved / peak[prec]
            res[name] = (sps, mfu)
            dropped = len(noisy[(name, prec)])
            counted_steps = f"{len(ts)}" + (f" (+{dropped} dropped)" if dropped else "")
            row = [f"{name} ({'1 pass' if name == 'item-embed' else '5 passes'})", prec, counted_steps,
                   f"{med:.2f}", f"{min(ts):.2f}-{max(ts):.2f}", f"{sps:.1f}", f"{flops[name] / 1e9:.0f}",
                   f"{achieved / 1e9:.0f}", f"{mfu:.0%}"]
            rows.append(row)
            md_rows.append(row)
        summary[prec] = (res["item-embed"][0] / res["reference"][0], res["item-embed"][1])
    headers = ["system", "precision", "steps timed", "median s/step", "range s", "samples/s", "GFLOP/step",
               "achieved GFLOP/s", "MFU"]
    print()
    print(C.text_table(headers, rows))
    print()
    for prec, (ratio, mfu) in summary.items():
        print(f"{prec}: item-embed / reference = {ratio:.2f}x (target >= {TARGET_RATIO}x: "
              f"{'PASS' if ratio >= TARGET_RATIO else 'MISS'}); item-embed MFU {mfu:.0%} "
              f"(target >= {TARGET_MFU:.0%}: {'PASS' if mfu >= TARGET_MFU else 'MISS'})")
    bd_rows = []
    for prec in precisions:
        pr = parts[("item-embed", prec)]
        tot = sum(statistics.median(v) for v in pr.values())
        fwd, bwd = statistics.median(pr["forward"]), statistics.median(pr["backward"])
        # Forward = 1/3 of the matmul FLOPs (2 of 6 per weight), backward the other 2/3.
        f_rate, b_rate = flops["item-embed"] / 3 / fwd, flops["item-embed"] * 2 / 3 / bwd
        bd_rows.append([prec] + [f"{statistics.median(pr[k]):.3f} ({statistics.median(pr[k]) / tot:.0%})"
                                 for k in ("data+mask", "forward", "backward", "clip+AdamW")]
                       + [f"{f_rate / 1e9:.0f} ({f_rate / peak[prec]:.0%})", f"{b_rate / 1e9:.0f} ({b_rate / peak[prec]:.0%})"])
    bd_headers = ["precision", "data+mask s", "forward s", "backward s", "clip+AdamW s",
                  "forward GFLOP/s (of peak)", "backward GFLOP/s (of peak)"]
    prof_headers = ["op category"] + [f"{prec} forward" for prec in precisions]
    prof_rows = [[cat] + [f"{prof[prec][0][cat]:.0%}" for prec in precisions] for cat in prof[precisions[0]][0]]
    prof_rows.append(["(profiled forward, ms)"] + [f"{prof[prec][1]:.0f}" for prec in precisions])
    print("\nitem-embed step breakdown (median seconds per step):")
    print(C.text_table(bd_headers, bd_rows))
    print("\nitem-embed forward, share of self CPU time by op (torch.profiler, one forward; profiled time "
          "includes the profiler's own overhead):")
    print(C.text_table(prof_headers, prof_rows))
    for prec in precisions:
        print(f"  top ops {prec}: " + "; ".join(prof[prec][2]))
    print(f"\nAdamW update alone over {n_params / 1e6:.1f}M params: default (CPU: per-parameter loop) "
          f"{adamw['default'] * 1e3:.0f} ms, fused=True {adamw['fused'] * 1e3:.0f} ms")
    wi_headers = ["precision", "as shipped (dropout 0.1) s/step"] + [f"{n} s/step (speed-up)" for n in
                                                                      ("dropout 0", "dropout 0 + SDPA math")]
    wi_rows = [[prec, f"{w['item-embed']:.3f}"] + [f"{w[n]:.3f} ({w['item-embed'] / w[n]:.2f}x)" for n in
                                                     ("dropout 0", "dropout 0 + SDPA math")]
               for prec, w in whatif.items()]
    print("\nwhat-ifs (same step, interleaved):")
    print(C.text_table(wi_headers, wi_rows))
    formula = (
        f"FLOPs/step = passes x [6 x P_enc x B x S + 12 x L x S^2 x H x B + 4 x (3p^2 x H) x B x N] + heads, "
        f"heads = 6 x [K_itm (H^2+2H) + K_txt ((H^2+HV) + (2H^2+HV)) + K_patch ((H^2+3p^2 H) + (2H^2+3p^2 H))]; "
        f"P_enc = L (4H^2 + 2 H I) = {fi['enc_params'] / 1e6:.2f}M (L={mc.num_layers}, H={mc.hidden_size}, "
        f"I={mc.intermediate_size}, V={mc.vocab_size}), B={BATCH}, S = T + N = {fi['seq']}, "
        f"K = masked words / patches / ITM rows the heads see "
        f"(item-embed: matched rows only, ~{fi['k_text']} words and {fi['k_patch']} patches per step; "
        f"reference: all rows, ~{fr['k_text']} and {fr['k_patch']}); passes = 1 (item-embed) or 5 (reference)."
    )
    print("\n" + formula)
    first = {"item-embed": fi["total"], "reference": fr["total"]}  # step 0, the step FlopCounterMode saw
    check = "step 0: " + "; ".join(
        f"{n}: analytic {first[n] / 1e9:.2f} GFLOP vs torch FlopCounterMode {counted[n] / 1e9:.2f} GFLOP "
        f"({counted[n] / first[n] - 1:+.2%})" for n in counted)
    check += (" (FlopCounterMode counts mm/addmm/bmm; it has no formula for CPU SDPA kernels, but with "
              "attention dropout 0.1 in training SDPA runs its math fallback, whose QK^T and AV bmm's it counts)")
    print("cross-check: " + check)
    print(f"matmul rate (max of start/end): fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")

    wall = time.perf_counter() - wall0
    if a.no_results or a.quick:
        print("RESULTS.md left alone (--quick or --no-results)")
        return 0
    ctx = C.run_context(load_start, load_end, quiet, wall)
    ratio_lines = "\n".join(
        f"- **{prec}**: item-embed / reference = **{ratio:.2f}x** (target >= {TARGET_RATIO}x): "
        f"{C.verdict(ratio >= TARGET_RATIO)}. item-embed MFU **{mfu:.0%}** (target >= {TARGET_MFU:.0%}): "
        f"{C.verdict(mfu >= TARGET_MFU)}."
        for prec, (ratio, mfu) in summary.items())
    quick_note = "\n\n*`--quick` run: smoke numbers, not for quoting.*" if a.quick else ""
    body = f"""{ctx}
- Setup: preset minilm (6 layers, H 384, 12 heads), image {IMAGE} / patch {PATCH} = {mc.num_patches} patches,
  max text {MAX_TEXT} tokens, batch {BATCH}, all five objectives, AdamW + grad clip; data {source}.
  {warmup} warm-up + {steps} timed steps per system and precision, interleaved step by step. samples/s =
  batch / median step time. A step during which other processes used more than {CLEAN_CORES} cores
  (from /proc/stat, this process excluded) is dropped and re-run after the machine is idle again
  ("dropped" column; {budget.waited:.0f} s spent waiting for other jobs in this run). Reference = transformers `BertModel(inputs_embeds=...)`, one pass per
  objective (ITM, MLM, MIM, global MLM, global MIM), same head sizes (the library's head classes),
  masked losses on all rows (ViLT has no swapped rows in its masked passes).{quick_note}

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

What-ifs (same item-embed step, interleaved with the step as shipped, median of a few steps; the
library is unchanged, the benchmark only sets `dropout=0.0` in the model config and/or wraps the forward
in `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`):

{C.markdown_table(wi_headers, wi_rows)}

AdamW update alone over {n_params / 1e6:.1f}M parameters (incl. the 11.7M-row word embedding, which
gets a dense gradient from the tied MLM heads): default (on CPU a per-parameter loop)
{adamw['default'] * 1e3:.0f} ms, `fused=True` {adamw['fused'] * 1e3:.0f} ms.
"""
    C.update_results("bench_train", "(a) Training throughput and (b) model FLOP utilisation", body)
    print(f"\nwrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
