"""Golden runs: prove that a refactor changed no behaviour.

Trains a fixed set of tiny runs on generated data (every quantizer and the main remedies) through the
public API (``vqvae_experiment.train``, ``vqvae_experiment.evaluate_run`` with the papers' metric conventions and, where the quantizer
has an explicit alphabet, the R(D) analysis of its latents) and compares, exactly, their final metrics, their
history (without timing), the bits of their final weights, their evaluation and R(D) analysis, and (when every
run is compared) the frontier tables of all of them (``tools/frontier_table.py``), with a recorded set.

    python tools/golden_runs.py compare --against main   # any machine: main's runs recorded here, then compared
    python tools/golden_runs.py compare            # against the committed record (its machine only, below)
    python tools/golden_runs.py record             # only in a commit that names the behaviour it changes
    python tools/golden_runs.py compare --only vq_ema ba_vq_options   # a subset, by run name

Exact equality holds only where float rounding is the same: the same CPU model and instruction set that
PyTorch's kernels use, the same BLAS, the same PyTorch build and the same thread count. The record stores
all of them (``environment``), and `compare` says which differ. `--against REV` needs no record: it copies the
git revision REV (``git archive``) to a temporary folder, trains the runs with REV's library on this machine
into a temporary record, then trains them with the working tree's library and compares the two; the run
settings are this script's, so a run that REV's library cannot train is reported as such.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
vqvae = None                                   # imported by main(), from the working tree or from --tree

DEFAULT_FILE = Path(__file__).resolve().parent / "golden" / "cpu_2threads.json"
THREADS = 2
# history fields that are not computed by the model: wall-clock seconds
UNTIMED = ("time_s",)
FRONTIER = "frontier_tables"                   # the record's entry for the frontier tables of all the runs

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
    "ibq": dict(quantizer="ibq"),
    "ecvq_kmeans_restarts": dict(quantizer="ecvq", ecvq_lambda=0.5, init="kmeans", dead_code_threshold=0.5,
                                 dead_code_every=2),
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:20]


# the evaluation compared: the papers' metric conventions, and the R(D) analysis of the latents (small: every
# validation position, a 32-letter k-means alphabet) where the quantizer has an explicit alphabet
PAPER_METRICS = ["psnr", "ssim", "perplexity_sqvae", "psnr_cvqvae", "ssim_cvqvae"]
RATE_DISTORTION = dict(positions=4096, alphabet_size=32, kmeans_iters=3)


def run_one(name: str, out_dir: Path) -> dict:
    """Train run ``name`` in ``out_dir``, evaluate it (with the papers' conventions and, where the quantizer allows
    it, the R(D) analysis), and return what is compared."""
    cfg = vqvae.make_config({**BASE, **RUNS[name], "name": name, "out_dir": str(out_dir)}).validate()
    final = vqvae_experiment.train(cfg)
    run_dir = vqvae_experiment.run_dir_of(cfg)
    history = [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
               for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    state = torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    try:
        evaluated = vqvae_experiment.evaluate_run(run_dir, device="cpu", eval_metrics=PAPER_METRICS,
                                       rate_distortion=RATE_DISTORTION)
        rd = json.loads((run_dir / "rate_distortion.json").read_text())
    except vqvae.BavqError:                                   # no explicit alphabet (residual VQ): refused
        evaluated = vqvae_experiment.evaluate_run(run_dir, device="cpu", eval_metrics=PAPER_METRICS)
        rd = None
    return {"final_metrics": json.loads(json.dumps(final)), "history": history,
            "weights": {k: _digest(v) for k, v in state.items()},
            "evaluation": {k: v for k, v in json.loads(json.dumps(evaluated)).items()
                           if k not in ("run", "written_to", "rate_distortion")},   # paths; R(D) below, whole
            "rate_distortion": _comparable(rd)}


def _comparable(value):
    """A JSON value without the entries that differ between a record and now for no reason of the maths: the
    files and folders it names, and wall-clock seconds."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()
                if k not in ("run", "written_to", "plot", "path", "seconds", *UNTIMED)}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def frontier_tables(tree: Path, runs_dir: Path) -> str:
    """The frontier tables (``tools/frontier_table.py`` of the library's tree: PSNR and rate per run, the R(D)
    table) of the golden runs, as text; runs in another process, as a user would."""
    script = tree / "tools" / "frontier_table.py"
    if not script.exists():
        return "(no tools/frontier_table.py in this tree)"
    r = subprocess.run([sys.executable, str(script), str(runs_dir)], capture_output=True, text=True, cwd=tree)
    return r.stdout if r.returncode == 0 else f"(frontier_table.py failed: {r.stderr.strip()[-500:]})"


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


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas() -> str:
    """The BLAS that PyTorch was built with, from its build configuration (e.g. 'mkl 2024.2')."""
    config = torch.__config__.show()
    found = re.search(r"BLAS_INFO=([^,\s]+)", config)
    info = found.group(1) if found else "unknown"
    found = re.search(r"Math Kernel Library Version ([^ ]+)", config)
    mkl = found.group(1) if found else ""
    return f"{info} {mkl}".strip()


