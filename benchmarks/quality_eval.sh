#!/usr/bin/env bash
# Evaluate the runs of quality_runs.sh beside every baseline, on both real catalogs, same splits.
#   bash benchmarks/quality_eval.sh OUT_DIR
# Writes OUT_DIR/eval-hm/results.{json,md} and OUT_DIR/eval-fashion/results.{json,md}.
# Every ITEm run found in OUT_DIR (a folder with model.safetensors and no dual_config) is included.
set -euo pipefail
out=${1:?usage: quality_eval.sh OUT_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
data="$here/../shared/data"
models=()
for run in "$out"/item-*/; do
  [ -f "$run/model.safetensors" ] && models+=(--featurizer "item:${run%/}")
done
[ -f "$out/dual/model.safetensors" ] && models+=(--featurizer "dual:$out/dual")
baselines=tfidf,minilm,minilm_title,pixels16,phash,fusion
start=$(date +%s)
"$bin/item-embed" evaluate "$data/hm-dev.parquet" "${models[@]}" --baselines "$baselines" \
    --group group --labels product_type,product_group --out-dir "$out/eval-hm" --no-progress
echo "eval hm-dev: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
start=$(date +%s)
# fashion-small has no same-product groups: category prediction only (on the joint embeddings).
"$bin/item-embed" evaluate "$data/fashion-small.parquet" "${models[@]}" --baselines "$baselines" \
    --labels article_type,sub_category --modes joint --out-dir "$out/eval-fashion" --no-progress
echo "eval fashion-small: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
