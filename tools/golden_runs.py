"""Golden runs: prove that a refactor changed no behaviour.

Trains a fixed set of tiny runs on generated data (every quantizer and the main remedies) through the
public API (``vqvae.train``, ``vqvae.evaluate_run``) and compares, exactly, their final metrics, their
history (without timing) and the bits of their final weights with a recorded set.

    python tools/golden_runs.py compare            # after a refactor: must print "all N runs identical"
    python tools/golden_runs.py record             # only in a commit that names the behaviour it changes
    python tools/golden_runs.py compare --only vq_ema ba_vq_options   # a subset, by run name

Exact equality holds on the machine, PyTorch version and thread count the record was made with (the
file stores them, and `compare` says when they differ): float summation order differs between CPUs
and BLAS builds. Elsewhere, record on the unchanged code first (to a scratch file with --file), then
compare after the change against that file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import vqvae  # noqa: E402

DEFAULT_FILE = Path(__file__).resolve().parent / "golden" / "cpu_2threads.json"
THREADS = 2
# history fields that are not computed by the model: wall-clock seconds
UNTIMED = ("time_s",)

BASE = dict(dataset="fake", train_subset=192, val_subset=64, hidden_dim=16, latent_dim=16, codebook_size=32,
            batch_size=64, epochs=2, wandb=False, progress=False, device="cpu", checkpoint_every=1, seed=3)

# name -> settings on top of BASE: every quantizer, then the remedies and options that keep state
RUNS = {
    "vq_ema": dict(quantizer="vq_ema"),
    "vq": dict(quantizer="vq"),
    "ba_vq": dict(quantizer="ba_vq"),
    "fsq": dict(quantizer="fsq", fsq_levels=[4, 8]),
    "simvq": dict(quantizer="simvq"),
    "sq_vae": dict(quantizer="sq_vae"),
    "lfq": dict(quantizer="lfq"),
    "rvq": dict(quantizer="rvq", rvq_stages=3),
    "vq_ema_kmeans_restarts_clip": dict(quantizer="vq_ema", init="kmeans", dead_code_threshold=0.5,
                                        dead_code_every=2, grad_clip=1.0),
    "vq_ema_sonnet_smoothing": dict(quantizer="vq_ema", ema_smoothing="copy", ema_init_count=1.0),
    "vq_ema_pretrain_data_init_warmup": dict(quantizer="vq_ema", pretrain_epochs=1, init="data", epochs=3,
                                             vq_loss_warmup_epochs=0.5),
    "vq_cvq": dict(quantizer="vq", cvq=True),
    "vq_affine_learned_sync": dict(quantizer="vq", affine_reparam="learned", sync_nu=0.5),
    "vq_affine_ema_alternate": dict(quantizer="vq", affine_reparam="ema", alternate_lr=0.1),
    "vq_rotation_cosine": dict(quantizer="vq", gradient_estimator="rotation", cosine=True, init="normal"),
    "ba_vq_options": dict(quantizer="ba_vq", ba_prior="ema", ba_temperature="relative", ba_decoder_input="hard",
                          ba_codebook_loss="expected", ba_codebook_update="ema", init="kmeans",
                          dead_code_threshold=0.5, dead_code_every=2, beta_start=2.0, beta_end=20.0),
    "ba_vq_anneal_autograd": dict(quantizer="ba_vq", ba_decoder_input="anneal", ba_impl="autograd"),
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:20]


def run_one(name: str, out_dir: Path) -> dict:
    """Train run ``name`` in ``out_dir``, evaluate it, and return what is compared."""
    cfg = vqvae.make_config({**BASE, **RUNS[name], "name": name, "out_dir": str(out_dir)}).validate()
    final = vqvae.train(cfg)
    run_dir = out_dir / name
    history = [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
               for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    state = torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    evaluated = vqvae.evaluate_run(run_dir, device="cpu")
    return {"final_metrics": json.loads(json.dumps(final)), "history": history,
            "weights": {k: _digest(v) for k, v in state.items()},
            "evaluation": {k: v for k, v in json.loads(json.dumps(evaluated)).items() if k not in ("run", "written_to")}}   # paths


def _differences(a, b, path="") -> list:
    """Where two JSON values differ (exactly), as 'path: a != b' lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in the record" for k in a if k not in b]
        out += [f"{path}/{k}: only now" for k in b if k not in a]
        for k in a:
            if k in b:
                out += _differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items in the record, {len(b)} now"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} (record) != {b!r} (now)"]


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["record", "compare"])
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the recorded runs (JSON)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help=f"run names: {', '.join(RUNS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run name(s) {unknown}; choose from {', '.join(RUNS)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"[golden] {name}", flush=True)
            results[name] = run_one(name, Path(tmp))
    if args.action == "record":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.file.read_text())["runs"] if args.file.exists() and args.only else {}
        args.file.write_text(json.dumps({"environment": environment(), "base": BASE,
                                         "runs": {**old, **results}}, indent=1) + "\n")
        print(f"[golden] recorded {len(results)} runs in {args.file}")
        return 0
    record = json.loads(args.file.read_text())
    env_now, env_then = environment(), record["environment"]
    if {k: env_now[k] for k in ("torch", "threads", "machine")} != {k: env_then[k] for k in ("torch", "threads", "machine")}:
        print(f"[golden] note: recorded with {env_then}, running with {env_now}: exact equality is not expected "
              "across machines or PyTorch versions (see this script's docstring).")
    failed = 0
    for name, now in results.items():
        if name not in record["runs"]:
            print(f"[golden] {name}: not in the record ({args.file})")
            failed += 1
            continue
        diffs = _differences(record["runs"][name], now, name)
        if diffs:
            failed += 1
            print(f"[golden] {name}: {len(diffs)} difference(s), first: " + "; ".join(diffs[:5]))
    if failed:
        print(f"[golden] {failed} of {len(results)} runs differ")
        return 1
    print(f"[golden] all {len(results)} runs identical (final metrics, history, final weights, evaluation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
