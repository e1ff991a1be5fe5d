"""Write the quality section of RESULTS.md from the runs and evaluations of quality_recipe.sh.

    python benchmarks/quality_table.py OUT_DIR [--no-results]

Reads OUT_DIR/eval-hm*/results.json and OUT_DIR/eval-fashion*/results.json (the split depends only on
the catalog, so every file has the same one), OUT_DIR/walltime.txt and each run's config.json,
metrics.jsonl and warmstart/done.json. Keeps the default recipe (two seeds, as ``item:`` and as
``item-cls:``, its [CLS] alone), the dual encoder of the same budget (two seeds) and the baselines; any
other evaluated feature is left out (and named on stderr). Prints issue 22's targets (PASS/MISS), a table
per catalog and the runs, and writes them between the ``quality`` markers of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.evaluate.baselines import BASELINES  # noqa: E402

# The runs of quality_recipe.sh (folder names) per seed; `item-embed evaluate` names features KIND:folder.
SEEDS = {0: ("item-recipe", "dual-recipe"), 1: ("item-recipe-s1", "dual-recipe-s1")}
KINDS = {"item": "ITEm default recipe", "item-cls": "ITEm [CLS] alone, no HOG slice", "dual": "dual encoder"}
RUN_FEATURES = {f"{kind}:{SEEDS[seed][kind == 'dual']}": f"{what}, seed {seed}"
                for kind, what in KINDS.items() for seed in SEEDS}

HM_COLUMNS = [("joint R@1", ("retrieval", "joint", "R@1")), ("photo-only R@1", ("retrieval", "image", "R@1")),
              ("title-only R@1", ("retrieval", "title", "R@1")),
              ("image2image R@1", ("retrieval", "image2image", "R@1")),
              ("title2image R@1", ("retrieval", "title2image", "R@1")),
              ("title2image R@10", ("retrieval", "title2image", "R@10")),
              ("product_type linear", ("probe", "product_type", "linear", "accuracy")),
              ("product_type linear, photo", ("probe", "product_type (image)", "linear", "accuracy")),
              ("product_group linear", ("probe", "product_group", "linear", "accuracy")),
              ("product_group linear, photo", ("probe", "product_group (image)", "linear", "accuracy"))]
FASHION_COLUMNS = [("title2image R@1", ("retrieval", "title2image", "R@1")),
                   ("title2image R@10", ("retrieval", "title2image", "R@10")),
                   ("article_type linear", ("probe", "article_type", "linear", "accuracy")),
                   ("article_type linear, photo", ("probe", "article_type (image)", "linear", "accuracy")),
                   ("sub_category linear", ("probe", "sub_category", "linear", "accuracy")),
                   ("sub_category linear, photo", ("probe", "sub_category (image)", "linear", "accuracy"))]


def _get(doc, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def load(out: Path) -> tuple[dict[str, dict], list[str], list[str]]:
    """({feature: {"hm": features-entry, "fashion": features-entry}} for the runs and the baselines, in
    that order; the evaluate commands; the names of the features left out). A later eval-* folder (e.g.
    eval-hm-RUN of a re-evaluation) replaces an earlier one's entry for the same feature."""
    found: dict[str, dict] = {}
    commands: list[str] = []
    for key in ("hm", "fashion"):
        for path in sorted(out.glob(f"eval-{key}*/results.json")):
            res = json.loads(path.read_text())
            commands += [c for c in res.get("commands", []) if c not in commands]
            for name, entry in res["features"].items():
                found.setdefault(name, {})[key] = entry
    order = [*RUN_FEATURES, *BASELINES]
    feats = {name: found[name] for name in order if name in found}
    return feats, commands, sorted(set(found) - set(feats))


def _walls(out: Path) -> dict[str, str]:
    """Run name -> wall seconds, from the lines "NAME (N steps): S s wall" of walltime.txt (the last one)."""
    walls = {}
    wt = out / "walltime.txt"
    if wt.is_file():
        for line in wt.read_text().splitlines():
            name, _, rest = line.partition(":")
            if rest.strip().endswith("s wall"):
                walls[name.split(" (")[0].strip()] = rest.strip().split()[0]
    return walls