# what decides float rounding: exact equality is expected only where all of these agree
ROUNDING = ("torch", "threads", "machine", "cpu", "cpu_capability", "blas")


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "blas": blas(),
            "python": platform.python_version()}


def record_revision(rev: str, names: list, out: Path, work: Path) -> None:
    """Train the runs ``names`` with the library of git revision ``rev`` on this machine into ``out``."""
    tree = work / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"[golden] git archive {rev} failed: {archive.stderr.decode().strip()}. Name a commit, "
                         "branch or tag of this repository (e.g. --against main or --against HEAD~1).")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    print(f"[golden] recording {len(names)} runs with the library of {rev} (in {tree})", flush=True)
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "record", "--tree", str(tree),
                        "--file", str(out), "--only", *names], env={**os.environ, "WANDB_MODE": "disabled"})
    if r.returncode != 0:
        raise SystemExit(f"[golden] recording with {rev}'s library failed (exit {r.returncode}); see above")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["record", "compare"])
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the recorded runs (JSON)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help=f"run names: {', '.join(RUNS)}")
    p.add_argument("--against", metavar="REV", default=None,
                   help="compare: record git revision REV's runs on this machine first and compare with those")
    p.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)   # the library's folder (--against)
    args = p.parse_args(argv)
    global vqvae, vqvae_experiment
    sys.path.insert(0, str((args.tree or ROOT).resolve()))
    import vqvae
    import vqvae_experiment
    torch.set_num_threads(THREADS)
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run name(s) {unknown}; choose from {', '.join(RUNS)}")
    if args.against and args.action != "compare":
        p.error("--against goes with compare")
    results, against = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            args.file = Path(tmp) / "against.json"
            record_revision(args.against, names, args.file, Path(tmp))
            against = json.loads(args.file.read_text())
        for name in names:
            print(f"[golden] {name}", flush=True)
            try:
                results[name] = run_one(name, Path(tmp) / "runs")
            except Exception as e:                       # a run this library cannot train (an older revision)
                if args.action != "record" or args.tree is None:
                    raise
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[golden] {name}: {results[name]['error']}", flush=True)
        if args.only is None:                            # the tables of every run together
            results[FRONTIER] = {"text": frontier_tables((args.tree or ROOT).resolve(), Path(tmp) / "runs")}
    if args.action == "record":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.file.read_text())["runs"] if args.file.exists() and args.only else {}
        args.file.write_text(json.dumps({"environment": environment(), "base": BASE,
                                         "runs": {**old, **results}}, indent=1) + "\n")
        print(f"[golden] recorded {len(results)} runs in {args.file}")
        return 0
    record = against if args.against else json.loads(args.file.read_text())
    env_now, env_then = environment(), record["environment"]
    differ = [k for k in ROUNDING if env_now.get(k) != env_then.get(k)]
    if differ:
        print("[golden] note: the record differs from this machine in what decides float rounding: "
              + "; ".join(f"{k} {env_then.get(k)!r} (record) vs {env_now.get(k)!r} (now)" for k in differ)
              + ". Exact equality is not expected; compare with --against REV (see this script's docstring).")
    failed = 0
    for name, now in results.items():
        if name not in record["runs"]:
            print(f"[golden] {name}: not in the record ({args.file})")
            failed += 1
            continue
        if "error" in record["runs"][name]:
            print(f"[golden] {name}: the reference library could not train it ({record['runs'][name]['error']})")
            failed += 1
            continue
        diffs = _differences(record["runs"][name], now, name)
        if diffs:
            failed += 1
            print(f"[golden] {name}: {len(diffs)} difference(s), first: " + "; ".join(diffs[:5]))
    if failed:
        print(f"[golden] {failed} of {len(results)} runs differ")
        return 1
    print(f"[golden] all {len(results)} runs identical (final metrics, history, final weights, evaluation, R(D)"
          f"{', frontier tables' if FRONTIER in results else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
