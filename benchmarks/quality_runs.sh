#!/usr/bin/env bash
# Pre-train ITEm and its ablations with one equal budget on both real catalogs (no labels).
#   bash benchmarks/quality_runs.sh OUT_DIR [STEPS]
# Budget: STEPS optimiser steps x batch 32 at 96 px / patch 16, 64 text tokens, bf16 autocast.
# The contrastive runs add short image-only forward passes per step (measured cost in RESULTS.md).
set -euo pipefail
out=${1:?usage: quality_runs.sh OUT_DIR [STEPS]}
steps=${2:-600}
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
bash "$here/benchmarks/pretrain_cache.sh" "$out"
declare -A weights=(
  [item-all5]="itm=1,mlm=1,mim=1,global_mlm=1,global_mim=1"
  [item-mlm-mim]="itm=0,mlm=1,mim=1,global_mlm=0,global_mim=0"
  [item-mlm-mim-itm]="itm=1,mlm=1,mim=1,global_mlm=0,global_mim=0"
  [item-all5-contrastive]="itm=1,mlm=1,mim=1,global_mlm=1,global_mim=1,contrastive=1"
  [item-all5-contrastive-sg]="itm=1,mlm=1,mim=1,global_mlm=1,global_mim=1,contrastive=1"
  [item-mit-lr10]="itm=1,mlm=1,mim=1,global_mlm=0,global_mim=0"
  [item-all5g25-lr10]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-itm4-lr10]="itm=4,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [diag-itm-only]="itm=1,mlm=0,mim=0,global_mlm=0,global_mim=0"
  [item-conv-lr10]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-conv-ctr-lr10]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=1"
  [item-conv-td25]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-convcn-lr10]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-conv-hog]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-conv-hog-ctr]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=1"
  [item-conv-hog-td25m]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-convcn-hog]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-convcn-lr10-s1]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-conv-lr10-s1]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-convcn-ic]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,image_contrastive=1"
  [item-convcn-icp]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,image_contrastive=1"
  [item-hog]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-hog-ctrb]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=0.5"
  [item-hog-ctrb10]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=0.1"
  [item-hog-ctrit]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=1"
  [item-hog-ctrit25]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=0.25"
  [item-hogc]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25"
  [item-hogc-ic]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,image_contrastive=1"
  [item-hogc-ctr]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=1"
  [item-hogc-ctrb]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=0.5"
  [item-hogc-ctrit]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=1"
  [item-hog-ctrd96]="itm=1,mlm=1,mim=1,global_mlm=0.25,global_mim=0.25,contrastive=0.5"
)
# The first five ran before --new-lr-scale existed: every parameter at the base lr (scale 1). Every run
# before the conv stem existed pins the paper's linear patch projection (the stem is now the default).
declare -A flags=(
  [item-all5]="--new-lr-scale 1 --image-stem linear"
  [item-mlm-mim]="--new-lr-scale 1 --image-stem linear"
  [item-mlm-mim-itm]="--new-lr-scale 1 --image-stem linear"
  [item-all5-contrastive]="--new-lr-scale 1 --image-stem linear --contrastive-both-ways"  # the full embedding moves too
  [item-all5-contrastive-sg]="--new-lr-scale 1 --image-stem linear"                       # the full embedding is fixed
  [item-mit-lr10]="--new-lr-scale 10 --image-stem linear"      # from-scratch parts (image side, heads) at 10x lr
  [item-all5g25-lr10]="--new-lr-scale 10 --image-stem linear"  # the recipe before the conv stem
  [item-itm4-lr10]="--new-lr-scale 10 --image-stem linear"     # ITM weighted up: alone it leaves chance after ~400 steps
  [diag-itm-only]="--new-lr-scale 10 --image-stem linear"      # diagnostic (not evaluated): does ITM learn on its own?
  [item-conv-lr10]="--new-lr-scale 10 --image-stem conv"                     # = the defaults of `item-embed train`
  [item-conv-ctr-lr10]="--new-lr-scale 10 --image-stem conv"                 # + image-view contrastive
  [item-conv-td25]="--new-lr-scale 10 --image-stem conv --title-dropout 0.25" # + title dropout
  [item-convcn-lr10]="--new-lr-scale 10 --image-stem conv_channelnorm"       # stem norm per pixel
  [item-conv-hog]="--new-lr-scale 10 --image-stem conv --mim-target hog"     # MIM rebuilds HOG, not pixels
  [item-conv-hog-ctr]="--new-lr-scale 10 --image-stem conv --mim-target hog" # + image-view contrastive
  # + title dropout whose rows also rebuild their whole picture from the image-only [CLS]
  [item-conv-hog-td25m]="--new-lr-scale 10 --image-stem conv --mim-target hog --title-dropout 0.25 --title-dropout-mim"
  [item-convcn-hog]="--new-lr-scale 10 --image-stem conv_channelnorm --mim-target hog"  # HOG with the default stem
  # A second seed of the two conv stems: how far one seed moves the numbers compared here.
  [item-convcn-lr10-s1]="--new-lr-scale 10 --image-stem conv_channelnorm --seed 1"
  [item-conv-lr10-s1]="--new-lr-scale 10 --image-stem conv --seed 1"
  # + SimCLR between two colour-jittered views of each photo, image only (two short extra passes)
  [item-convcn-ic]="--new-lr-scale 10 --image-stem conv_channelnorm"
  [item-convcn-icp]="--new-lr-scale 10 --image-stem conv_channelnorm --image-contrastive-proj 128"  # SimCLR head
  # HOG stems (hand-made patch features): colour-free, and with each patch's mean colour (hogc);
  # then the image-side terms on top: SimCLR, image-view contrastive (held target, or both ways),
  # image and title views both ways.
  [item-hog]="--new-lr-scale 10 --image-stem hog"
  [item-hog-ctrb]="--new-lr-scale 10 --image-stem hog --contrastive-both-ways"
  [item-hog-ctrb10]="--new-lr-scale 10 --image-stem hog --contrastive-both-ways"
  [item-hog-ctrit]="--new-lr-scale 10 --image-stem hog --contrastive-views image,title --contrastive-both-ways"
  [item-hog-ctrit25]="--new-lr-scale 10 --image-stem hog --contrastive-views image,title --contrastive-both-ways"
  [item-hogc]="--new-lr-scale 10 --image-stem hog_colour"
  [item-hogc-ic]="--new-lr-scale 10 --image-stem hog_colour"
  [item-hogc-ctr]="--new-lr-scale 10 --image-stem hog_colour"
  [item-hogc-ctrb]="--new-lr-scale 10 --image-stem hog_colour --contrastive-both-ways"
  [item-hogc-ctrit]="--new-lr-scale 10 --image-stem hog_colour --contrastive-views image,title --contrastive-both-ways"
  # image view both ways on the last 96 of 384 coordinates only
  [item-hog-ctrd96]="--new-lr-scale 10 --image-stem hog --contrastive-both-ways --contrastive-dims 96"
)
for name in item-all5 item-mlm-mim item-mlm-mim-itm item-all5-contrastive item-all5-contrastive-sg \
            item-mit-lr10 item-all5g25-lr10 item-itm4-lr10 diag-itm-only \
            item-conv-lr10 item-conv-ctr-lr10 item-conv-td25 item-convcn-lr10 \
            item-conv-hog item-conv-hog-ctr item-conv-hog-td25m item-convcn-hog \
            item-convcn-lr10-s1 item-conv-lr10-s1 item-convcn-ic item-convcn-icp \
            item-hog item-hog-ctrb item-hog-ctrb10 item-hog-ctrit item-hog-ctrit25 item-hogc item-hogc-ic item-hogc-ctr item-hogc-ctrb item-hogc-ctrit \
            item-hog-ctrd96; do
  [ -f "$out/$name/model.safetensors" ] && continue
  start=$(date +%s)
  # --shape-dims 0: the ablations compare [CLS] alone (the shape slice is fitted after training and
  # leaves [CLS] as it is; these runs predate it).
  "$bin/item-embed" train "$out/cache96" --out "$out/$name" --steps "$steps" --batch-size 32 \
      --patch-size 16 --loss-weights "${weights[$name]}" ${flags[$name]:-} --shape-dims 0 --save-every 200 \
      --no-progress --resume
  echo "$name: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
done
# The CLIP-style peer: same cache, steps, batch, image/patch size and precision.
if [ ! -f "$out/dual/model.safetensors" ]; then
  start=$(date +%s)
  "$bin/item-embed" train-dual "$out/cache96" --out "$out/dual" --steps "$steps" --batch-size 32 \
      --patch-size 16 --new-lr-scale 1 --save-every 200 --no-progress --resume
  echo "dual: $(( $(date +%s) - start )) s wall" | tee -a "$out/walltime.txt"
fi
