"""Does ``item-embed train --compile`` pay? The training step as shipped, eager vs torch.compile, side by side.

The step is ``item_embed.train``'s loop body (mask_batch -> one shared forward -> five objectives
-> backward -> clip -> AdamW) on the minilm preset; ``--compile`` wraps the encoder's forward in
``torch.compile(dynamic=True)`` exactly as ``train`` does. Compilation time is reported apart and
never inside a timed step. Batches come from synthetic products (titles of varying length, so
shapes change from batch to batch as in real training).

    python benchmarks/bench_compile.py [--device cpu|cuda] [--steps 20] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.catalog import Catalog  # noqa: E402
from item_embed.config import ObjectiveConfig  # noqa: E402
from item_embed.data import ProductArrays, load_tokenizer  # noqa: E402
from item_embed.model import minilm_model_config  # noqa: E402
from item_embed.objectives import ItemObjectives, mask_batch, special_token_ids  # noqa: E402
from item_embed.synthetic import generate_catalog  # noqa: E402
from item_embed.train import Pretrainer, build_model  # noqa: E402

IMAGE, PATCH, MAX_TEXT = 96, 16, 40


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_runner(compiled: bool, dev: torch.device, precision: str, dynamic: bool | None = True):
    mc = minilm_model_config(image_size=IMAGE, patch_size=PATCH, max_text_len=MAX_TEXT)
    model = build_model(mc, seed=0)
    objectives = ItemObjectives(model, ObjectiveConfig())
    module = Pretrainer(model, objectives).to(dev).train()
    if compiled:
        model.forward = torch.compile(model.forward, dynamic=dynamic)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    params = list(module.parameters())
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(mb) -> float:
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            losses = module(mb.to(dev))
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(dev)
        return time.perf_counter() - t0

    return mc, step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compilation happens here)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dynamic", default="true", choices=["true", "auto"],
                    help="torch.compile(dynamic=True) as train does, or dynamic=None (recompile, then generalise)")
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    load_start = C.loadavg()
    wall0 = time.perf_counter()
    tok = load_tokenizer()
    frame = generate_catalog(n_products=200, image_size=IMAGE)
    products = [p for chunk in Catalog(frame).iter_chunks(IMAGE) for p in chunk]
    data = ProductArrays.build(products, tok, MAX_TEXT, IMAGE)
    specials = special_token_ids(tok)
    n_batches = a.warmup + a.steps
    rng = np.random.default_rng(0)
    batches = []
    for i in range(n_batches):
        idx = rng.choice(len(data), a.batch, replace=len(data) < a.batch)
        g = torch.Generator().manual_seed(i)
        batches.append((data.batch(idx), g))

    results = {}
    for name, compiled in (("eager", False), ("torch.compile", True)):
        torch.manual_seed(0)
        mc, step = make_runner(compiled, dev, a.precision, True if a.dynamic == "true" else None)
        masked = [mask_batch(b, ObjectiveConfig(), mc.num_patches, specials, tok.mask_token_id, mc.vocab_size, g)
                  for b, g in batches]
        t0 = time.perf_counter()
        warm = [step(mb) for mb in masked[: a.warmup]]
        warm_s = time.perf_counter() - t0
        times = [step(mb) for mb in masked[a.warmup:]]
        results[name] = (statistics.median(times), min(times), max(times), warm_s, sum(warm))
        print(f"{name}: warm-up {warm_s:.1f} s ({a.warmup} steps, compilation included); "
              f"median step {results[name][0] * 1e3:.1f} ms over {a.steps}")
    eager, comp = results["eager"][0], results["torch.compile"][0]
    speedup = eager / comp
    rows = [[n, f"{r[0] * 1e3:.1f}", f"{r[1] * 1e3:.1f}-{r[2] * 1e3:.1f}", f"{a.batch / r[0]:.0f}", f"{r[3]:.1f}"]
            for n, r in results.items()]
    table = C.markdown_table(["variant", "median ms/step", "range ms", "samples/s", "warm-up s (compile)"], rows)
    verdict = "pays" if speedup >= 1.1 else "does not pay"
    print(table)
    print(f"torch.compile / eager speed-up: {speedup:.2f}x ({verdict})")
    if a.no_results:
        return 0
    if dev.type == "cuda":
        where = (f"GPU {torch.cuda.get_device_name()} (torch {torch.__version__}); host load not relevant")
    else:
        where = C.run_context(load_start, C.loadavg(), load_start[0] < 1.5, time.perf_counter() - wall0)
    body = f"""- Command: `python benchmarks/bench_compile.py --device {a.device} --precision {a.precision} --batch {a.batch} --steps {a.steps}`
- Where: {where}
- Setup: minilm preset, {IMAGE} px / patch {PATCH}, up to {MAX_TEXT} text tokens (synthetic titles, padded per
  batch), all five objectives, {a.precision}, batch {a.batch}; {a.warmup} warm-up steps (compilation happens there),
  {a.steps} timed steps each, the same batches and masks for both.

{table}

- torch.compile / eager: **{speedup:.2f}x** — `--compile` {verdict} here.
"""
    body = body.replace("--steps", f"--dynamic {a.dynamic} --steps", 1)
    C.update_results(f"bench_compile_{a.device}", f"`--compile` on {a.device.upper()} (training step)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