def run_info(folder: Path) -> dict:
    """Steps, training seconds, final held-out ITM accuracy, warm-start seconds and precision of one run."""
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    records = []
    if (folder / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    itm = [r["heldout_itm_acc"] for r in records if math.isfinite(r.get("heldout_itm_acc") or math.nan)]
    done = folder / "warmstart" / "done.json"
    return {"steps": records[-1]["step"] if records else cfg.get("trained_steps"),
            "seconds": records[-1].get("elapsed") if records else None,
            "heldout_itm": itm[-1] if itm else None,
            "warm_seconds": json.loads(done.read_text()).get("seconds") if done.is_file() else None,
            "precision": cfg.get("train", {}).get("precision"),
            "batch": cfg.get("train", {}).get("batch_size")}


def run_rows(out: Path, infos: dict[str, dict]) -> list[list[object]]:
    walls = _walls(out)
    rows = []
    for name, i in infos.items():
        rows.append([f"`{name}`", i["steps"] or "?", i["batch"] or "?",
                     "–" if i["warm_seconds"] is None else f"{i['warm_seconds']:.0f}",
                     "?" if i["seconds"] is None else f"{i['seconds']:.0f}", walls.get(name, "?"),
                     _f(i["heldout_itm"]), i["precision"] or "?"])
    return rows


def feature_table(feats: dict[str, dict], key: str, columns: list) -> str:
    rows = []
    for name, f in feats.items():
        entry = f.get(key)
        if entry:
            what = RUN_FEATURES.get(name, "baseline")
            rows.append([f"`{name}` ({what})", *(_f(_get(entry, path)) for _, path in columns)])
    return C.markdown_table(["features", *(h for h, _ in columns)], rows) if rows else "(not evaluated)"



HM_PT = ("probe", "product_type", "linear", "accuracy")
FA_AT = ("probe", "article_type", "linear", "accuracy")
FA_AT_PHOTO = ("probe", "article_type (image)", "linear", "accuracy")
T2I_R10 = ("retrieval", "title2image", "R@10")
PEERS = ("fusion_hog", "fusion")  # the baselines the category probes must beat


def _at(feats: dict, seed: int, kind: str, key: str, path: tuple[str, ...]) -> float | None:
    """A number of the seed's run of this kind (item, item-cls or dual) on catalog ``key``."""
    item, dual = SEEDS[seed]
    return _get(feats.get(f"{kind}:{dual if kind == 'dual' else item}", {}).get(key), path)


def _peers(feats: dict, key: str, path: tuple[str, ...]) -> dict[str, float | None]:
    return {p: _get(feats.get(p, {}).get(key), path) for p in PEERS}


def at_least(kind: str, key: str, path: tuple[str, ...], target: float):
    """A check: the seed's number >= target. A check returns (value, cell text, met: True/False/None)."""
    def check(feats: dict, infos: dict, seed: int):
        v = _at(feats, seed, kind, key, path)
        return v, _f(v), None if v is None else v >= target
    return check


def photo_probe(feats: dict, infos: dict, seed: int):
    v, cls = (_at(feats, seed, kind, "fashion", FA_AT_PHOTO) for kind in ("item", "item-cls"))
    return v, f"{_f(v)} (item-cls {_f(cls)})", None if v is None else v >= 0.87


def heldout_itm(feats: dict, infos: dict, seed: int):
    v = infos.get(SEEDS[seed][0], {}).get("heldout_itm")
    return v, _f(v), None if v is None else v >= 0.90


def above_fusion(key: str, path: tuple[str, ...], target: float):
    """A check: >= target and above every peer baseline (None: a peer was not evaluated)."""
    def check(feats: dict, infos: dict, seed: int):
        v = _at(feats, seed, "item", key, path)
        if v is None:
            return None, "–", None
        peers = _peers(feats, key, path).values()
        if v < target or any(p is not None and v <= p for p in peers):
            return v, _f(v), False
        return v, _f(v), None if None in peers else True
    return check


def above_dual(feats: dict, infos: dict, seed: int):
    v, d = (_at(feats, seed, kind, "fashion", T2I_R10) for kind in ("item", "dual"))
    return v, f"{_f(v)} (dual {_f(d)})", None if v is None or d is None else v > d


def targets(feats: dict) -> list[tuple[str, object, str]]:
    """Issue 22's targets: (measure, check, target text)."""
    hog = _f(_get(feats.get("hog", {}).get("hm"), ("retrieval", "image", "R@1")))
    peers = {key: ", ".join(f"{p} {_f(v)}" for p, v in _peers(feats, key, path).items())
             for key, path in (("hm", HM_PT), ("fashion", FA_AT))}
    return [
        ("hm-dev photo-only query R@1, the model's own embedding (`item-cls`)",
         at_least("item-cls", "hm", ("retrieval", "image", "R@1"), 0.45), f">= 0.45 (HOG alone {hog})"),
        ("fashion-small article_type linear probe, photo-only embeddings (`item`)", photo_probe,
         ">= 0.87 (pixels 0.735, HOG 0.803, a CNN trained on the labels 0.862)"),
        ("held-out ITM accuracy (last checkpoint, metrics.jsonl)", heldout_itm, ">= 0.90"),
        ("hm-dev joint R@1", at_least("item", "hm", ("retrieval", "joint", "R@1"), 0.995), ">= 0.995"),
        ("hm-dev title-only query R@1 (full-product gallery)",
         at_least("item", "hm", ("retrieval", "title", "R@1"), 0.95), ">= 0.95 (MiniLM text 0.919)"),
        ("hm-dev product_type linear probe (joint)", above_fusion("hm", HM_PT, 0.865),
         f">= 0.865 and above {peers['hm']}"),
        ("fashion-small article_type linear probe (joint)", above_fusion("fashion", FA_AT, 0.972),
         f">= 0.972 and above {peers['fashion']}"),
        ("fashion-small title2image R@10 (`item`)", above_dual, "above the dual encoder of the same seed"),
    ]


def verdict(results: list[tuple]) -> str:
    """PASS only when both seeds were measured and both meet the target; a seed below it is a MISS."""
    measured = [ok for v, _, ok in results if v is not None]
    only = "only seed " + ", ".join(str(s) for s, (v, _, _) in zip(SEEDS, results) if v is not None)
    if not measured:
        return "not run"
    if False in measured:
        return C.verdict(False) + ("" if len(measured) == len(results) else f" ({only} run)")
    if None in measured:
        return "cannot tell (a peer was not evaluated)"
    return C.verdict(True) if len(measured) == len(results) else f"{only} (meets it; PASS needs both)"


def targets_table(feats: dict[str, dict], infos: dict[str, dict]) -> str:
    rows = []
    for what, check, target in targets(feats):
        results = [check(feats, infos, s) for s in SEEDS]
        rows.append([what, *(text if v is not None else "not run" for v, text, _ in results), target,
                     verdict(results)])
    return C.markdown_table(["measure", "seed 0", "seed 1", "target", "PASS/MISS"], rows)


def commands_text(out: Path, infos: dict[str, dict], eval_commands: list[str]) -> str:
    """What reproduces the section: the scripts, the trainings they run and the evaluations recorded."""
    steps = next((i["steps"] for i in infos.values() if i["steps"]), "STEPS")
    lines = [f"bash benchmarks/quality_recipe.sh {out} {steps}   # all of the below",
             f"bash benchmarks/pretrain_cache.sh {out}   # the label-free catalog and its 96 px / 64-token cache"]
    for seed, (item, dual) in SEEDS.items():
        flags = f" --seed {seed}" if seed else ""
        lines += [f"item-embed train {out}/cache96 --out {out}/{item} --steps {steps} --save-every 250{flags}",
                  f"item-embed train-dual {out}/cache96 --out {out}/{dual} --steps {steps} --save-every 250{flags}"]
    lines += [f"bash benchmarks/quality_eval.sh {out}   # runs:", *eval_commands,
              f".venv/bin/python benchmarks/quality_table.py {out}   # this section"]
    machine = ", ".join(f"{k} {v}" for k, v in C.machine().items())
    return ("Commands (`item-embed train` has no recipe flags: its defaults are the recipe, view alignment and "
            "held-out ITM included):\n\n" + "\n".join(f"    {c}" for c in lines)
            + f"\n\nMachine where quality_table.py ran (run the whole pipeline on one machine): {machine}.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-results", action="store_true", help="print only")
    a = ap.parse_args()
    feats, eval_commands, left_out = load(a.out)
    if left_out:
        print(f"left out (not a run of quality_recipe.sh nor a baseline): {', '.join(left_out)}", file=sys.stderr)
    if not feats:
        print(f"no results of the recipe, the dual or the baselines under {a.out}/eval-*/", file=sys.stderr)
        return 1
    runs = [pair[i] for i in (0, 1) for pair in SEEDS.values()]  # the ITEm runs, then the duals
    infos = {name: run_info(a.out / name) for name in runs if (a.out / name).is_dir()}
    body = "\n\n".join([
        "`item-embed train` with no flags (its defaults are the recipe: ITEm's five objectives with view alignment) on two "
        "seeds, the CLIP-style dual encoder (`item-embed train-dual`) of the same budget on the same seeds, and "
        "the baselines of `item-embed evaluate`, all trained label-free on the same catalog (`pretrain_cache.sh`). "
        "`item:RUN` is the embedding users get; `item-cls:RUN` is the model's `[CLS]` alone, without the "
        "hand-made HOG slice.",
        "### Targets of issue 22 (PASS = met on both seeds)",
        targets_table(feats, infos),
        "### hm-dev: same-product retrieval (gallery: full products; title2image: photos alone) and probes",
        feature_table(feats, "hm", HM_COLUMNS),
        "### fashion-small: title-to-photo retrieval (each product its own group) and probes",
        feature_table(feats, "fashion", FASHION_COLUMNS),
        "### Runs (training seconds from metrics.jsonl, across resumes; wall from walltime.txt, both stages, "
        "last segment only when resumed)",
        C.markdown_table(["run", "steps", "batch", "warm start s", "training s", "wall s", "held-out ITM",
                          "precision"], run_rows(a.out, infos)) if infos else "(no run folders)",
        commands_text(a.out, infos, eval_commands),
    ])
    print(body)
    if not a.no_results:
        C.update_results("quality", "Quality: the default recipe, the dual encoder and the baselines", body)
        print(f"wrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
