#!/usr/bin/env bash
# The label-free pre-training data of the quality runs, built once per OUT_DIR: the images, titles and
# H&M descriptions of both real catalogs (make_pretrain_catalog.py) in a 96 px / 64-token prepare cache.
#   bash benchmarks/pretrain_cache.sh OUT_DIR      # -> OUT_DIR/pretrain.parquet, OUT_DIR/cache96/
set -euo pipefail
out=${1:?usage: pretrain_cache.sh OUT_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
mkdir -p "$out"
[ -f "$out/pretrain.parquet" ] || "$bin/python" "$here/benchmarks/make_pretrain_catalog.py" "$out/pretrain.parquet"
[ -d "$out/cache96" ] || "$bin/item-embed" prepare "$out/pretrain.parquet" --out "$out/cache96" \
    --image-size 96 --max-text-len 64 --use-description
