#!/usr/bin/env bash
# The GPU check, for whoever is lent a CUDA GPU: the CUDA test tier, the benchmark of every quantizer
# (with host-sync counts), BA-VQ and VQ-EMA at large K, the torch.compile and CUDA-graph paths, and the
# 30-epoch real-data comparison of every quantizer (several runs at once on the one GPU). Everything is
# written under $OUT (default results/gpu_check: at most 8 files); the docs' GPU tables are read from it.
#
#   bash gpu_check.sh DATA                 # DATA: CIFAR-10 in ImageFolder layout (train/, test/),
#                                          # or a .tar.gz of it (extracted to a temporary folder)
#   PARTS="tests bench" bash gpu_check.sh DATA   # only some parts: tests bench bigk jobs runs compile multigpu
#   BUDGET=540 bash gpu_check.sh DATA      # seconds for the whole check (default 560: one 10-minute command)
#   EPOCHS=30 JOBS=8 bash gpu_check.sh DATA  # epochs of the real-data runs, and how many run at once
#
# Without a CUDA GPU (e.g. to check the script on a laptop) every part runs at smoke size on the CPU (a few
# hundred images, 1 epoch) so that each command and result file is exercised end to end; the CUDA tests
# are then all skipped, and the numbers mean nothing.
#
# Parts run in order of importance, each with its own time limit and never past the BUDGET deadline, so one
# failing or slow part does not stop the others; the log says which part failed and how long each took.
# A run cut short keeps its history.jsonl (one line per epoch).
# Nothing here needs network or W&B.
set -uo pipefail
cd "$(dirname "$0")"
DATA="${1:-data/cifar10-jpg}"
OUT="${OUT:-results/gpu_check}"
PARTS="${PARTS:-tests bench bigk jobs runs compile multigpu}"
EPOCHS="${EPOCHS:-30}"
JOBS="${JOBS:-8}"
BUDGET="${BUDGET:-560}"
PY="${PYTHON:-python3}"
QUANTIZERS="${QUANTIZERS:-vq_ema vq ba_vq fsq simvq sq_vae lfq rvq ibq}"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
DEADLINE=$((SECONDS + BUDGET))
if [[ "$DATA" == *.tar.gz ]]; then
    dir="$(mktemp -d)"; tar -xzf "$DATA" -C "$dir"; DATA="$dir"
fi

part() {   # part NAME SECONDS COMMAND...   (the limit is cut to the time left before the deadline)
    local name="$1" limit="$2"; shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    local left=$((DEADLINE - SECONDS))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then echo "=== $name: skipped, budget spent" | tee -a "$LOG"; return 0; fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
  git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee -a "$LOG"

# no CUDA: every part at smoke size on the CPU (BENCH: benchmark.py sizes, RUN: train.py sizes)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    BENCH=() RUN=() BIG_K="${BIG_K:-8192 16384}"
else
    echo "=== no CUDA GPU: every part at smoke size on the CPU (checks the script, not the speed)" | tee -a "$LOG"
    BENCH=(--train_images 256 --val_images 128 --warmup_epochs 0 --epochs 1 --hidden_dim 16 --latent_dim 16)
    RUN=(--train_subset 256 --val_subset 128 --hidden_dim 16 --latent_dim 16 --device cpu)
    EPOCHS=1 BIG_K="${BIG_K:-1024}"
fi

# decode the image folder once (cached as .pt next to the data)
"$PY" -c "import vqvae; vqvae.load_dataset(vqvae.make_config({'dataset': 'folder', 'data_dir': '$DATA', 'num_workers': 16}))" 2>&1 | tee -a "$LOG"
echo "=== data decoded after $SECONDS s" | tee -a "$LOG"

part tests 150 "$PY" -m pytest -q -rs -m cuda tests
# every quantizer at K=512, then BA-VQ and VQ-EMA at the large codebooks (K=16384 reports its peak memory)
part bench 150 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --count_syncs --codebook_sizes 512 \
    --quantizers $QUANTIZERS --out "$OUT/benchmark_gpu.json" "${BENCH[@]}"
part bigk 130 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --codebook_sizes $BIG_K \
    --quantizers vq_ema ba_vq --out "$OUT/benchmark_gpu_bigk.json" "${BENCH[@]}"
# grid throughput: the same 8 small runs (reduced-protocol model, 10,000 images, 2 epochs) one at a time and
# with --jobs 8 on the one device; jobs.json holds runs per hour of each
if [[ " $PARTS " == *" jobs "* ]]; then
    J="$(mktemp -d)"; declare -A JT=()
    for n in 1 8; do
        t0=$SECONDS
        part jobs 90 "$PY" train.py --config configs/reduced.yaml --dataset folder --data_dir "$DATA" \
            --out_dir "$J/jobs$n" --name g --quantizer vq_ema ba_vq --seed 0 1 2 3 --epochs 2 --checkpoint_every 0 \
            --no_wandb --no_progress --jobs "$n" "${RUN[@]}"
        JT[$n]=$((SECONDS - t0))
    done
    "$PY" - "$J" "$OUT/jobs.json" "${JT[1]}" "${JT[8]}" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
root, out = pathlib.Path(sys.argv[1]), {}
for n, secs in (("1", sys.argv[3]), ("8", sys.argv[4])):
    done = len(list((root / f"jobs{n}").glob("*/final_metrics.json")))
    out[f"jobs{n}"] = {"seconds": int(secs), "runs_finished": done, "runs_per_hour": done * 3600 / max(int(secs), 1)}
print(out)
pathlib.Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
PYEOF
fi
# the 30-epoch comparison of every quantizer, JOBS runs at once on the one GPU (train.py --jobs)
RUNS="$(mktemp -d)"
part runs 300 "$PY" train.py --dataset folder --data_dir "$DATA" --out_dir "$RUNS" --name cmp --quantizer $QUANTIZERS \
    --epochs "$EPOCHS" --checkpoint_every 0 --no_wandb --no_progress --jobs "$JOBS" "${RUN[@]}"
if [[ " $PARTS " == *" runs "* ]]; then
    "$PY" - "$RUNS" "$OUT/runs.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
runs = {}
for d in sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir()):
    hist = d / "history.jsonl"
    if not hist.exists():
        continue
    h = [{k: v for k, v in json.loads(l).items() if "code_counts" not in k}
         for l in hist.read_text().splitlines() if l.strip()]
    f = d / "final_metrics.json"
    final = {k: v for k, v in json.loads(f.read_text()).items() if not k.endswith("code_counts")} if f.exists() else None
    runs[d.name] = {"final": final, "history": h}
    last = h[-1] if h else {}
    print(f"{d.name:8s} epochs {len(h):3d} {'finished' if final else 'cut short'}  "
          f"PSNR {last.get('val/psnr', float('nan')):.2f}  perplexity {last.get('val/perplexity', float('nan')):.1f}  "
          f"usage {last.get('val/usage_rate', float('nan')):.3f}  s/epoch {last.get('time_s', float('nan')):.2f}")
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
PYEOF
    tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude="*.pt" . 2>&1 | tee -a "$LOG"   # logs, histories, configs, pictures
fi
part compile 75 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --codebook_sizes 512 --set compile=true \
    --out "$OUT/benchmark_gpu_compile.json" "${BENCH[@]}"
part compile 75 "$PY" benchmark.py --dataset folder --data_dir "$DATA" --codebook_sizes 512 --set compile=true \
    --set compile_mode=reduce-overhead --out "$OUT/benchmark_gpu_cudagraphs.json" "${BENCH[@]}"

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
echo "results in $OUT after $SECONDS s" | tee -a "$LOG"
