#!/usr/bin/env bash
# Evaluate the runs of quality_runs.sh beside every baseline, on both real catalogs, same splits.
#   bash benchmarks/quality_eval.sh OUT_DIR            # every run + the seven baselines -> OUT_DIR/eval-{hm,fashion}/
#   bash benchmarks/quality_eval.sh OUT_DIR RUN [...]  # only these runs (no baselines) -> OUT_DIR/eval-{hm,fashion}-RUN/
# quality_table.py merges every eval-* folder (the split depends only on the catalog: same test fold).
set -euo pipefail
out=${1:?usage: quality_eval.sh OUT_DIR [RUN ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
data="$here/../shared/data"
models=()
if [ $# -gt 0 ]; then
  suffix="-$(IFS=-; echo "$*")"
  baselines=()
  for name in "$@"; do
    kind=item; [[ "$name" == dual* ]] && kind=dual
    models+=(--featurizer "$kind:$out/$name")
  done
else
  suffix=""
  baselines=(--baselines tfidf,minilm,minilm_title,pixels16,phash,fusion,hog)
  for run in "$out"/item-*/; do
    [ -f "$run/model.safetensors" ] && models+=(--featurizer "item:${run%/}")
  done
  [ -f "$out/dual/model.safetensors" ] && models+=(--featurizer "dual:$out/dual")
fi
start=$(date +%s)
"$bin/item-embed" evaluate "$data/hm-dev.parquet" "${models[@]}" "${baselines[@]}" \
    --group group --labels product_type,product_group --out-dir "$out/eval-hm$suffix" --no-progress
echo "eval-hm$suffix: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
start=$(date +%s)
# fashion-small has no same-product groups: category prediction only (on the joint embeddings).
"$bin/item-embed" evaluate "$data/fashion-small.parquet" "${models[@]}" "${baselines[@]}" \
    --labels article_type,sub_category --modes joint --out-dir "$out/eval-fashion$suffix" --no-progress
echo "eval-fashion$suffix: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
