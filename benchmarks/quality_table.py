"""Write the quality section of RESULTS.md from the runs and evaluations of quality_runs.sh / quality_eval.sh.

    python benchmarks/quality_table.py OUT_DIR [--no-results]

Reads every OUT_DIR/eval-hm*/results.json and OUT_DIR/eval-fashion*/results.json (each feature,
baselines included: one harness; the split depends only on the catalog, so every file has the same one), OUT_DIR/walltime.txt and each run's config.json and
metrics.jsonl. Prints the tables and the issue-7 targets (PASS/MISS) and writes them into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# The targets of "make ITEm beat every baseline" (hm-dev and fashion-small, harness of evaluate).
TARGETS = [
    ("hm-dev image-only query R@1", ("hm", "retrieval", "image", "R@1"), 0.40),
    ("hm-dev joint R@1", ("hm", "retrieval", "joint", "R@1"), 0.995),
    ("hm-dev product_type linear probe", ("hm", "probe", "product_type", "linear", "accuracy"), 0.87),
    ("fashion-small article_type linear probe", ("fashion", "probe", "article_type", "linear", "accuracy"), 0.980),
]


def _get(doc: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def load(out: Path) -> tuple[dict[str, dict], list[str]]:
    """{feature: {"hm": features-entry, "fashion": features-entry}} and the evaluate commands."""
    feats: dict[str, dict] = {}
    commands = []
    for key in ("hm", "fashion"):
        for path in sorted(out.glob(f"eval-{key}*/results.json")):
            res = json.loads(path.read_text())
            commands += res.get("commands", [])
            for name, entry in res["features"].items():
                feats.setdefault(name, {})[key] = entry
    return feats, commands


def run_rows(out: Path) -> list[list[object]]:
    """Per training run: objective weights, steps, batch, wall time, final losses."""
    walls = {}
    wt = out / "walltime.txt"
    if wt.is_file():
        for line in wt.read_text().splitlines():
            name, _, rest = line.partition(":")
            if rest.strip().endswith("s wall"):
                walls[name.split(" (")[0].strip()] = rest.strip().split()[0]  # "run (N steps): S s wall"
    rows = []
    for run in sorted(p for p in out.iterdir() if (p / "model.safetensors").is_file()):
        cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
        train = cfg.get("train", {})
        obj = train.get("objectives", {})
        weights = ",".join(f"{k}={v:g}" for k, v in obj.items()
                           if k in ("itm", "mlm", "mim", "global_mlm", "global_mim", "contrastive", "image_contrastive")
                           and v)
        if obj.get("contrastive"):
            # Runs from before the option existed moved the full embedding too.
            how = "full embedding fixed" if obj.get("contrastive_stop_grad", False) else "both ways"
            dims = f", last {obj['contrastive_dims']} coordinates" if obj.get("contrastive_dims") else ""
            weights += f" (views {obj.get('contrastive_views')}, {how}{dims})"
        if obj.get("image_contrastive") and obj.get("image_contrastive_proj"):
            weights += f" (projection {obj['image_contrastive_proj']})"
        if obj.get("title_dropout"):
            weights += f", title dropout {obj['title_dropout']:g}"
            if obj.get("title_dropout_mim"):
                weights += " (+ their whole picture by global MIM)"
        if obj.get("mim_target", "pixels") != "pixels":
            weights += f", MIM target {obj['mim_target']}"
        model = cfg.get("model", {})
        stem = model.get("image_stem", "linear")  # runs saved before the option: linear
        if model.get("shape_dims"):  # runs saved before the shape slice have none
            stem += f" + shape slice ({model['shape_dims']} dims x {model['shape_weight']:g})"
        last = {}
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines:
                last = json.loads(lines[-1])
        elif cfg.get("shape_slice"):  # `fit-shape` output: the source run's training, its own slice
            stem += f", slice refitted from {Path(cfg['shape_slice']['from_model']).name}"
            last = {"step": cfg.get("trained_steps", "?")}
        losses = ", ".join(f"{k} {last[k]:.3f}" for k in ("itm", "itm_acc", "mlm", "mim", "contrastive",
                                                          "image_contrastive", "title_from_image", "image_from_image", "loss")
                           if k in last)
        rows.append([run.name, weights or "CLIP-style InfoNCE", last.get("step", "?") if last else "?",
                     train.get("batch_size", cfg.get("batch_size", "?")), stem,
                     f"{train.get('new_lr_scale', 1.0):g}",  # runs from before the option: scale 1
                     walls.get(run.name, "?"), losses])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-results", action="store_true", help="print only")
    a = ap.parse_args()
    feats, commands = load(a.out)
    if not feats:
        print(f"no results under {a.out}/eval-*/", file=sys.stderr)
        return 1

    ret_rows = []
    for name, f in feats.items():
        r = f.get("hm", {}).get("retrieval", {})
        ret_rows.append([name, *(_f(_get(r, (m, k))) for m, k in (("joint", "R@1"), ("joint", "R@10"),
                                                                  ("joint", "MAP@R"), ("image", "R@1"),
                                                                  ("image", "R@10"), ("title", "R@1"),
                                                                  ("image2image", "R@1")))])
    probe_rows = []
    for name, f in feats.items():
        cells = [_get(f, ("hm", "probe", "product_type", "linear", "accuracy")),
                 _get(f, ("hm", "probe", "product_type", "knn", "accuracy")),
                 _get(f, ("hm", "probe", "product_group", "linear", "accuracy")),
                 _get(f, ("fashion", "probe", "article_type", "linear", "accuracy")),
                 _get(f, ("fashion", "probe", "article_type", "knn", "accuracy")),
                 _get(f, ("fashion", "probe", "sub_category", "linear", "accuracy"))]
        probe_rows.append([name, *map(_f, cells)])
    diag_rows = []
    for name, f in feats.items():
        d = f.get("hm", {}).get("diagnostics")
        if d:
            diag_rows.append([name, *(_f(d.get(k)) for k in ("cls_attention_image", "cls_attention_text",
                                                             "cos_joint_image", "cos_joint_title"))])

    evaluated = {n.split(":", 1)[-1] for n in feats}
    runs = [r for r in run_rows(a.out) if r[0] in evaluated]
    steps = {r[0]: r[2] for r in runs}

    # Issue-7 targets: every ITEm run beside the dual encoder trained for the same number of steps.
    target_tables = []
    for budget in sorted({steps.get(n.split(":", 1)[-1]) for n in feats if n.startswith("item")}, key=str):
        item_names = [n for n in feats if n.startswith("item") and steps.get(n.split(":", 1)[-1]) == budget]
        # Every dual of the budget (each image stem): a PASS must beat all of them.
        duals = [n for n in feats if n.startswith("dual") and steps.get(n.split(":", 1)[-1]) == budget]
        target_rows = []
        for label, path, target in TARGETS:
            key, *rest = path
            dual_vs = [_get(feats[d], (key, *rest)) for d in duals]
            row = [label, f"{target:.3f}", *map(_f, dual_vs)] if duals else [label, f"{target:.3f}", "–"]
            for n in item_names:
                v = _get(feats[n], (key, *rest))
                ok = v is not None and v >= target and all(d is None or v > d for d in dual_vs)
                row.append(f"{_f(v)} {'PASS' if ok else 'MISS'}")
            target_rows.append(row)
        target_tables.append(f"{budget} steps:\n\n" + C.markdown_table(
            ["target", "needed", *(duals or ["dual (not run)"]), *item_names], target_rows))
    counts = sorted({int(r[2]) for r in runs if str(r[2]).isdigit()})
    budgets = " and ".join(filter(None, [", ".join(f"{n:,}" for n in counts[:-1]), f"{counts[-1]:,}"])) if counts else "?"
    body = "\n\n".join([
        f"Training runs (budgets of {budgets} steps; otherwise the same batch, image/patch size, text "
        "length, precision and preprocessing cache for all; wall seconds are on the shared 2-core machine and "
        "swing with other jobs (some runs shared the cores with another run or an evaluation; a resumed run "
        "shows its last segment only), so the step count is the budget that is equal):",
        C.markdown_table(["run", "objectives", "steps", "batch", "image stem (+ embedding slice)", "lr x (from scratch)", "wall s",
                          "final logged losses"], runs),
        "### hm-dev: same-product retrieval (gallery: full products; 3,828 queries)",
        C.markdown_table(["features", "joint R@1", "joint R@10", "joint MAP@R", "image R@1", "image R@10",
                          "title R@1", "image2image R@1"], ret_rows),
        "### Category prediction, frozen embeddings (test fold: hash of group, or id)",
        C.markdown_table(["features", "hm product_type linear", "hm product_type kNN", "hm product_group linear",
                          "fashion article_type linear", "fashion article_type kNN",
                          "fashion sub_category linear"], probe_rows),
        "### Modality diagnostics (hm-dev)",
        C.markdown_table(["ITEm run", "[CLS] attention on image", "on text", "cos(joint, image-only)",
                          "cos(joint, title-only)"], diag_rows) if diag_rows else "(none)",
        "### Targets of issue 7 (PASS = reaches the target and beats every dual encoder of the same budget)",
        *target_tables,
        "Commands (training: `bash benchmarks/quality_runs.sh /tmp/q 600` and "
        "`bash benchmarks/quality_recipe.sh /tmp/q 3000`, `bash benchmarks/quality_long.sh /tmp/q 8000`; machine: "
        + ", ".join(f"{k} {v}" for k, v in C.machine().items()) + "):\n\n"
        + "\n".join(f"    {c}" for c in commands),
    ])
    print(body)
    if not a.no_results:
        C.update_results("quality", "Quality: ITEm, its ablations, the dual encoder and the baselines", body)
        print(f"wrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
