"""Running an experiment with the bavq method (vqvae.py): everything around a training run that is
not the method itself.

    run directory   <out_dir>/<name>/, derived in one place (``run_dir_at``); refused if it holds a run
    files           config.yaml (with provenance), history.jsonl, checkpoints, final_model.pt,
                    final_metrics.json, recon.png / usage.png; every write atomic
    resume          ``resume_config`` / ``--resume``: bit-identical continuation (CPU), config checks
    one process     a lock file per run directory (``RunClaim``), taken over from dead processes
    stop            Ctrl-C / SIGTERM save ``checkpoint_interrupted.pt`` at a batch boundary (``_StopFlag``)
    torchrun        ``DataParallel``: one run over several processes (``VQVAE.forward`` splits and gathers
                    through the ``model.batch_split`` it sets)
    W&B             optional, offline without an API key or network
    train(cfg)      the whole run; returns the final validation metrics
    finished runs   ``load_run``, ``evaluate_run`` (with vqvae_analysis's R(D) and the papers' metrics), and the
                    optional LPIPS / rFID

For notebooks, ``vqvae.NAME`` reaches the names in ``__all__`` (``vqvae.train``, ``vqvae.load_run``, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqvae import (BavqError, Config, LossExploded, LossGuard, ModelEMA, NonFiniteLoss, Runtime, StopRequested, VQVAE, build_model,
                   config_fields, config_to_yaml, default_val_batch_size, eval_batches, evaluating, evenly_spaced,
                   frechet_distance, load_dataset, make_config, make_runtime, perplexity_from_counts, pick_device,
                   seed_everything, setup_model, to_float, to_uint8, train_epoch, usage_from_counts, validate)
from vqvae_analysis import PaperMetrics, check_rate_distortion, latent_rate_distortion

# the names this module hands out (also as vqvae.NAME)
__all__ = ["atomic_write_bytes", "WriteError", "atomic_torch_save", "atomic_write_text", "TrainingInterrupted",
           "NonFiniteError", "SHAPE_KEYS", "CHECKPOINT_FORMAT", "checkpoint_epoch_number", "run_files", "run_dir_at",
           "run_dir_of",
           "check_run_dir", "prepare_run_dir", "remove_stale_temporaries", "load_checkpoint", "latest_checkpoint",
           "resolve_resume_path", "resume_config", "RESUME_MAY_CHANGE", "RESUME_RECOVERY", "config_differences",
           "check_resumable", "DataParallel", "data_parallel_from_env", "CLAIM_FILE", "CLAIM_HEARTBEAT_S",
           "CLAIM_STALE_S", "RunClaim", "init_wandb", "recon_rows", "save_recon_grid", "save_usage_plot",
           "save_rate_distortion_plot", "train", "inception_features", "reconstruction_fid", "reconstruction_lpips",
           "METRIC_PACKAGES", "check_metric_packages", "perceptual_metrics", "load_run", "evaluate_run",
           "complete_rate_distortion"]



# ---------------------------------------------------------------------------- atomic writes

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a crash mid-write
    never leaves a truncated file under ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:                                   # disk full, read-only, no permission, ...
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(path, e) from None


class WriteError(BavqError):
    """A file could not be written (disk full, read-only, no permission); the previous version of the
    file, if any, is intact and the partial file was removed."""

    def __init__(self, path: Path, e: OSError, then: str | None = None):
        then = then or (f"continue the run with: python train.py --resume {path.parent} (if it has a checkpoint; "
                        "otherwise start it again with --overwrite)")
        super().__init__(f"Could not write '{path}' ({e.strerror or type(e).__name__}). The file it was to "
                         f"replace, if any, is intact and the partial file was removed. Free disk space or fix the "
                         f"permissions of '{path.parent}', then {then}.")
        self.path, self.os_error = path, e

    def then(self, advice: str) -> "WriteError":
        """The same error with what to do next for another writer than a training run (evaluation, a grid)."""
        return WriteError(self.path, self.os_error, advice)


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------- errors a run can end with


class TrainingInterrupted(BavqError):
    """Ctrl-C / SIGTERM: a checkpoint was saved; the message says how to resume."""


class NonFiniteError(BavqError):
    """Training diverged: a loss term or the gradient became NaN/Inf, or the loss exploded (LossGuard);
    training stopped and nothing from after the last checkpoint was saved."""


def _diverged_message(e: NonFiniteLoss | LossExploded, run_dir: Path, steps_per_epoch: int) -> str:
    good = sorted(run_dir.glob("checkpoint_epoch*.pt"), key=lambda p: p.stat().st_mtime)
    last = (f"The last good checkpoint, '{good[-1]}', is kept; resume from it with "
            f"'python train.py --resume {good[-1]} --lr <lower>' (or --grad_clip <norm>)."
            if good else "No checkpoint had been written yet, so nothing of this run was kept as a result; "
            "lower --lr or set --grad_clip and start again with --overwrite.")
    where = (f"in epoch {e.step // steps_per_epoch + 1}, step {e.step} (batch {e.step % steps_per_epoch + 1} of "
             f"the epoch)")
    if isinstance(e, LossExploded):
        what = (f"the loss exploded {where}: its reconstruction loss was {e.ratio:.3g} times its minimum over "
                f"the previous {e.window} steps (the limit, --explode_factor, is {e.factor:g}; if such a jump is "
                "normal for your setup, allow it with a larger --explode_factor, or turn the check off with 0)")
    else:
        what = f"{', '.join(e.terms)} became non-finite (NaN or Inf) {where}"
    return f"Training stopped: {what}. Nothing from after that step was saved. {last}"


def _interrupted_message(epoch: int, s: StopRequested, path: Path, run_dir: Path) -> str:
    return (f"Training stopped in epoch {epoch} after {s.partial_epoch['batch']} batches (step {s.step}); "
            f"a checkpoint was saved to '{path}'. Resume with: python train.py --resume {run_dir}")


# ---------------------------------------------------------------------------- run directory, checkpoints

SHAPE_KEYS = ("quantizer", "codebook_size", "latent_dim", "hidden_dim")   # must match to resume
CHECKPOINT_FORMAT = 2          # written with every checkpoint; load_checkpoint refuses newer formats
# format 1 (before ema_smoothing existed) smoothed the VQ-EMA counts the way that is now "copy"

_RUN_FILES = ("final_model.pt", "final_metrics.json", "history.jsonl", "config.yaml", "recon.png", "usage.png",
              "checkpoint_interrupted.pt")


def checkpoint_epoch_number(p: Path) -> int | None:
    """N for a file named checkpoint_epoch{N}.pt, else None."""
    n = p.stem[len("checkpoint_epoch"):]
    return int(n) if p.suffix == ".pt" and p.stem.startswith("checkpoint_epoch") and n.isdigit() else None


def run_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name in _RUN_FILES or checkpoint_epoch_number(p) is not None]


def run_dir_at(out_dir: str | os.PathLike, name: str) -> Path:
    """Where the run ``name`` of ``out_dir`` lives: <out_dir>/<name>/ (the one place the layout is written;
    ``run_dir_of`` for a config, grid summaries and the golden runs for a name)."""
    return Path(out_dir) / name


def run_dir_of(cfg: Config) -> Path:
    """The run directory of ``cfg``: ``run_dir_at(out_dir, name)``, or, when resuming, the folder of the
    checkpoint it resumes (``resume_config`` makes the two agree)."""
    return resolve_resume_path(cfg.resume).parent if cfg.resume else run_dir_at(cfg.out_dir, cfg.resolved_name())


def check_run_dir(cfg: Config) -> Path:
    """<out_dir>/<name>/ for a new run; an existing run there is refused (BavqError, nothing touched)
    unless ``overwrite``."""
    run_dir = run_dir_of(cfg)
    if run_dir.exists():
        existing = run_files(run_dir)
        if existing and not cfg.overwrite:
            finished = "finished" if (run_dir / "final_metrics.json").exists() else "unfinished"
            hint = "" if finished == "finished" else f", or continue it with --resume {run_dir}"
            raise BavqError(f"Run directory '{run_dir}' already holds an {finished} run "
                            f"({', '.join(sorted(p.name for p in existing))}). Nothing was changed. Choose another "
                            f"--name, pass --overwrite to replace that run{hint}.")
    return run_dir


def prepare_run_dir(cfg: Config) -> Path:
    """Create <out_dir>/<name>/ after ``check_run_dir``; with ``overwrite`` the old run's files are
    deleted first so no stale checkpoint survives."""
    run_dir = check_run_dir(cfg)
    if run_dir.exists():
        for p in run_files(run_dir):
            p.unlink()
        if cfg.overwrite and (run_dir / "wandb").is_dir():      # an old offline W&B run would be synced later
            import shutil
            shutil.rmtree(run_dir / "wandb")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def remove_stale_temporaries(run_dir: Path) -> list:
    """Remove the '.<file>.tmp<pid>' files an atomic write leaves when it is killed or the disk is full
    (call only while holding the run's claim: no other process writes there). Returns their names."""
    import re
    stale = [p for p in Path(run_dir).glob(".*.tmp*") if re.fullmatch(r"\..+\.tmp\d+", p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "data": generator.get_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, peek: bool = False) -> dict:
    """Load a training checkpoint; a corrupt, truncated or foreign file is a BavqError. ``peek``: only its
    config and counters are needed, so its tensors are memory-mapped, not read (a resume reads the file once,
    in ``train``; ``resume_config`` and ``latest_checkpoint`` only peek)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=peek)
    except FileNotFoundError:
        raise BavqError(f"Checkpoint '{path}' does not exist. Pass a run directory or one of its "
                        "checkpoint_epoch<N>.pt files (to --resume, or to evaluate.py --checkpoint).") from None
    except Exception as e:
        others = sorted(p.name for p in path.parent.glob("checkpoint_*.pt") if p != path)
        raise BavqError(f"Checkpoint '{path}' is corrupt or truncated and cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}). It was left as it is. Use another "
                        f"checkpoint of the run instead ({', '.join(others) or 'none'}), e.g. --resume "
                        "<run_dir>/checkpoint_epoch<N>.pt (with --overwrite if later results exist), or evaluate.py "
                        "--checkpoint checkpoint_epoch<N>.pt.") from None
    needed = {"model_state_dict", "optimizer_state_dict", "epoch", "config"}
    if not isinstance(ck, dict) or not needed <= set(ck):
        raise BavqError(f"'{path}' is not a bavq training checkpoint (it lacks "
                        f"{', '.join(sorted(needed - set(ck))) if isinstance(ck, dict) else 'a checkpoint dict'}). "
                        "final_model.pt holds weights only: it cannot be resumed (pass a checkpoint_epoch<N>.pt "
                        "file or the run directory), and evaluate.py evaluates it without --checkpoint.")
    if "epoch_progress" in ck:                     # the name of partial_epoch in format 1
        ck["partial_epoch"] = ck.pop("epoch_progress")
    if ck.get("format", 1) == 1 and isinstance(ck.get("config"), dict):
        ck["config"].setdefault("ema_smoothing", "copy")
    if ck.get("format", 1) > CHECKPOINT_FORMAT:
        raise BavqError(f"Checkpoint '{path}' was written by a newer version of bavq (checkpoint format "
                        f"{ck['format']}, this version reads up to {CHECKPOINT_FORMAT}). Update bavq (git pull) to "
                        "resume or evaluate it.")
    return ck


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint furthest into training: checkpoint_epoch{N}.pt with the largest N, or
    checkpoint_interrupted.pt when it was written inside a later epoch."""
    run_dir = Path(run_dir)
    epochs = sorted((checkpoint_epoch_number(p), p) for p in run_dir.glob("checkpoint_epoch*.pt")
                    if checkpoint_epoch_number(p) is not None)
    best = epochs[-1] if epochs else None
    interrupted = run_dir / "checkpoint_interrupted.pt"
    if interrupted.is_file():
        ck = load_checkpoint(interrupted, peek=True)
        if best is None or ck["epoch"] >= best[0]:
            return interrupted
    if best is None:
        raise BavqError(f"No checkpoint found in '{run_dir}' (looked for checkpoint_epoch<N>.pt and "
                        "checkpoint_interrupted.pt). A run can be resumed only after its first checkpoint; "
                        "start it again with --overwrite, or lower --checkpoint_every.")
    return best[1]


def resolve_resume_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return latest_checkpoint(p)
    if p.is_file():
        return p
    raise BavqError(f"--resume '{path}' is neither a run directory nor a checkpoint file. Pass e.g. "
                    "experiments/<name> or experiments/<name>/checkpoint_epoch10.pt.")


def resume_config(path: str | os.PathLike, overrides: dict | None = None) -> Config:
    """The config to continue the run at ``path`` (run dir or checkpoint): the checkpoint's own
    config, with ``overrides`` (e.g. the flags given on the command line) on top. Changing the
    model shape is caught by ``train``. The run continues in the checkpoint's directory."""
    ck_path = resolve_resume_path(path)
    ck = load_checkpoint(ck_path, peek=True)
    here = ck_path.parent.resolve()
    asked = run_dir_at((overrides or {}).get("out_dir", ck_path.parent.parent), (overrides or {}).get("name", ck_path.parent.name))
    if asked.resolve() != here:
        raise BavqError(f"--resume continues the run where its checkpoint is ('{ck_path.parent}'), but --out_dir/--name "
                        f"point to '{asked}'. Nothing was changed. Drop --out_dir and --name when resuming (to continue "
                        "elsewhere, copy the whole run directory there and resume the copy).")
    values = {**ck["config"], **(overrides or {})}
    values.update(resume=str(ck_path), out_dir=str(ck_path.parent.parent), name=ck_path.parent.name,
                  overwrite=bool((overrides or {}).get("overwrite", False)))   # never inherited
    return make_config(values, source=f"checkpoint '{ck_path}' and command-line flags")


# Settings that change how a run executes but not what it computes: they may differ on --resume.
RESUME_MAY_CHANGE = ("device", "progress", "progress_every", "wandb", "wandb_project", "wandb_group", "num_workers", "data_dir",
                     "epochs", "checkpoint_every", "keep_checkpoints", "recon_images", "amp", "compile", "compile_mode",
                     "channels_last", "data_path",
                     "ba_chunk_rows", "eval_metrics", "eval_every", "explode_factor", "explode_window",
                     "resume", "out_dir", "name", "overwrite")
# Settings that change what the rest of a run computes but that recovering from a divergence needs
# (the divergence messages suggest them): they may differ on --resume, with a printed note.
RESUME_RECOVERY = ("lr", "grad_clip")


def config_differences(stored: dict, cfg: Config, allowed: tuple = RESUME_MAY_CHANGE) -> list[str]:
    """'key: old -> new' for every setting that changes what a run computes (not in ``allowed``; a
    resume also allows RESUME_RECOVERY, a sweep that finds the run does not)."""
    old = {**asdict(Config()), **stored}
    return [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in config_fields()
            if k not in allowed and old.get(k) != getattr(cfg, k)]


def _stored(cfg: Config) -> Config:
    """The config as written with a run: one-off instructions (resume, overwrite) are not settings."""
    return dataclasses.replace(cfg, resume="", overwrite=False)


def _run_id_of(run_dir: Path) -> str | None:
    """The run id in the header of a run directory's config.yaml (None: none, an older run)."""
    try:
        head = (Path(run_dir) / "config.yaml").read_text().split("\n", 5)[:5]
    except OSError:
        return None
    return next((line[len("# run id: "):].strip() for line in head if line.startswith("# run id: ")), None)


def _settings_a_run_may_change(ck: dict, run_dir: Path, ck_path: Path) -> tuple:
    """Which settings may differ between a checkpoint and the run directory's config.yaml while the
    checkpoint still belongs to that run: RESUME_RECOVERY too when both carry the same run id (the
    run was resumed with a new --lr); only RESUME_MAY_CHANGE when either has none (older runs).
    Different ids: another run's checkpoint, refused."""
    mine, theirs = _run_id_of(run_dir), ck.get("run_id")
    if mine and theirs and mine != theirs:
        raise BavqError(f"Checkpoint '{ck_path}' does not belong to the run in '{run_dir}' (it was written by run "
                        f"{theirs}, the directory holds run {mine}). Nothing was changed. Pass the run directory the "
                        "checkpoint was written in.")
    return RESUME_MAY_CHANGE + RESUME_RECOVERY if mine and theirs else RESUME_MAY_CHANGE


def check_resumable(cfg: Config, ck: dict, ck_path: Path) -> None:
    """Refuse (BavqError, nothing written) to resume with a different model shape, with changed
    settings that would silently not apply or change the experiment, with fewer epochs than done,
    or a finished run without --overwrite."""
    old = {**asdict(Config()), **ck["config"]}
    stored = ck_path.parent / "config.yaml"
    if stored.is_file():                       # a checkpoint copied in from another run does not belong here
        import yaml
        run_cfg = yaml.safe_load(stored.read_text()) or {}
        allowed = _settings_a_run_may_change(ck, ck_path.parent, ck_path)
        theirs = [f"{k}: {run_cfg[k]!r} (run) vs {old[k]!r} (checkpoint)" for k in config_fields()
                  if k in run_cfg and k not in allowed and run_cfg[k] != old.get(k)]
        if theirs:
            raise BavqError(f"Checkpoint '{ck_path}' does not belong to the run in '{ck_path.parent}': its settings "
                            f"differ from the run's config.yaml ({'; '.join(theirs)}). Nothing was changed. Resume "
                            "it from the directory it was written in, or start a new run.")
    shape = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in (*SHAPE_KEYS, "fsq_levels")
             if old.get(k) != getattr(cfg, k)]
    if shape:
        raise BavqError(f"Cannot resume '{ck_path}' with a different model shape ({'; '.join(shape)}). "
                        "Nothing was changed. Drop those flags to continue the run as it was, or start a new "
                        "run under another --name.")
    changed = config_differences(ck["config"], cfg, RESUME_MAY_CHANGE + RESUME_RECOVERY)
    if changed:
        raise BavqError(f"Cannot resume '{ck_path}' with changed settings ({'; '.join(changed)}). Nothing was "
                        "changed. A resumed run continues with the settings it was trained with (only "
                        f"{', '.join(k for k in RESUME_MAY_CHANGE + RESUME_RECOVERY if k not in ('resume', 'out_dir', 'name', 'overwrite'))} "
                        "may differ); to change the others start a new run under another --name.")
    done = ck["epoch"] + (1 if ck.get("partial_epoch") else 0)       # a mid-epoch checkpoint is inside epoch+1
    if cfg.epochs < done:
        raise BavqError(f"Cannot resume '{ck_path}' with --epochs {cfg.epochs}: the checkpoint is already "
                        f"{'inside' if ck.get('partial_epoch') else 'at the end of'} epoch {done}. Nothing was changed.")
    later = _later_results(ck_path.parent, ck_path, ck["epoch"])
    if later and not cfg.overwrite:
        what = "has finished" if any(p.name == "final_metrics.json" for p in later) else "has results from later on"
        latest = "" if what == "has finished" else " resume from the latest checkpoint (--resume <run_dir>),"
        raise BavqError(f"The run in '{ck_path.parent}' {what} ({', '.join(sorted(p.name for p in later))}). Resuming "
                        f"it from '{ck_path.name}' would replace them. Nothing was changed. Pass --overwrite with "
                        f"--resume to do that (e.g. with more --epochs),{latest} or start a new run (without --resume) "
                        "under another --name.")


def _later_results(run_dir: Path, ck_path: Path, epoch: int) -> list[Path]:
    """Files of the run that come from after ``ck_path``: final results, later epoch checkpoints, and
    an interrupted checkpoint other than ``ck_path`` itself."""
    out = []
    finished = (run_dir / "final_metrics.json").exists()
    for p in run_files(run_dir):
        n = checkpoint_epoch_number(p)
        later = n is not None and n > epoch
        # a final_model.pt without final_metrics.json is a finish that was cut off: not a result
        final = p.name == "final_metrics.json" or (p.name == "final_model.pt" and finished)
        if p != ck_path and (later or final or p.name == "checkpoint_interrupted.pt"):
            out.append(p)
    return out


def _discard_later_results(run_dir: Path, ck_path: Path, epoch: int) -> None:
    """Before continuing from ``ck_path`` (check_resumable has made sure --overwrite allows it): the
    results from later in the run are about to be recomputed; remove them so none is picked up stale."""
    for p in _later_results(run_dir, ck_path, epoch) + [run_dir / "final_model.pt"]:
        p.unlink(missing_ok=True)


def _save_checkpoint(path: Path, *, model, optimizer, cfg, epoch, step, history, val_metrics, train_metrics,
                     generator, partial_epoch=None, wandb_id=None, scaler=None, loss_guard=None, run_id=None,
                     model_ema=None) -> None:
    atomic_torch_save({
        **({"model_ema": model_ema.state_dict()} if model_ema is not None else {}),   # the live weights stay in model_state_dict
        "scaler": scaler.state_dict() if scaler is not None else None,
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step,
        "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
        "val_metrics": val_metrics, "train_metrics": train_metrics, "config": asdict(_stored(cfg)),
        "history": history, "rng": _rng_state(generator), "partial_epoch": partial_epoch, "wandb_id": wandb_id,
        "loss_guard": loss_guard, "run_id": run_id,
    }, path)



# ---------------------------------------------------------------------------- data parallel (torchrun)


class _GatherRows(torch.autograd.Function):
    """The rows of every process concatenated in rank order, (b_r, ...) -> (sum_r b_r, ...) with b_r =
    ``sizes[r]``. Backward: the gradient of this process's rows, summed over the processes."""

    @staticmethod
    def forward(ctx, x, sizes, rank):
        import torch.distributed as dist
        m = max(sizes)
        padded = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))]).contiguous()     # (m, ...)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


