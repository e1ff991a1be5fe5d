#!/usr/bin/env bash
# The default recipe of `item-embed train` at the length of issue 7's whole CPU budget (~2 h of training
# on 2 cores at 8,000 steps), evaluated on both real catalogs (no dual encoder: at this length it alone
# would take another 2 h; compare with quality_recipe.sh's 3,000-step runs).
#   bash benchmarks/quality_long.sh OUT_DIR [STEPS]     # then: python benchmarks/quality_table.py OUT_DIR
set -euo pipefail
out=${1:?usage: quality_long.sh OUT_DIR [STEPS]}
steps=${2:-8000}
name="item-recipe-convcn-$((steps / 1000))k"
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
bash "$here/benchmarks/pretrain_cache.sh" "$out"
if [ ! -f "$out/$name/model.safetensors" ]; then
  start=$(date +%s)
  # No objective, lr or stem flags: the defaults are the recipe ([CLS] alone: this run predates the
  # shape slice, which is fitted after training and leaves [CLS] as it is).
  "$bin/item-embed" train "$out/cache96" --out "$out/$name" --steps "$steps" --batch-size 32 --patch-size 16 \
      --shape-dims 0 --save-every 200 --no-progress --resume
  echo "$name ($steps steps): $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
fi
bash "$here/benchmarks/quality_eval.sh" "$out" "$name"
