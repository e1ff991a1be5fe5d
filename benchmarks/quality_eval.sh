#!/usr/bin/env bash
# Evaluate the runs of quality_recipe.sh beside the baselines, on both real catalogs, same splits.
#   bash benchmarks/quality_eval.sh OUT_DIR            # item-recipe-shape and dual-recipe + the baselines -> OUT_DIR/eval-{hm,fashion}/
#   bash benchmarks/quality_eval.sh OUT_DIR RUN [...]  # only these runs (no baselines) -> OUT_DIR/eval-{hm,fashion}-RUN/
# A RUN named dual* is read as a dual encoder. quality_table.py merges every eval-* folder (the split
# depends only on the catalog: the same test fold).
set -euo pipefail
out=${1:?usage: quality_eval.sh OUT_DIR [RUN ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
data="$here/../shared/data"
featurizers() {  # featurizers RUN...: --featurizer item:DIR / dual:DIR for each
  local name kind
  for name in "$@"; do
    kind=item; [[ "$name" == dual* ]] && kind=dual
    models+=(--featurizer "$kind:$out/$name")
  done
}
models=()
if [ $# -gt 0 ]; then
  suffix="-$(IFS=-; echo "$*")"
  hm_baselines=()
  fashion_baselines=()
  featurizers "$@"
else
  suffix=""
  hm_baselines=(--baselines tfidf,minilm,minilm_title,pixels16,phash,fusion,hog,fusion_hog)
  fashion_baselines=(--baselines tfidf,minilm,minilm_title,pixels16,phash,fusion,hog)
  for run in item-recipe-shape dual-recipe; do
    [ -f "$out/$run/model.safetensors" ] && featurizers "$run"
  done
fi
start=$(date +%s)
"$bin/item-embed" evaluate "$data/hm-dev.parquet" "${models[@]}" "${hm_baselines[@]}" \
    --group group --labels product_type,product_group --out-dir "$out/eval-hm$suffix" --no-progress
echo "eval-hm$suffix: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
start=$(date +%s)
# fashion-small has no same-product groups: category prediction only (on the joint embeddings).
"$bin/item-embed" evaluate "$data/fashion-small.parquet" "${models[@]}" "${fashion_baselines[@]}" \
    --labels article_type,sub_category --modes joint --out-dir "$out/eval-fashion$suffix" --no-progress
echo "eval-fashion$suffix: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
