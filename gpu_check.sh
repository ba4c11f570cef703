#!/usr/bin/env bash
# One command for whoever has a CUDA GPU: the CUDA test tier, the benchmark (with host-sync counts),
# and short real-data runs; every result is written under $OUT (default results/gpu_check).
#
#   bash gpu_check.sh DATA                 # DATA: CIFAR-10 in ImageFolder layout (train/, test/),
#                                          # or a .tar.gz of it (extracted to a temporary folder)
#   PARTS="tests bench" bash gpu_check.sh DATA   # only some parts: tests bench compile profile runs multigpu
#   EPOCHS=30 bash gpu_check.sh DATA       # epochs of the real-data runs (default 30)
#   BENCH_K=512 bash gpu_check.sh DATA     # codebook sizes of the benchmark (default 512 2048 8192)
#
# Each part has its own time limit, so one failing or slow part does not stop the others; the log says
# which part failed. Nothing here needs network or W&B.
set -uo pipefail
cd "$(dirname "$0")"
DATA="${1:-data/cifar10-jpg}"
OUT="${OUT:-results/gpu_check}"
PARTS="${PARTS:-tests bench compile profile runs multigpu}"
EPOCHS="${EPOCHS:-30}"
PY="${PYTHON:-python3}"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
if [[ "$DATA" == *.tar.gz ]]; then
    dir="$(mktemp -d)"; tar -xzf "$DATA" -C "$dir"; DATA="$dir"
fi

part() {   # part NAME SECONDS COMMAND...
    local name="$1" limit="$2"; shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
  git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee -a "$LOG"

# decode the image folder once (cached as .pt next to the data)
"$PY" -c "import vqvae; vqvae.load_dataset(vqvae.make_config({'dataset': 'folder', 'data_dir': '$DATA', 'num_workers': 16}))" 2>&1 | tee -a "$LOG"

part tests 200 "$PY" -m pytest -q -rs -m cuda tests
part bench 240 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --count_syncs --codebook_sizes ${BENCH_K:-512 2048 8192} \
    --out "$OUT/benchmark_gpu.json"
part compile 150 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --codebook_sizes 512 --set compile=true \
    --out "$OUT/benchmark_gpu_compile.json"
part compile 150 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --codebook_sizes 512 --set compile=true \
    --set compile_mode=reduce-overhead --out "$OUT/benchmark_gpu_cudagraphs.json"
part profile 90 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --codebook_sizes 512 --profile 40 \
    --out "$OUT/benchmark_gpu_profiled.json"
RUNS="$(mktemp -d)"
part runs 300 "$PY" train.py --dataset folder --data_dir "$DATA" --out_dir "$RUNS" --name short \
    --quantizer vq_ema ba_vq --epochs "$EPOCHS" --checkpoint_every 0 --no_wandb --no_progress
part runs 200 "$PY" train.py --dataset folder --data_dir "$DATA" --out_dir "$RUNS" --name remedies \
    --quantizer vq_ema --init kmeans --dead_code_threshold 1 --dead_code_every 100 --epochs "$EPOCHS" \
    --checkpoint_every 0 --no_wandb --no_progress
part runs 120 "$PY" evaluate.py "$RUNS"
if [[ " $PARTS " == *" runs "* ]]; then
    "$PY" - "$RUNS" "$OUT/runs.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
runs = {}
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "final_metrics.json"
    if f.exists():
        m = json.loads(f.read_text())
        runs[d.name] = {k: v for k, v in m.items() if not k.endswith("code_counts")}
        hist = d / "history.jsonl"
        if hist.exists():
            runs[d.name]["history"] = [{k: v for k, v in json.loads(l).items() if "code_counts" not in k}
                                      for l in hist.read_text().splitlines() if l.strip()]
        print(d.name, {k: runs[d.name].get(k) for k in ("epoch", "psnr", "ssim", "perplexity", "usage_rate", "dead_codes",
                                                   "bits_per_image", "psnr_soft", "mutual_information_bits")})
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
PYEOF
fi
# one run on 2 GPUs (torchrun, NCCL) against the same run on 1 GPU: epoch time (target: >= 1.8x images/s)
NGPU="$(nvidia-smi -L 2>/dev/null | wc -l)"
if [[ " $PARTS " == *" multigpu "* && "$NGPU" -ge 2 ]]; then
    MG="$(mktemp -d)"
    part multigpu 300 "$PY" train.py --dataset folder --data_dir "$DATA" --out_dir "$MG" --name one_gpu --quantizer vq_ema \
        --epochs 3 --checkpoint_every 0 --no_wandb --no_progress
    part multigpu 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 train.py --dataset folder \
        --data_dir "$DATA" --out_dir "$MG" --name two_gpus --quantizer vq_ema --epochs 3 --checkpoint_every 0 --no_wandb --no_progress
    "$PY" - "$MG" "$OUT/multigpu.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
root, out = pathlib.Path(sys.argv[1]), {}
for name in ("one_gpu", "two_gpus"):
    hist = [json.loads(l) for l in (root / name / "history.jsonl").read_text().splitlines()]
    out[name] = {"epoch_s": [h["time_s"] for h in hist], "val_psnr": hist[-1]["val/psnr"]}
out["speedup_last_epoch"] = out["one_gpu"]["epoch_s"][-1] / out["two_gpus"]["epoch_s"][-1]
print(out)
pathlib.Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
PYEOF
fi
echo "results in $OUT" | tee -a "$LOG"