class DataParallel:
    """One run over the processes of ``torchrun`` (one or more). Every process holds all the data and
    the same model and walks through the same global batches (the one seeded permutation per epoch);
    a global batch of B images is split into contiguous blocks, one per process (``tensor_split``, so
    sizes differ by at most one). ``VQVAE.forward`` encodes this process's block, gathers the latents of
    the whole batch on every process, quantizes the whole batch there, decodes this process's block and
    gathers the reconstructions. So every quantizer computes on the global batch exactly what one
    process computes (EMA counts and sums, BA's marginals and entropy gradient, LFQ's batch entropy,
    usage, dead-code decisions and their replacements, CVQ anchors, affine statistics, Gumbel noise),
    identically on every process; every process computes the same losses and metrics (validation
    included: each image counted once). Backward: each process's gradient is the world size W times
    the single-process gradient restricted to its share, so the all-reduced average is exactly the
    single-process gradient for every parameter (``average_gradients``). The encoder and decoder
    work is split W ways; the quantizer's is done by every process."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def sizes(self, n: int) -> list:
        return [len(c) for c in torch.arange(n).tensor_split(self.world)]

    def mine(self, x: torch.Tensor) -> torch.Tensor:
        """This process's block of rows of a global batch."""
        return x.tensor_split(self.world)[self.rank]

    def gather(self, x_mine: torch.Tensor, n: int) -> torch.Tensor:
        """Every process's block of an n-row global batch, in order, on every process (differentiable)."""
        return _GatherRows.apply(x_mine, self.sizes(n), self.rank)

    def install(self, model: VQVAE) -> None:
        """Make ``model``'s forward this process's share of a data-parallel forward (see the class and
        ``VQVAE.forward``, which gives its encoder and decoder this process's block of the batch and gathers
        their outputs). The model's parameters and state_dict are unchanged."""
        model.batch_split = self

    @torch.no_grad()
    def average_gradients(self, model: torch.nn.Module) -> None:
        """Every parameter's gradient averaged over the processes (``train_epoch``'s after_backward)."""
        import torch.distributed as dist
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for dtype in dict.fromkeys(g.dtype for g in grads):  # one all-reduce per dtype (in parameter order, the
            group = [g for g in grads if g.dtype == dtype]   # same on every process), in that dtype: float64 stays float64
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat /= self.world
            for g, new in zip(group, flat.split([g.numel() for g in group])):
                g.copy_(new.view_as(g))

    def agree(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is true on any (a stop request)."""
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def data_parallel_from_env(cfg: Config) -> DataParallel | None:
    """Under torchrun (RANK and WORLD_SIZE set; also with one process, which checks this path): join the
    process group (NCCL on CUDA, gloo otherwise) and return this process's DataParallel; None for a
    plain run."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist
    if cfg.batch_size % world:
        raise BavqError(f"--batch_size {cfg.batch_size} is the global batch of all {world} processes and must divide "
                        f"by their number; use e.g. --batch_size {cfg.batch_size // world * world or world}.")
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size())


