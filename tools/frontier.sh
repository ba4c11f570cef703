#!/usr/bin/env bash
# The equal-rate frontier on the reduced protocol (configs/reduced*.yaml, 2-core CPU, 3 seeds):
# PSNR against rate for each quantizer, varying what sets its rate. Every line is a resumable grid: run this
# script again after an interruption and finished runs are skipped (a run stopped by Ctrl-C or SIGTERM resumes from the
# checkpoint it wrote on stopping; a killed one restarts: the reduced configs keep no periodic checkpoints).
# 90 runs; on a 2-core CPU each took 50-140 s with this version (BA-VQ at K=512: 119-141 s; its K sweep ran on an
# older, slower BA pass), about 3 hours in all. Take no timing while it runs.
#
#   bash tools/frontier.sh DATA_DIR [OUT_DIR]        # DATA_DIR: CIFAR-10 in ImageFolder layout (the JPEG copy)
#
# Then, per run, the R(D) analysis of its latents (docs/method.md):
#   python evaluate.py OUT_DIR/RUN --data_dir DATA_DIR --rate_distortion      # 15-40 s per run
set -euo pipefail
DATA=${1:?give the CIFAR-10 folder (ImageFolder layout), e.g. /tmp/cifar}
OUT=${2:-experiments/frontier}
cd "$(dirname "$0")/.."
run() { ${PYTHON:-python} train.py --dataset folder --data_dir "$DATA" --out_dir "$OUT" --no_wandb --no_progress \
            --seed 0 1 2 "$@"; }
K="32 64 128 256 512 1024"
# In order of what the comparison needs first: the two flagship frontiers, then IBQ and FSQ, then the rest.
# VQ-EMA with its best remedies (k-means start, restarts) and BA-VQ in its best setting, over K
run --config configs/reduced_vq_ema_best.yaml --codebook_size $K --name vq_ema_best
run --config configs/reduced_ba_vq_best.yaml --codebook_size $K --name ba_vq_best
# IBQ
run --config configs/reduced.yaml --quantizer ibq --codebook_size 64 256 512 1024 --name ibq
# FSQ: the levels set K (the FSQ paper's sets for about 2^6 .. 2^12 codes)
for levels in "4 4 4" "8 5 5" "8 8 8" "8 5 5 5" "7 5 5 5 5"; do
    run --config configs/reduced.yaml --quantizer fsq --fsq_levels $levels --codebook_size $(( ${levels// /*} )) \
        --name "fsq_${levels// /x}"
done
# VQ-EMA with its defaults (the rate is set by how far it collapses)
run --config configs/reduced.yaml --quantizer vq_ema --codebook_size $K --name vq_ema
# BA-VQ's beta range at K=512
for b in "50 500" "100 1000" "400 4000"; do
    set -- $b
    run --config configs/reduced_ba_vq_best.yaml --beta_start "$1" --beta_end "$2" --name "ba_vq_best_beta$2"
done
