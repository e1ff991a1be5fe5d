#!/usr/bin/env bash
# Input-type centring measured on runs trained without it: `item-embed fit-centers` copies each run with
# its centres (from a fixed sample of 2,048 products of the training cache, no labels) to OUT_DIR/RUN-c,
# then hm-dev is evaluated for the copy -> OUT_DIR/eval-hm-RUN-c/ (quality_table.py puts it beside RUN).
#   bash benchmarks/quality_centers.sh OUT_DIR RUN [RUN ...]
set -euo pipefail
out=${1:?usage: quality_centers.sh OUT_DIR RUN [RUN ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
data="$here/../shared/data"
for name in "$@"; do
  [ -f "$out/$name-c/model.safetensors" ] || "$bin/item-embed" fit-centers "$out/cache96" --model "$out/$name" --out "$out/$name-c"
  [ -f "$out/eval-hm-$name-c/results.json" ] && continue
  start=$(date +%s)
  "$bin/item-embed" evaluate "$data/hm-dev.parquet" --featurizer "item:$out/$name-c" \
      --group group --labels product_type,product_group --out-dir "$out/eval-hm-$name-c" --no-progress
  echo "eval-hm-$name-c: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
done
