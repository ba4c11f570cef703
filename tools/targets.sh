#!/usr/bin/env bash
# The two targets set for the reduced protocol, each decided on 5 seeds (docs/results.md: "The first target ..." and
# "The equal-rate frontier ..."):
#   1. K=512 VQ-EMA at >= 22.7 dB with >= 99% of the codes in use: configs/reduced_vq_ema_full_usage.yaml, chosen
#      on seed 0 (experiments/target1/*_s0), decided on seeds 1-5.
#   2. BA-VQ within 0.3 dB of the best VQ-EMA at equal rate: the K=512 pair of the frontier (seeds 0-2 in
#      configs/frontier_reduced.yaml) gets seeds 3 and 4, in OUT_DIR_k512_seeds34 (a grid of another shape may not share the
#      frontier's grid name in OUT_DIR); tools/frontier_table.py groups runs of the same name across folders.
#
#   bash tools/targets.sh DATA_DIR [OUT_DIR]      # resumable like the frontier's grid; then
#   python tools/frontier_table.py OUT_DIR OUT_DIR_k512_seeds34
set -euo pipefail
DATA=${1:?give the CIFAR-10 folder (ImageFolder layout), e.g. /tmp/cifar}
OUT=${2:-experiments/frontier}
cd "$(dirname "$0")/.."
run() { ${PYTHON:-python} train.py --dataset folder --data_dir "$DATA" --out_dir "$OUT" --no_wandb --no_progress "$@"; }
run --config configs/reduced_vq_ema_full_usage.yaml --seed 1 2 3 4 5 --name vq_ema_full_usage
run --config configs/reduced_vq_ema_best.yaml --codebook_size 512 --seed 3 4 --name vq_ema_best --out_dir "${OUT}_k512_seeds34"
run --config configs/reduced_ba_vq_best.yaml --codebook_size 512 --seed 3 4 --name ba_vq_best --out_dir "${OUT}_k512_seeds34"
