#!/usr/bin/env bash
# Evaluate the runs of quality_recipe.sh beside the baselines, on both real catalogs, same splits.
#   bash benchmarks/quality_eval.sh OUT_DIR            # every run of quality_recipe.sh found + the baselines -> OUT_DIR/eval-{hm,fashion}/
#   bash benchmarks/quality_eval.sh OUT_DIR RUN [...]  # only these runs (no baselines) -> OUT_DIR/eval-{hm,fashion}-RUN/
# A RUN named dual* is read as a dual encoder; any other as ITEm, twice: item:RUN (the embedding users get)
# and item-cls:RUN (the model's [CLS] alone, without the hand-made HOG slice). quality_table.py merges
# every eval-* folder (the split depends only on the catalog: the same test fold).
set -euo pipefail
out=${1:?usage: quality_eval.sh OUT_DIR [RUN ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
data="$here/../shared/data"
models=()
featurizers() {  # featurizers RUN...: --featurizer dual:DIR, or item:DIR and item-cls:DIR, for each
  local name
  for name in "$@"; do
    if [[ "$name" == dual* ]]; then
      models+=(--featurizer "dual:$out/$name")
    else
      models+=(--featurizer "item:$out/$name" --featurizer "item-cls:$out/$name")
    fi
  done
}
baselines=()
if [ $# -gt 0 ]; then
  suffix="-$(IFS=-; echo "$*")"
  featurizers "$@"
else
  suffix=""
  baselines=(--baselines tfidf,minilm,minilm_title,pixels16,phash,fusion,hog,fusion_hog)
  for run in item-recipe item-recipe-s1 dual-recipe dual-recipe-s1; do
    if [ -f "$out/$run/model.safetensors" ]; then featurizers "$run"; fi
  done
fi
start=$(date +%s)
"$bin/item-embed" evaluate "$data/hm-dev.parquet" ${models[@]+"${models[@]}"} ${baselines[@]+"${baselines[@]}"} \
    --group group --labels product_type,product_group --modes joint,image,title,image2image,title2image \
    --probe-modes joint,image --out-dir "$out/eval-hm$suffix" --no-progress
echo "eval-hm$suffix: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
start=$(date +%s)
# fashion-small has no same-product groups: titles against photos (each product its own group) and the
# category probes on joint and photo-only embeddings.
"$bin/item-embed" evaluate "$data/fashion-small.parquet" ${models[@]+"${models[@]}"} ${baselines[@]+"${baselines[@]}"} \
    --labels article_type,sub_category --modes title2image --probe-modes joint,image \
    --out-dir "$out/eval-fashion$suffix" --no-progress
echo "eval-fashion$suffix: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