# ---------------------------------------------------------------------------- one process per run directory

CLAIM_FILE = ".bavq.lock"
CLAIM_HEARTBEAT_S = 20.0       # the holder refreshes the claim's mtime this often
CLAIM_STALE_S = 120.0          # a claim from another host not refreshed for this long is a dead process's


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, owned by another user
        return True
    return True


class RunClaim:
    """An exclusive claim on a run directory for the life of a run (train, resume, sweep member):
    ``<run_dir>/.bavq.lock``, created atomically (O_EXCL), holding host, pid, boot id, start time and
    a random token; a background thread refreshes its mtime every CLAIM_HEARTBEAT_S. A second process
    gets a BavqError naming the holder. A claim left by a dead process is taken over: on the same host
    when its pid is gone or the machine has rebooted since (boot id), from another host (a shared file
    system) when it has not been refreshed for CLAIM_STALE_S. Taking over renames the stale file away
    first (atomic: of two processes only one succeeds) and checks that the file it moved is the one it
    judged stale. The claim is released (the file removed, and the directory too if this run created
    it and left it empty) on exit."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / CLAIM_FILE
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": os.urandom(8).hex()}
        self._stop, self._thread, self._created = None, None, []

    def __enter__(self):
        import threading
        try:
            self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]   # innermost first
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BavqError(f"Cannot create the run directory '{self.run_dir}' ({e.strerror}). Choose an --out_dir "
                            "you can write to.") from None
        for _ in range(5):
            if self._try_create():
                break
            holder = self._read()
            if holder is not None and not self._stale(holder):
                self._release_dir()
                raise BavqError(_claimed_message(self.run_dir, holder))
            self._take_over(holder)
        else:
            self._release_dir()
            raise BavqError(f"Could not claim the run directory '{self.run_dir}': other processes keep claiming it. "
                            "Nothing was changed.")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        holder = self._read()
        if holder is not None and holder.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
        self._release_dir()
        return False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:                               # read-only, no permission, ...
            self._release_dir()
            raise BavqError(f"Cannot write in the run directory '{self.run_dir}' ({e.strerror}). Nothing was "
                            "changed. Choose an --out_dir you can write to (or fix its permissions).") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info))
        return True

    def _read(self, path: Path | None = None) -> dict | None:
        try:
            info = json.loads((path or self.path).read_text())
            info["age_s"] = time.time() - (path or self.path).stat().st_mtime
            return info
        except (OSError, ValueError):
            return None             # gone, or still being written: look again

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.info["host"]:
            return holder.get("boot_id") != self.info["boot_id"] or not _pid_alive(int(holder.get("pid", -1)))
        return holder["age_s"] > CLAIM_STALE_S

    def _take_over(self, holder: dict | None) -> None:
        if holder is None:
            time.sleep(0.05)        # a claim being written, or just released
            return
        moved = self.path.with_name(f"{CLAIM_FILE}.stale-{self.info['token']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return                  # another process took it over first
        if (self._read(moved) or {}).get("token") != holder.get("token"):
            try:                    # a fresh claim was moved by mistake: put it back unless a new one exists
                os.link(moved, self.path)
            except FileExistsError:
                pass
        moved.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(CLAIM_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _release_dir(self) -> None:
        for p in self._created:       # the folders this claim created, if they are still empty
            try:
                p.rmdir()
            except OSError:
                break


def _claimed_message(run_dir: Path, holder: dict) -> str:
    return (f"Run directory '{run_dir}' is in use by another bavq process (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {holder.get('started')}). Nothing was changed. Wait for it to finish, or "
            f"use another --name. If that process is gone (e.g. its machine was switched off and it ran on another "
            f"host), its claim is taken over automatically {CLAIM_STALE_S:.0f} s after its last sign of life, or "
            f"delete '{run_dir / CLAIM_FILE}'.")


# ---------------------------------------------------------------------------- interruption


class _StopFlag:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop.
    A second Ctrl-C aborts at once."""

    def __init__(self, dp: DataParallel | None = None, every: int = 1, device=None):
        self.requested = False
        self._old = {}
        self.dp, self.every, self.device, self.calls = dp, every, device, 0

    def __call__(self) -> bool:
        if self.dp is None:
            return self.requested
        self.calls += 1                              # torchrun: every process stops at the same step
        return self.calls % self.every == 0 and self.dp.agree(self.requested, self.device)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[bavq] stop requested: saving a checkpoint after this step (Ctrl-C again to abort "
              "without saving).", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False



# ---------------------------------------------------------------------------- W&B


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except Exception:
        return False


def _host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def init_wandb(cfg: Config, run_dir: Path, run_id: str | None = None):
    """A W&B run, or None. Never crashes or hangs: without an API key or network it logs offline
    (to <run_dir>/wandb, upload later with `wandb sync`), and if W&B fails to start it is turned off.
    Each fallback prints one line. ``run_id`` continues an earlier W&B run (resume)."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("[bavq] W&B is not installed; continuing without it (pip install wandb, or pass --no_wandb).")
        return None
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("disabled", "off"):
        return None
    if mode not in ("offline", "dryrun"):
        if not _wandb_has_key():
            print("[bavq] no W&B API key found: logging W&B offline into the run directory "
                  "(run `wandb login` to log online, or pass --no_wandb).")
            mode = "offline"
        elif not _host_reachable("api.wandb.ai"):
            print("[bavq] W&B server unreachable: logging W&B offline into the run directory "
                  "(upload later with `wandb sync`).")
            mode = "offline"
    else:
        mode = "offline"
    try:
        kwargs = {"id": run_id, "resume": "allow"} if run_id else {}
        if cfg.wandb_group:
            kwargs["group"] = cfg.wandb_group
        return wandb.init(project=cfg.wandb_project, name=cfg.resolved_name(), config=asdict(cfg),
                          dir=str(run_dir), mode=mode, **kwargs)
    except Exception as e:
        print(f"[bavq] W&B failed to start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "continuing without it.")
        return None


def _wandb_images(wb, paths: dict) -> None:
    if wb is None:
        return
    try:
        import wandb
        wb.log({f"images/{k}": wandb.Image(str(p)) for k, p in paths.items()}, commit=False)
    except Exception as e:  # pictures are a convenience; never stop a run for them
        print(f"[bavq] could not log pictures to W&B ({type(e).__name__}).")


# ---------------------------------------------------------------------------- pictures


@torch.no_grad()
@torch.no_grad()
def recon_rows(model: VQVAE, images_u8: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``n`` evenly spaced images, their eval-mode reconstructions), both on the [-1, 1] scale."""
    x = to_float(images_u8[evenly_spaced(images_u8.shape[0], n).to(images_u8.device)])
    with evaluating(model):
        model.mark_step()
        x_recon = model(x)[0].float()
    return x, x_recon


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported when a plot is first drawn."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _write_figure(plt, fig, path: Path) -> Path:
    """``fig`` as PNG at ``path`` (atomically), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


@torch.no_grad()
def save_recon_grid(model: VQVAE, images_u8: torch.Tensor, path: Path, n: int, title: str = "") -> Path:
    """recon.png: ``n`` evenly spaced validation images (row "original") above their eval-mode
    (hard-code) reconstructions (row "reconstruction", clipped to [0, 1] for display), each image
    shown 3x enlarged, with ``title`` (run, epoch, PSNR) on top."""
    plt = _pyplot()
    x, x_recon = recon_rows(model, images_u8, n)
    from torchvision.utils import make_grid
    # the two rows as one image with 2-pixel white gaps, drawn in one axes (2n axes took 4x as long to draw)
    n_img, size, gap = x.shape[0], x.shape[-1], 2
    grid = make_grid(torch.cat([x, x_recon]).add(1).div(2).clamp(0, 1).cpu(), nrow=n_img, padding=gap,
                     pad_value=1.0)                                                   # (3, H, W) in [0, 1]
    fig, ax = plt.subplots(figsize=(1.1 * n_img + 1.2, 3.0), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([gap + size / 2, 2 * gap + 1.5 * size], ["original", "reconstruction"], fontsize=9)
    ax.tick_params(left=False)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.99, bottom=0.02, top=0.86)
    return _write_figure(plt, fig, path)


def save_usage_plot(train_counts: torch.Tensor | None, val_counts: torch.Tensor, path: Path, title: str) -> Path:
    """usage.png: code-usage histograms (fraction of assignments per code, codes sorted by frequency),
    training epoch and validation pass."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for counts, label, style in ((train_counts, "train (last epoch)", "--"), (val_counts, "validation", "-")):
        if counts is None:
            continue
        c = counts.double()
        frac = (c / c.sum().clamp_min(1)).sort(descending=True).values.numpy()
        ax.step(np.arange(1, len(frac) + 1), frac, where="mid", linestyle=style,
                label=f"{label}: perplexity {float(perplexity_from_counts(counts)):.1f}, "
                      f"usage {float(usage_from_counts(counts)) * 100:.1f}%")
    ax.set_xlabel("code rank (sorted by frequency)")
    ax.set_ylabel("fraction of assignments")
    ax.set_xlim(0.5, len(val_counts) + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")         # sorted by frequency: the curves fall away from that corner
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)
    return _write_figure(plt, fig, path)


def save_rate_distortion_plot(rd: dict, path: Path, title: str) -> Path:
    """rate_distortion.png: the R(D) curves of a model's latents (``latent_rate_distortion``) and the run's
    own operating point, rate in bits per latent position against distortion per position."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    labels = {"codebook": f"own codebook ({rd['codebook_size']} codes)",
              "kmeans": f"own + k-means ({rd['alphabet_size']} letters)", "gaussian": "Gaussian, same covariance"}
    for name, style in (("gaussian", ":"), ("kmeans", "--"), ("codebook", "-")):
        pts = rd["curves"].get(name)
        if pts:
            pts = sorted(pts, key=lambda p: p["distortion"])
            ax.plot([p["distortion"] for p in pts], [p["rate_bits"] for p in pts], style, label=labels[name])
    run = rd["run_measured"] if isinstance(rd["run_measured"], dict) else rd["run_measured"][0]   # the gaps' point
    gap = rd["gaps"]["codebook"]
    ax.plot([run["distortion"]], [run["rate_bits"]], "k*", markersize=11,
            label=f"this model: {run['rate_bits']:.2f} bits, D {run['distortion']:.3g}"
                  + (f" ({gap['rate_bits']:+.2f} bits vs own curve)" if gap.get("rate_bits") is not None else ""))
    ax.set_xscale("log")
    ax.set_xlabel("distortion: squared error per latent position")
    ax.set_ylabel("rate: bits per latent position")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.9)
    return _write_figure(plt, fig, path)


# ---------------------------------------------------------------------------- the experiment: train(cfg)


def _summary_line(epoch: int, epochs: int, tr: dict, va: dict, seconds: float) -> str:
    restarts = f", {tr['dead_code_restarts']} restarted" if tr.get("dead_code_restarts") else ""
    return (f"Epoch {epoch}/{epochs} ({seconds:.1f} s) | Train Loss: {tr['loss']:.4f} | Val Loss: {va['loss']:.4f} | "
            f"PSNR: {va['psnr']:.2f} | Perplexity: {va['perplexity']:.1f} (train {tr['perplexity']:.1f}) | "
            f"Usage: {va['usage_rate'] * 100:.1f}% (train {tr['usage_rate'] * 100:.1f}%) | "
            f"Dead: {va['dead_codes']}{restarts} | Grad: {tr['grad_norm']:.3g}")


def _fits_on_device(train_u8: torch.Tensor, val_u8: torch.Tensor, device: torch.device) -> bool:
    """uint8 datasets stay on the GPU when they take under half of its free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return (train_u8.numel() + val_u8.numel()) < free // 2


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """After loading optimizer state: give each state tensor its parameter's memory layout (a
    checkpoint from another device or memory format would otherwise trip the fused CUDA kernel)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _plain(metrics: dict) -> dict:
    """Metrics without the code histogram (for history lines and JSON)."""
    return {k: v for k, v in metrics.items() if k != "code_counts"}



@dataclass
class _Run:
    """One experiment in progress: what train() set up, and the state a checkpoint saves."""
    cfg: Config
    rt: Runtime
    model: VQVAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator                     # the data order
    train_u8: torch.Tensor
    val_u8: torch.Tensor
    run_dir: Path | None = None
    wb: object = None                              # the W&B run, or None
    start_epoch: int = 1
    step: int = 0
    history: list = field(default_factory=list)    # one record per finished epoch (history.jsonl)
    partial_epoch: dict | None = None              # an interrupted epoch to finish first (train_epoch's resume_from)
    train_metrics: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)
    final_paper_metrics: dict = field(default_factory=dict)   # the papers' conventions of the last validation
    wandb_id: str | None = None
    pictures_step: int = -1                        # the step at which recon.png/usage.png were last drawn
    guard: LossGuard | None = None                 # the loss-explosion watch (its window spans epochs)
    run_id: str = ""                               # random, for life: ties checkpoints to their run directory
    after_backward: object = None                  # torchrun: the gradient all-reduce (DataParallel)
    ema: ModelEMA | None = None                    # --model_ema: the averaged weights that validation and the final model use

    def averaged(self):
        """The block in which the model holds the weights that are validated and kept (--model_ema: the averages)."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_u8.shape[0] / self.cfg.batch_size)


def train(cfg: Config) -> dict:
    """Run the experiment described by ``cfg``; returns the final validation metrics.

    Writes to <out_dir>/<name>/: config.yaml, history.jsonl (one line per epoch, W&B keys),
    checkpoint_epoch{N}.pt every ``checkpoint_every`` epochs, recon.png and usage.png at each
    checkpoint and at the end, final_model.pt (state_dict) and final_metrics.json.
    With ``cfg.resume`` (see ``resume_config``) it continues from a checkpoint and ends with
    exactly the metrics of an uninterrupted run (bit-identical on CPU). Ctrl-C saves
    checkpoint_interrupted.pt and raises TrainingInterrupted with the command that resumes.
    """
    # Every check comes before the first write: a refused start leaves the run directory untouched.
    cfg.validate()
    check_metric_packages(cfg.eval_metrics)
    dp = data_parallel_from_env(cfg)                          # torchrun: one run over all its processes
    device = pick_device(cfg.device)
    if dp is not None and device.type == "cuda":             # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    rt = make_runtime(cfg, device)
    run_dir = run_dir_of(cfg)
    try:
        if dp is not None:
            return _train_parallel(cfg, dp, device, rt, run_dir)
        with RunClaim(run_dir):                               # one process per run directory, from here on
            return _train_claimed(cfg, device, rt)
    except (RuntimeError, MemoryError) as e:                  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(e):
            raise
        raise BavqError(_out_of_memory_message(cfg, device, run_dir, e)) from None


def _train_parallel(cfg: Config, dp: DataParallel, device: torch.device, rt: Runtime, run_dir: Path) -> dict:
    """train(cfg) as one process of a torchrun job: process 0 claims and writes the run directory;
    the others run the same computation (every collective in the same order) writing only to a
    scratch directory that is deleted at the end, with W&B off and nothing printed. A refused start
    on process 0 stops every process before training."""
    import shutil
    import tempfile
    with contextlib.ExitStack() as stack:
        error, resumed = None, None
        if dp.rank == 0:
            try:
                stack.enter_context(RunClaim(run_dir))
                if cfg.resume:
                    resumed = _checked_resume(cfg)                # read once, used by _train_claimed
                else:
                    check_run_dir(cfg)
            except BavqError as e:
                error = e
        if dp.agree(error is not None, device):
            raise error or BavqError("Process 0 of this torchrun job refused to start the run (its message says "
                                     "why); nothing was written.")
        if dp.rank == 0:
            return _train_claimed(cfg, device, rt, dp, resumed=resumed)
        scratch = Path(tempfile.mkdtemp(prefix=f"bavq_rank{dp.rank}_"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        return _train_claimed(dataclasses.replace(cfg, wandb=False, progress=False), device, rt, dp, scratch)


def _train_claimed(cfg: Config, device: torch.device, rt: Runtime, dp: DataParallel | None = None,
                   scratch: Path | None = None, resumed: tuple | None = None) -> dict:
    """The run, once its directory is claimed (or, on torchrun processes other than 0, in ``scratch``);
    ``resumed``: the (checkpoint path, checkpoint) already read and checked, if any."""
    ck_path, ck = resumed or (_checked_resume(cfg) if cfg.resume else (None, None))
    run_dir = scratch or (ck_path.parent if ck is not None else run_dir_of(cfg))
    if scratch is None and run_dir.is_dir() and (ck is not None or cfg.overwrite or not run_files(run_dir)):
        remove_stale_temporaries(run_dir)
    if ck is None and scratch is None:
        check_run_dir(cfg)                                    # before any download or decoding
    seed_everything(cfg.seed)
    cfg, train_u8, val_u8 = _data_on_device(cfg, device)
    model, optimizer = setup_model(cfg, device, rt)
    run = _Run(cfg, rt, model, optimizer, torch.Generator().manual_seed(cfg.seed), train_u8, val_u8)
    if dp is not None:
        dp.install(model)                                     # the forward splits and gathers the batch
        run.after_backward = dp.average_gradients
    run.guard = LossGuard(cfg.explode_factor, cfg.explode_window, rt.device)
    run.run_id = uuid.uuid4().hex[:16]
    if cfg.model_ema > 0:
        run.ema = ModelEMA(model, cfg.model_ema, cfg.model_ema_warmup)
    if ck is not None:
        _restore(run, ck, ck_path, scratch)
    else:
        run.run_dir = scratch or prepare_run_dir(cfg)         # first write of a new run
    _start_files(run, device)
    run.wb = init_wandb(cfg, run.run_dir, run.wandb_id)
    run.wandb_id = getattr(run.wb, "id", None) or run.wandb_id
    try:
        with _StopFlag(dp, cfg.progress_every, device) as stop:
            for epoch in range(run.start_epoch, cfg.epochs + 1):
                _run_epoch(run, epoch, stop)
        return _finish(run)
    finally:
        if run.wb is not None:
            run.wb.finish()


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _out_of_memory_message(cfg: Config, device, run_dir: Path, e: BaseException) -> str:
    ck = sorted(run_dir.glob("checkpoint_*.pt")) if run_dir.is_dir() else []
    resume = (f" To continue this run from its last checkpoint, resume it with a setting that may change on --resume: "
              f"python train.py --resume {run_dir} --amp bf16 (or --ba_chunk_rows N for BA-VQ, --data_path loader)."
              if ck else "")
    return (f"Ran out of memory on {device} ({str(e).splitlines()[0][:160]}). Files already written are intact. A new "
            f"run needs less memory with a smaller --batch_size (now {cfg.batch_size}), --codebook_size (now "
            f"{cfg.codebook_size}), --latent_dim (now {cfg.latent_dim}), --val_batch_size or --ba_chunk_rows (BA-VQ) "
            f"(with --overwrite, or under another --name, if its folder already holds files).{resume}")


def _checked_resume(cfg: Config) -> tuple[Path, dict]:
    ck_path = resolve_resume_path(cfg.resume)
    ck = load_checkpoint(ck_path)
    check_resumable(cfg, ck, ck_path)
    return ck_path, ck


def _data_on_device(cfg: Config, device: torch.device):
    """(cfg, train, val): the dataset, on the device where it fits (else data_path 'loader')."""
    train_u8, val_u8 = load_dataset(cfg)
    if cfg.data_path == "device" and not _fits_on_device(train_u8, val_u8, device):
        print(f"[bavq] the dataset does not fit in {device} memory; using --data_path loader.")
        cfg = dataclasses.replace(cfg, data_path="loader")
    if cfg.data_path == "device":
        train_u8 = train_u8.to(device)
    return cfg, train_u8, val_u8.to(device)


def _restore(run: _Run, ck: dict, ck_path: Path, run_dir: Path | None = None) -> None:
    """Load a checkpoint (checked by check_resumable) into the run, whose files go to ``run_dir``
    (default: the checkpoint's directory); later results there are discarded."""
    cfg = run.cfg
    try:
        run.model.load_state_dict(ck["model_state_dict"])
        run.optimizer.load_state_dict(ck["optimizer_state_dict"])
        if run.ema is not None:
            run.ema.load_state_dict(ck["model_ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise BavqError(_misfit_message(ck_path, e)) from None
    _match_state_layout(run.optimizer)
    for group in run.optimizer.param_groups:       # the optimizer state carries the old lr: --lr on resume wins
        if "name" not in group:                    # (a quantizer's own group keeps its lr)
            group["lr"] = cfg.lr
    _set_rng_state(ck["rng"], run.generator)
    if run.rt.scaler is not None and ck.get("scaler"):
        run.rt.scaler.load_state_dict(ck["scaler"])
    run.run_dir, run.start_epoch, run.step, run.history = run_dir or ck_path.parent, ck["epoch"] + 1, ck["step"], list(ck["history"])
    run.partial_epoch, run.wandb_id = ck.get("partial_epoch"), ck.get("wandb_id")
    run.run_id = ck.get("run_id") or run.run_id
    run.train_metrics, run.val_metrics = ck.get("train_metrics") or {}, ck.get("val_metrics") or {}
    where = (f"epoch {ck['epoch'] + 1}, batch {run.partial_epoch['batch']}" if run.partial_epoch
             else f"the end of epoch {ck['epoch']}")
    print(f"[bavq] resuming '{run.run_dir}' from {ck_path.name} ({where}, step {run.step}).")
    if cfg.epochs != ck["config"]["epochs"]:
        print(f"[bavq] note: epochs {ck['config']['epochs']} -> {cfg.epochs}: the beta schedule and the loss "
              "warm-up continue over the new total, so this run matches no uninterrupted run.")
    old = {**asdict(Config()), **ck["config"]}
    recovery = [f"{k} {old[k]} -> {getattr(cfg, k)}" for k in RESUME_RECOVERY if old[k] != getattr(cfg, k)]
    if recovery:
        print(f"[bavq] note: {', '.join(recovery)} from here on (config.yaml now says so); the run before step "
              f"{run.step} used the old value{'s' if len(recovery) > 1 else ''}, so it matches no uninterrupted run.")
    run.guard = LossGuard(cfg.explode_factor, cfg.explode_window, run.rt.device, ck.get("loss_guard"))
    if run.run_dir == ck_path.parent:
        _discard_later_results(run.run_dir, ck_path, ck["epoch"])


def _misfit_message(ck_path: Path, e: Exception) -> str:
    return (f"Checkpoint '{ck_path}' does not fit this model ({str(e).splitlines()[0][:200]}). It was written by a "
            "different model or library version; resume it with the settings it was trained with, or start a new run.")


def _provenance(device: torch.device, run_id: str) -> str:
    """YAML comment lines: when, where (the device actually used) and which code wrote the run."""
    import subprocess
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    return (f"# written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {socket.gethostname()}\n"
            f"# device used: {device} ({name}); torch {torch.__version__}; bavq code: git {commit}\n"
            f"# run id: {run_id}\n")


def _start_files(run: _Run, device: torch.device) -> None:
    """config.yaml and history.jsonl (so far), and the one-line run announcement."""
    cfg = run.cfg
    atomic_write_text(run.run_dir / "config.yaml", _provenance(device, run.run_id) + config_to_yaml(_stored(cfg)))
    atomic_write_text(run.run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in run.history))
    print(f"[bavq] run '{cfg.resolved_name()}': {cfg.quantizer}, K={cfg.codebook_size}, D={cfg.latent_dim}, "
          f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
          f"{run.train_u8.shape[0]} train / {run.val_u8.shape[0]} val images, device {device}, -> {run.run_dir}")


def _run_epoch(run: _Run, epoch: int, stop) -> None:
    """Train one epoch (or finish an interrupted one), validate, log, checkpoint."""
    cfg, t0 = run.cfg, time.time()
    try:
        run.train_metrics, run.step = train_epoch(
            run.model, run.optimizer, run.train_u8, cfg, run.generator, run.step, cfg.epochs * run.steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}", resume_from=run.partial_epoch, should_stop=stop, rt=run.rt,
            after_backward=run.after_backward, guard=run.guard, model_ema=run.ema)
    except (NonFiniteLoss, LossExploded) as e:
        raise NonFiniteError(_diverged_message(e, run.run_dir, run.steps_per_epoch)) from None
    except StopRequested as s:
        path = run.run_dir / "checkpoint_interrupted.pt"
        _save_run(run, path, epoch - 1, s.step, partial_epoch=s.partial_epoch)
        raise TrainingInterrupted(_interrupted_message(epoch, s, path, run.run_dir)) from None
    run.partial_epoch = None
    evaluated = epoch == cfg.epochs or bool(cfg.eval_every and epoch % cfg.eval_every == 0)
    with run.averaged():
        run.val_metrics, paper = _validation_pass(run.model, run.val_u8, cfg, run.rt,
                                                  cfg.eval_metrics if evaluated else [], cfg.progress)
        if epoch == cfg.epochs:                                                   # reported by _finish
            run.final_paper_metrics = paper
        elif evaluated:
            run.val_metrics.update(paper)
            run.val_metrics.update(perceptual_metrics(run.model, run.val_u8, cfg.eval_metrics, run.rt))
    record = _history_record(run, epoch, time.time() - t0)
    run.history.append(record)
    with open(run.run_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.wb is not None:
        run.wb.log(record, step=epoch)
    print(_summary_line(epoch, cfg.epochs, run.train_metrics, run.val_metrics, record["time_s"]), flush=True)
    if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
        _save_run(run, run.run_dir / f"checkpoint_epoch{epoch}.pt", epoch, run.step)
        (run.run_dir / "checkpoint_interrupted.pt").unlink(missing_ok=True)   # superseded by this later one
        _prune_checkpoints(run.run_dir, cfg.keep_checkpoints)
        with run.averaged():
            _write_pictures(run, epoch)


def _history_record(run: _Run, epoch: int, seconds: float) -> dict:
    """One history.jsonl line (and W&B step): train/* and val/* metrics with stable loss keys."""
    record = {"epoch": epoch, "step": run.step, "time_s": seconds,
              "phase": "pretrain" if epoch <= run.cfg.pretrain_epochs else "quantized"}
    record.update({f"train/{k}": v for k, v in _plain(run.train_metrics).items()})
    record.update({f"val/{k}": v for k, v in _plain(run.val_metrics).items()})
    for k in run.model.quantizer.loss_names:          # the original code logs 0 for absent terms
        record.setdefault(f"train/{k}", 0.0)
        record.setdefault(f"val/{k}", 0.0)
    return record


def _save_run(run: _Run, path: Path, epoch: int, step: int, partial_epoch: dict | None = None) -> None:
    _save_checkpoint(path, model=run.model, optimizer=run.optimizer, cfg=run.cfg, epoch=epoch, step=step,
                     history=run.history, val_metrics=run.val_metrics, train_metrics=run.train_metrics,
                     generator=run.generator, partial_epoch=partial_epoch, wandb_id=run.wandb_id, scaler=run.rt.scaler,
                     loss_guard=run.guard.state(), run_id=run.run_id, model_ema=run.ema)


def _prune_checkpoints(run_dir: Path, keep: int) -> None:
    """--keep_checkpoints N: delete all but the N latest checkpoint_epoch{N}.pt (0 = keep all)."""
    if keep <= 0:
        return
    epochs = sorted((n, p) for p in run_dir.glob("checkpoint_epoch*.pt") if (n := checkpoint_epoch_number(p)) is not None)
    for _, p in epochs[:-keep]:
        p.unlink(missing_ok=True)


def _write_pictures(run: _Run, epoch: int) -> None:
    cfg = run.cfg
    title = f"{cfg.resolved_name()}: {cfg.quantizer}, K={cfg.codebook_size}"
    recon_title = f"{title}, epoch {epoch}, val PSNR {run.val_metrics['psnr']:.2f} dB"
    paths = {"recon": save_recon_grid(run.model, run.val_u8, run.run_dir / "recon.png", cfg.recon_images,
                                      recon_title),
             "usage": save_usage_plot(run.train_metrics.get("code_counts"), run.val_metrics["code_counts"],
                                      run.run_dir / "usage.png", title)}
    _wandb_images(run.wb, paths)
    run.pictures_step = run.step


def _finish(run: _Run) -> dict:
    """final_model.pt, the final pictures and final_metrics.json; returns the final metrics."""
    with run.averaged():                                 # --model_ema: the final model is the averaged one
        _finish_model(run)
    return _finish_files(run)


def _finish_model(run: _Run) -> None:
    """Validate (if the last epoch did not) and write final_model.pt; the perceptual metrics."""
    cfg = run.cfg
    if not run.val_metrics:   # resumed a run whose last epoch was already done: nothing left to train
        run.val_metrics, run.final_paper_metrics = _validation_pass(run.model, run.val_u8, cfg, run.rt,
                                                                    cfg.eval_metrics, cfg.progress)
    atomic_torch_save(run.model.state_dict(), run.run_dir / "final_model.pt")
    run.val_metrics.update(run.final_paper_metrics)
    run.val_metrics.update(perceptual_metrics(run.model, run.val_u8, cfg.eval_metrics, run.rt))
    if run.pictures_step != run.step:                    # not already drawn at the last checkpoint
        _write_pictures(run, cfg.epochs)


def _finish_files(run: _Run) -> dict:
    """final_metrics.json (and the rest of the finish); returns the final metrics."""
    cfg, tr = run.cfg, run.train_metrics
    final = {"epoch": cfg.epochs, **_plain(run.val_metrics),
             "train_perplexity": tr.get("perplexity"), "train_usage_rate": tr.get("usage_rate"),
             "val_code_counts": run.val_metrics["code_counts"].tolist(),
             "train_code_counts": tr["code_counts"].tolist() if "code_counts" in tr else None}
    atomic_write_text(run.run_dir / "final_metrics.json", json.dumps(final, indent=2))
    (run.run_dir / "checkpoint_interrupted.pt").unlink(missing_ok=True)
    if run.wb is not None:
        run.wb.summary.update({f"final/{k}": v for k, v in final.items() if not k.endswith("code_counts")})
    return final



# ---------------------------------------------------------------------------- LPIPS and rFID (optional packages)


def inception_features():
    """The standard FID feature network (Inception-v3 pool features, 2048-d, weights of the TF FID
    release via torch-fidelity, bilinear resize to 299x299 inside), from torchmetrics; uint8 images
    (N, 3, H, W) in, (N, 2048) out. Needs requirements-eval.txt and, once, network for the weights."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval()


@torch.no_grad()
def reconstruction_fid(model: VQVAE, images_u8: torch.Tensor, feature_net, batch_size: int = 256,
                       rt: Runtime | None = None) -> float:
    """rFID: Frechet distance between the features of ``images_u8`` (the whole test set) and of their
    eval-mode reconstructions, both as uint8 images (reconstructions clipped and rounded)."""
    rt = rt or Runtime(images_u8.device)
    real, fake = [], []
    with evaluating(model):
        for s, x in eval_batches(model, images_u8, batch_size, rt):
            with rt.autocast():
                x_recon = model(x)[0]
            real.append(feature_net(images_u8[s:s + batch_size]).double().cpu())
            fake.append(feature_net(to_uint8(x_recon)).double().cpu())
    return frechet_distance(torch.cat(real), torch.cat(fake))


@torch.no_grad()
def reconstruction_lpips(model: VQVAE, images_u8: torch.Tensor, batch_size: int = 256, rt: Runtime | None = None,
                         net_type: str = "alex") -> float:
    """Mean LPIPS (Zhang et al. 2018, torchmetrics, AlexNet features with the published linear
    weights) between the test images and their eval-mode reconstructions, both on the [-1, 1] scale
    (reconstructions clipped to it)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="sum").to(images_u8.device)
    rt = rt or Runtime(images_u8.device)
    total = 0.0
    with evaluating(model):
        for s, x in eval_batches(model, images_u8, batch_size, rt):
            with rt.autocast():
                x_recon = model(x)[0]
            total += float(metric(x_recon.float().clamp(-1, 1), to_float(images_u8[s:s + batch_size])))
            metric.reset()
    return total / images_u8.shape[0]


METRIC_PACKAGES = {"lpips": ("torchmetrics",), "fid": ("torchmetrics", "torch_fidelity")}   # import names


def check_metric_packages(names) -> None:
    """Before a run or an evaluation starts: the optional packages that the metrics ``names`` need are
    installed (a BavqError otherwise, before anything is written). Their weights are fetched on first use."""
    import importlib.util
    wanted = [n for n in ("lpips", "fid") if n in names]
    missing = sorted({pkg for n in wanted for pkg in METRIC_PACKAGES[n] if importlib.util.find_spec(pkg) is None})
    if missing:
        raise BavqError(f"eval_metrics asks for {' and '.join(wanted)}, which need{'s' if len(wanted) == 1 else ''} "
                        f"{', '.join(p.replace('_', '-') for p in missing)} (not installed). Install them with "
                        "pip install -r requirements-eval.txt (the metric weights are downloaded once, on first use), "
                        "or leave lpips/fid out of --eval_metrics. Nothing was run or written.")


def _validation_pass(model: VQVAE, val_u8: torch.Tensor, cfg: Config, rt: Runtime, names,
                     progress: bool = False) -> tuple[dict, dict]:
    """(``validate``'s metrics at the run's validation batch size, the papers' conventions among ``names``
    collected from the same pass): every validation of a run and of its evaluation."""
    pm = PaperMetrics(names, model.quantizer.num_embeddings)
    metrics = validate(model, val_u8, default_val_batch_size(cfg), progress=progress, rt=rt,
                       observe=pm.add if pm.names else None)
    return metrics, pm.result()


def perceptual_metrics(model: VQVAE, images_u8: torch.Tensor, names, rt: Runtime | None = None) -> dict:
    """``lpips`` and/or ``fid`` (rFID) of the model on ``images_u8`` for the names asked for (the papers'
    conventions come from the validation pass: ``PaperMetrics``). A metric whose package or weights are
    missing is skipped with one printed line saying why."""
    out = {}
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)              # a weight download behind a firewall fails instead of hanging
    try:
        for name in [n for n in ("lpips", "fid") if n in names]:
            try:
                if name == "lpips":
                    out["lpips"] = reconstruction_lpips(model, images_u8, rt=rt)
                else:
                    out["rfid"] = reconstruction_fid(model, images_u8, inception_features().to(images_u8.device), rt=rt)
            except Exception as e:   # ImportError, no network for the weights, ...: the run still finishes
                print(f"[bavq] {name} skipped ({_one_line(e)}); pip install -r requirements-eval.txt, and allow one "
                      "download of its weights.", flush=True)
    finally:
        socket.setdefaulttimeout(old_timeout)
    return out


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ---------------------------------------------------------------------------- finished runs: reload, evaluate


def load_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
             device: str = "cpu") -> tuple[VQVAE, Config]:
    """(model in eval mode, its Config) of a run directory: the run's own architecture from its
    config.yaml, the weights of final_model.pt, or of ``checkpoint``: a checkpoint of this run, given as
    a path or as a file name in the run directory (e.g. "checkpoint_epoch10.pt"). A checkpoint whose
    settings differ from the run's config.yaml belongs to another run and is refused."""
    import yaml
    run_dir = Path(run_dir).expanduser()
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        raise BavqError(f"'{run_dir}' is not a run directory (it has no config.yaml). Pass the folder that "
                        "train.py wrote, e.g. experiments/<name>.")
    values = {k: v for k, v in (yaml.safe_load(stored.read_text()) or {}).items() if k in config_fields()}
    checkpoints = ", ".join(sorted(p.name for p in run_dir.glob("checkpoint_*.pt"))) or "none"
    weights = run_dir / "final_model.pt"
    if checkpoint is not None:
        ck_path = weights = _checkpoint_of_run(run_dir, checkpoint, checkpoints)
        ck = load_checkpoint(ck_path)
        cfg, state = make_config(ck["config"], source=f"checkpoint '{ck_path}'"), ck["model_state_dict"]
        theirs = config_differences(values, cfg, _settings_a_run_may_change(ck, run_dir, ck_path))
        if theirs:
            raise BavqError(f"Checkpoint '{ck_path}' does not belong to the run in '{run_dir}': its settings differ "
                            f"from the run's config.yaml ({'; '.join(theirs)}). Nothing was read or written. Pass "
                            "the run directory the checkpoint was written in.")
    else:
        if not weights.is_file():
            raise BavqError(f"'{run_dir}' has no final_model.pt (the run has not finished). Pass one of its "
                            f"checkpoints with --checkpoint NAME (from Python: checkpoint=NAME): {checkpoints}.")
        cfg, state = make_config(values, source=f"'{stored}'"), torch.load(weights, map_location="cpu", weights_only=True)
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        written_by = re.search(r"^# device used: .*bavq code: (.*)$", stored.read_text(), re.M)
        raise BavqError(f"The weights in '{weights}' do not fit the model that '{stored}' describes "
                        f"({str(e).splitlines()[0][:200]}): the run was written by another version of bavq (its "
                        f"config.yaml says: {written_by.group(1) if written_by else 'no version recorded'}), or its "
                        "config.yaml was edited since. Evaluate it with the bavq version that wrote it, or restore "
                        "its config.yaml; nothing was written.") from None
    return model.to(pick_device(device)).eval(), cfg


def _checkpoint_of_run(run_dir: Path, checkpoint: str | os.PathLike, checkpoints: str) -> Path:
    """A checkpoint given as a path, or as a name inside ``run_dir``; a missing one is a BavqError."""
    given = Path(checkpoint).expanduser()
    for candidate in ((run_dir / given, given) if not given.is_absolute() else (given,)):
        if candidate.is_file():
            return candidate
    raise BavqError(f"Checkpoint '{checkpoint}' was found neither in the run directory '{run_dir}' nor as a path. "
                    f"The run's checkpoints are: {checkpoints}; pass one of these names, or a path to the file.")


def evaluate_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None, device: str = "auto",
                 data_dir: str | None = None, out_name: str | None = None, eval_metrics=None,
                 rate_distortion: dict | None = None) -> dict:
    """Every validation metric of a finished run (or of one of its checkpoints) on its whole test
    set, written into the run directory: eval_metrics.json, eval_recon.png and eval_usage.png for the
    final model; eval_metrics_<checkpoint>.json, eval_recon_<checkpoint>.png, eval_usage_<checkpoint>.png
    for a checkpoint (so no evaluation overwrites another). ``rate_distortion``: also the R(D) analysis of
    the model's latents on the test set (``vqvae.latent_rate_distortion``, these keyword arguments, {} for
    its defaults), written as rate_distortion[_<checkpoint>].json and .png; its summary is in the result
    under "rate_distortion". Returns the metrics."""
    model, cfg = load_run(run_dir, checkpoint, device)        # refuses a checkpoint of another run
    check_metric_packages(cfg.eval_metrics if eval_metrics is None else eval_metrics)
    if rate_distortion is not None:
        check_rate_distortion(model)                          # refused before anything is computed or written
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    dev = next(model.parameters()).device
    _, val_u8 = load_dataset(cfg)
    val_u8 = val_u8.to(dev)
    amp = "off" if cfg.amp == "fp16" and dev.type != "cuda" else cfg.amp    # fp16 runs evaluate in float32 off CUDA
    rt = make_runtime(dataclasses.replace(cfg, device=str(dev), amp=amp), dev)
    names = cfg.eval_metrics if eval_metrics is None else eval_metrics
    metrics, paper = _validation_pass(model, val_u8, cfg, rt, names)
    metrics.update(paper)
    metrics.update(perceptual_metrics(model, val_u8, names, rt))
    run_dir = Path(run_dir)
    try:
        return _write_evaluation(model, cfg, val_u8, metrics, run_dir, checkpoint, out_name, rate_distortion, rt)
    except WriteError as e:
        raise e.then("evaluate again (the same evaluate.py command or evaluate_run call): the run's own files are "
                     "untouched") from None


