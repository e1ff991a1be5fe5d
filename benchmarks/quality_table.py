"""Write the quality section of RESULTS.md from the runs and evaluations of quality_recipe.sh.

    python benchmarks/quality_table.py OUT_DIR [--no-results]

Reads OUT_DIR/eval-hm*/results.json and OUT_DIR/eval-fashion*/results.json (the split depends only on
the catalog, so every file has the same one), OUT_DIR/walltime.txt and each run's config.json and
metrics.jsonl. Keeps the default recipe (both seeds), the dual encoder of the same budget and the
baselines; any other evaluated feature is left out (and named on stderr). Prints the tables and the
issue-7 targets (PASS/MISS) and writes them between the ``quality`` markers of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.evaluate.baselines import BASELINES  # noqa: E402

# The runs of quality_recipe.sh, as `item-embed evaluate` names them (KIND:folder), and their labels.
RECIPE = "item:item-recipe-shape"
RECIPE_S1 = "item:item-recipe-shape-s1"
DUAL = "dual:dual-recipe"
RUNS = {RECIPE: "item: default recipe", RECIPE_S1: "item: default recipe, seed 1", DUAL: "dual encoder"}

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


def load(out: Path) -> tuple[dict[str, dict], list[str], list[str]]:
    """({feature: {"hm": features-entry, "fashion": features-entry}} for the recipe, the dual and the
    baselines, in that order; the evaluate commands; the names of the features left out)."""
    found: dict[str, dict] = {}
    commands = []
    for key in ("hm", "fashion"):
        for path in sorted(out.glob(f"eval-{key}*/results.json")):
            res = json.loads(path.read_text())
            commands += res.get("commands", [])
            for name, entry in res["features"].items():
                found.setdefault(name, {})[key] = entry
    order = [*RUNS, *BASELINES]
    feats = {name: found[name] for name in order if name in found}
    return feats, commands, sorted(set(found) - set(feats))


def _walls(out: Path) -> dict[str, str]:
    """Run name -> wall seconds, from the lines "NAME (N steps): S s wall" of walltime.txt."""
    walls = {}
    wt = out / "walltime.txt"
    if wt.is_file():
        for line in wt.read_text().splitlines():
            name, _, rest = line.partition(":")
            if rest.strip().endswith("s wall"):
                walls[name.split(" (")[0].strip()] = rest.strip().split()[0]
    return walls


def run_rows(out: Path, names: list[str]) -> list[list[object]]:
    """Per training run: objectives, steps, batch, image stem, lr scale, precision, wall time, final losses."""
    walls = _walls(out)
    rows = []
    for name in names:
        folder = out / name.split(":", 1)[1]
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        train, model = cfg.get("train", {}), cfg.get("model", {})
        if name.startswith("dual"):
            objectives = f"CLIP-style InfoNCE ({cfg.get('dual', {}).get('embed_dim', '?')}-d shared space)"
        else:
            w = cfg.get("objectives", {})
            objectives = ", ".join(f"{k} {w[k]:g}" for k in ("itm", "mlm", "mim", "global_mlm", "global_mim")
                                   if w.get(k)) or "?"
        stem = model.get("image_stem", "linear")
        if model.get("shape_dims"):
            stem += f" + shape slice ({model['shape_dims']} dims x {model['shape_weight']:g})"
        last = {}
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines:
                last = json.loads(lines[-1])
        losses = ", ".join(f"{k} {last[k]:.3f}" for k in ("itm", "itm_acc", "mlm", "mim", "global_mlm", "global_mim",
                                                          "i2t_acc", "t2i_acc", "loss") if k in last)
        scale = train.get("new_lr_scale")
        rows.append([RUNS[name] + f" ({folder.name})", objectives, last.get("step", cfg.get("trained_steps", "?")),
                     train.get("batch_size", "?"), stem, "?" if scale is None else f"{scale:g}",
                     train.get("precision", "?"), walls.get(folder.name, "?"), losses])
    return rows


def label(name: str) -> str:
    return f"**{RUNS[name]}**" if name == RECIPE else RUNS.get(name, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-results", action="store_true", help="print only")
    a = ap.parse_args()
    feats, commands, left_out = load(a.out)
    if left_out:
        print(f"left out (not a run of quality_recipe.sh nor a baseline): {', '.join(left_out)}", file=sys.stderr)
    if not feats:
        print(f"no results of the recipe, the dual or the baselines under {a.out}/eval-*/", file=sys.stderr)
        return 1

    hm_rows = []
    for name, f in feats.items():
        r, p = f.get("hm", {}).get("retrieval", {}), f.get("hm", {}).get("probe", {})
        if not r and not p:
            continue
        hm_rows.append([label(name), *(_f(_get(r, (m, k))) for m, k in (
            ("joint", "R@1"), ("joint", "R@10"), ("joint", "MAP@R"), ("image", "R@1"), ("image", "R@10"),
            ("title", "R@1"), ("image2image", "R@1"))),
            *(_f(_get(p, path)) for path in (("product_type", "linear", "accuracy"),
                                             ("product_type", "knn", "accuracy"),
                                             ("product_group", "linear", "accuracy")))])
    fashion_rows = []
    for name, f in feats.items():
        p = f.get("fashion", {}).get("probe", {})
        if p:
            fashion_rows.append([label(name), *(_f(_get(p, path)) for path in (
                ("article_type", "linear", "accuracy"), ("article_type", "knn", "accuracy"),
                ("sub_category", "linear", "accuracy")))])
    diag_rows = []
    for name, f in feats.items():
        d = f.get("hm", {}).get("diagnostics")
        if d and name.startswith("item"):
            diag_rows.append([label(name), *(_f(d.get(k)) for k in ("cls_attention_image", "cls_attention_text",
                                                                    "cos_joint_image", "cos_joint_title"))])

    runs = [n for n in RUNS if n in feats]
    train_rows = run_rows(a.out, runs)

    # Issue-7 targets: each seed of the recipe beside the dual encoder of the same budget.
    items = [n for n in (RECIPE, RECIPE_S1) if n in feats]
    target_rows = []
    for what, path, target in TARGETS:
        key, *rest = path
        dual = _get(feats[DUAL], (key, *rest)) if DUAL in feats else None
        row = [what, f"{target:.3f}", _f(dual)]
        for n in items:
            v = _get(feats[n], (key, *rest))
            ok = v is not None and v >= target and (dual is None or v > dual)
            row.append("not run" if v is None else f"{_f(v)} {'PASS' if ok else 'MISS'}")
        target_rows.append(row)

    body = "\n\n".join([
        "The default recipe of `item-embed train` (docs/recipe.md) against the CLIP-style dual encoder "
        "(`item-embed train-dual`) trained on the same label-free catalog for the same number of steps, "
        "and the baselines of `item-embed evaluate`. Wall seconds are on the shared 2-core machine and swing "
        "with other jobs (a resumed run shows its last segment only): the step count is the budget that is equal.",
        C.markdown_table(["run", "objectives", "steps", "batch", "image stem (+ embedding slice)",
                          "lr x (from scratch)", "precision", "wall s", "final logged losses"], train_rows),
        "### hm-dev: same-product retrieval (gallery: full products) and category probes",
        C.markdown_table(["features", "joint R@1", "joint R@10", "joint MAP@R", "image-only R@1", "image-only R@10",
                          "title-only R@1", "image2image R@1", "product_type linear", "product_type kNN",
                          "product_group linear"], hm_rows),
        "### fashion-small: category probes on the joint embeddings",
        C.markdown_table(["features", "article_type linear", "article_type kNN", "sub_category linear"],
                         fashion_rows) if fashion_rows else "(not evaluated)",
        "### Modality diagnostics (hm-dev)",
        C.markdown_table(["ITEm run", "[CLS] attention on image", "on text", "cos(joint, image-only)",
                          "cos(joint, title-only)"], diag_rows) if diag_rows else "(none)",
        "### Targets of issue 7 (PASS = reaches the target and beats the dual encoder of the same budget)",
        C.markdown_table(["target", "needed", "dual encoder", *(RUNS[n] for n in items)], target_rows),
        "Commands (training: `bash benchmarks/quality_recipe.sh /tmp/q 3000`; machine: "
        + ", ".join(f"{k} {v}" for k, v in C.machine().items()) + "):\n\n"
        + "\n".join(f"    {c}" for c in commands),
    ])
    print(body)
    if not a.no_results:
        C.update_results("quality", "Quality: the default recipe, the dual encoder and the baselines", body)
        print(f"wrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
