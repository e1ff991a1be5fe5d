#!/usr/bin/env bash
# The quality runs of RESULTS.md (issue 22's targets): `item-embed train` with its DEFAULT recipe
# (docs/recipe.md: ITEm's five objectives with view alignment, held-out ITM measured at every checkpoint) on two
# seeds, and the CLIP-style dual encoder (`item-embed train-dual`) at the same budget on the same two seeds,
# then evaluated beside the baselines on both real catalogs (quality_eval.sh).
#   bash benchmarks/quality_recipe.sh OUT_DIR [STEPS]     # then: python benchmarks/quality_table.py OUT_DIR
# Budget: STEPS optimiser steps x batch 32 at 96 px / patch 16, 64 text tokens (+ H&M descriptions),
# --precision auto (recorded in each run's config.json), on the unlabeled images and titles of both
# catalogs (make_pretrain_catalog.py, pretrain_cache.sh). RESULTS.md's table was made with STEPS 600 (the
# default): about 18 min per ITEm run and 12 per dual on 2 cores.
set -euo pipefail
out=${1:?usage: quality_recipe.sh OUT_DIR [STEPS]}
steps=${2:-600}
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
bash "$here/benchmarks/pretrain_cache.sh" "$out"
train() {  # train NAME SUBCOMMAND [FLAGS...]
  local name=$1 sub=$2; shift 2
  [ -f "$out/$name/model.safetensors" ] && return 0
  local start; start=$(date +%s)
  "$bin/item-embed" "$sub" "$out/cache96" --out "$out/$name" --steps "$steps" --save-every 250 \
      --no-progress --resume "$@"
  echo "$name ($steps steps): $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
}
# No flags on purpose: these runs check that the defaults are the recipe.
train item-recipe train
train item-recipe-s1 train --seed 1
# The dual encoder: same data, steps, batch, sizes and precision; its own defaults.
train dual-recipe train-dual
train dual-recipe-s1 train-dual --seed 1
# Every run beside the baselines, on both catalogs -> OUT_DIR/eval-{hm,fashion}/.
bash "$here/benchmarks/quality_eval.sh" "$out"