def _write_evaluation(model, cfg, val_u8, metrics, run_dir, checkpoint, out_name, rate_distortion, rt) -> dict:
    """evaluate_run's files: eval_metrics*.json, its pictures and, on request, the R(D) analysis and plot."""
    out = {"run": str(run_dir), "checkpoint": str(checkpoint) if checkpoint else "final_model.pt",
           "val_images": int(val_u8.shape[0]), **_plain(metrics), "val_code_counts": metrics["code_counts"].tolist()}
    tag = f"_{Path(checkpoint).stem}" if checkpoint else ""
    out["written_to"] = str(run_dir / (out_name or f"eval_metrics{tag}.json"))
    atomic_write_text(Path(out["written_to"]), json.dumps(out, indent=2))
    save_recon_grid(model, val_u8, run_dir / f"eval_recon{tag}.png", cfg.recon_images,
                    f"{cfg.resolved_name()} (evaluation{tag.replace('_', ', ', 1)}), val PSNR {metrics['psnr']:.2f} dB")
    save_usage_plot(None, metrics["code_counts"], run_dir / f"eval_usage{tag}.png",
                    f"{cfg.resolved_name()} (evaluation{tag.replace('_', ', ', 1)})")
    if rate_distortion is not None:
        rd = latent_rate_distortion(model, val_u8, batch_size=default_val_batch_size(cfg), rt=rt, **rate_distortion)
        rd = {"run": str(run_dir), "checkpoint": out["checkpoint"], **rd}
        path = run_dir / f"rate_distortion{tag}.json"
        atomic_write_text(path, json.dumps(rd, indent=1))
        save_rate_distortion_plot(rd, run_dir / f"rate_distortion{tag}.png",
                                  f"{cfg.resolved_name()}: R(D) of its latents ({rd['positions']} positions)")
        out["rate_distortion"] = {"written_to": str(path), "run_point": rd["run"], "gaps": rd["gaps"]}
    return out


def complete_rate_distortion(roots, data_dir: str | None = None, device: str = "auto", options: dict | None = None,
                             log=print) -> dict:
    """The R(D) analysis of every finished run under the folders ``roots`` that has no rate_distortion.json yet
    (``evaluate_run(run, rate_distortion=options)``, ``latent_rate_distortion``'s keyword arguments, {} or None for
    its defaults; it also writes eval_metrics.json and its pictures; the run's
    training files are untouched), so that the frontier has it for every run. A run whose quantizer has no explicit
    alphabet, or whose codes depend on the batch, is left out with the reason. Returns {run name: "done" | reason}."""
    done = {}
    for root in map(Path, roots):
        if not root.is_dir():
            continue                                  # a frontier file (JSON): its runs are as they were measured
        for run in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (run / "final_metrics.json").is_file() or (run / "rate_distortion.json").is_file():
                continue
            try:
                evaluate_run(run, device=device, data_dir=data_dir, rate_distortion=dict(options or {}))
                done[run.name] = "done"
            except BavqError as e:
                done[run.name] = str(e)
            log(f"[bavq] R(D) of {run.name}: {done[run.name]}")
    return done
