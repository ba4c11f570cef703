#!/usr/bin/env bash
# ECVQ on the reduced protocol's equal-rate plane (configs/reduced_ecvq.yaml: every setting of reduced_vq_ema_best
# but the rate term), against the vq_ema_best frontier measured on the same machine, 3 seeds; resumable grids.
#
#   bash tools/ecvq_frontier.sh DATA_DIR [OUT_DIR]        # DATA_DIR: CIFAR-10 in ImageFolder layout (the JPEG copy)
#   python tools/frontier_table.py OUT_DIR                 # the table (vq_ema_best_vq_ema is the reference group)
set -euo pipefail
DATA=${1:?give the CIFAR-10 folder (ImageFolder layout), e.g. data}
OUT=${2:-experiments/ecvq_frontier}
cd "$(dirname "$0")/.."
run() { ${PYTHON:-python} train.py --dataset folder --data_dir "$DATA" --out_dir "$OUT" --no_wandb --no_progress \
            --seed 0 1 2 "$@"; }
for lam in 0.01 0.03 0.1; do
    run --config configs/reduced_ecvq.yaml --ecvq_lambda "$lam" --name "ecvq_lam$lam"
done
run --config configs/reduced_vq_ema_best.yaml --codebook_size 256 512 --name vq_ema_best
