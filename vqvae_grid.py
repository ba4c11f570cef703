"""Grids of runs: a sweep over quantizers, codebook sizes and seeds (``run_sweep``), split into disjoint
shards for several GPUs or machines (``--shard I/N``, SLURM arrays), with a manifest and a summary table
of every run's state (``grid_summary``, ``train.py --summarize``). Each run is an ordinary
``vqvae_experiment.train`` run in its own directory; finished runs are skipped and interrupted ones resumed.

For notebooks, ``vqvae.NAME`` reaches the names in ``__all__`` (``vqvae.run_sweep``, ``vqvae.grid_summary``, ...).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path

from vqvae import BavqError, Config, make_config
from vqvae_experiment import (RunClaim, TrainingInterrupted, WriteError, checkpoint_epoch_number, run_files, atomic_write_text,
                              config_differences, resume_config, run_dir_at, run_dir_of, train)

# the names this module hands out (also as vqvae.NAME)
__all__ = ["SWEEP_KEYS", "grid_configs", "group_configs", "run_sweep", "job_log_path", "grid_manifest_path", "grid_failure_path",
           "parse_shard", "shard_configs", "write_grid_manifest", "grid_summary", "summary_table"]



# ---------------------------------------------------------------------------- sweeps

SWEEP_KEYS = ("quantizer", "codebook_size", "seed")       # the keys that may take several values


def grid_configs(values: dict, grid: dict, always_sweep: bool = False) -> tuple[list, bool]:
    """The configs of a grid: ``values`` (the settings given; defaults fill the rest) with every combination of ``grid``
    ({sweep key: list of values}). Returns (configs, whether it is a sweep, i.e. more than one run or
    ``always_sweep``); a sweep's runs are named <name>_<quantizer>_k<K>_s<seed>."""
    for k, v in grid.items():
        if not v:
            raise BavqError(f"'{k}' was given an empty list of values; give at least one.")
    sweep = always_sweep or any(len(v) > 1 for v in grid.values())
    configs = []
    for combo in itertools.product(*grid.values()):
        cfg = make_config({**values, **dict(zip(grid, combo))}, source="command-line flags")
        if sweep:
            prefix = f"{values['name']}_" if values.get("name") else ""
            cfg = dataclasses.replace(cfg, name=f"{prefix}{cfg.quantizer}_k{cfg.codebook_size}_s{cfg.seed}",
                                      wandb_group=cfg.wandb_group or values.get("name") or "grid")
        configs.append(cfg.validate())
    return configs, sweep


def group_configs(values: dict, groups, grid: dict, flags: dict | None = None, source: str = "the config file",
                  fixed: tuple = ()) -> list:
    """The configs of a grid of named groups (a YAML file's ``groups:`` mapping: the rungs of a ladder, the points of
    a frontier): group G's settings over the file's shared ``values``, the command line's ``flags`` over both, and each
    group over every combination of ``grid`` (sweep keys as lists; a group may give its own, except the keys in
    ``fixed``: those the command line gave). G's runs are named
    <name>_G_<quantizer>_k<K>_s<seed>, <name> the grid's ``name`` (a sweep of G's settings as flags with ``--name
    <name>_G`` makes the same runs), so the whole file is one resumable grid: finished runs are skipped, interrupted ones resumed."""
    if not isinstance(groups, dict) or not groups or not all(isinstance(v, dict) for v in groups.values()):
        raise BavqError(f"{source}: 'groups' must map each group's name to its settings, e.g. 'groups: {{r0: "
                        "{quantizer: vq_ema}, r1: {quantizer: ecvq, ecvq_lambda: 0.01}}'; nothing was run.")
    flags = flags or {}
    grid_name = flags.get("name", values.get("name", ""))
    configs = []
    for group, settings in groups.items():
        own = {k: settings[k] if isinstance(settings[k], list) else [settings[k]] for k in SWEEP_KEYS if k in settings}
        rest = {k: v for k, v in settings.items() if k not in own}
        name = f"{grid_name}_{group}" if grid_name else str(group)
        try:
            make_config({**values, **rest, "name": name}, source=f"group '{group}' of {source}")
            group_grid = {**grid, **{k: v for k, v in own.items() if k not in fixed}}
            cfgs, _ = grid_configs({**values, **rest, **flags, "name": name}, group_grid, always_sweep=True)
        except BavqError as e:
            raise BavqError(f"group '{group}' of {source}: {e}") from None
        configs += cfgs
    return configs


def run_sweep(configs: list, shard: tuple[int, int] | None = None, grid_name: str = "", jobs: int = 1) -> int:
    """Run each config of the grid (or of its ``shard``, see ``shard_configs``) in turn: skip finished
    runs, resume interrupted ones, keep going after a failed run. An existing run with other settings
    (epochs included) is reported FAILED and left alone. Writes the grid's manifest first (for
    ``grid_summary``). ``jobs`` > 1 runs that many at once on the same device (``_run_jobs``). Prints a
    summary table; returns the exit status (0 if every run finished)."""
    write_grid_manifest(configs, grid_name)
    configs = shard_configs(configs, shard)
    if shard is not None:
        print(f"[bavq] part {shard[0]} of {shard[1]} of the grid: {len(configs)} runs", flush=True)
    if jobs > 1 and len(configs) > 1:
        return _run_jobs(configs, grid_name, min(jobs, len(configs)))
    rows, status = [], 0
    for i, cfg in enumerate(configs, 1):
        print(f"\n[bavq] sweep run {i}/{len(configs)}: {cfg.resolved_name()}", flush=True)
        row = _sweep_row(cfg, grid_name)
        status |= row[-1] == "FAILED"
        rows.append(row)
    print("\n" + summary_table(rows))
    return status


def _sweep_row(cfg: Config, grid_name: str) -> tuple:
    """One run of a sweep as its row of the summary table; a failure is reported, kept for
    ``grid_summary``, and does not stop the grid."""
    grid_failure_path(cfg.out_dir, grid_name, cfg.resolved_name()).unlink(missing_ok=True)   # an earlier failure
    try:
        cfg, final, state = _sweep_member(cfg)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as e:   # BavqError, CUDA out of memory, ...: report it and go on with the grid
        msg = str(e) if isinstance(e, BavqError) else f"{type(e).__name__}: {e}"
        print(f"error: {msg}", file=sys.stderr)
        final, state = {}, "FAILED"
        _mark_failed(cfg, grid_name, msg)
    return _summary_row(cfg, final, state)


def _summary_row(cfg: Config, final: dict, state: str) -> tuple:
    """A run's row of ``summary_table``: (name, quantizer, K, seed, final metrics, state)."""
    return cfg.resolved_name(), cfg.quantizer, cfg.codebook_size, cfg.seed, final, state


# ---------------------------------------------------------------------------- several runs at once on one device

def job_log_path(out_dir: str | os.PathLike, grid_name: str, job: int) -> Path:
    """Where job ``job`` (1-based) of ``--jobs`` writes what its runs print."""
    return _grid_file(out_dir, grid_name, f".job{job}.log")


def _run_jobs(configs: list, grid_name: str, jobs: int) -> int:
    """``--jobs N``: N worker processes (spawned) take the grid's runs one at a time from a shared counter,
    in grid order, so a worker that finishes early takes the next run (no static split). Each worker has
    1/N of the CPU threads and its own log file (``job_log_path``); the runs themselves are ordinary runs
    (run directory claims, resume, checkpoints), so a grid run with N jobs and one run one at a time write
    the same files. The parent prints each run's start and end and the grid's table from the run
    directories. Ctrl-C reaches every worker (one process group): each saves its interrupted run. Runs that
    finished with the same settings are skipped here first: a finished grid starts no worker."""
    import multiprocessing as mp
    import queue
    rows, todo = {}, []
    for i, cfg in enumerate(configs):               # finished runs are skipped here, without starting a worker
        final = _finished_as_asked(cfg)
        if final is None:
            todo.append(i)
        else:
            grid_failure_path(cfg.out_dir, grid_name, cfg.resolved_name()).unlink(missing_ok=True)
            rows[i] = _plain_row(_summary_row(cfg, final, "skipped (finished)"))
            print(f"[bavq] {cfg.resolved_name()} skipped (finished)", flush=True)
    jobs = min(jobs, len(todo))
    out_dir, alive, interrupted = configs[0].out_dir, jobs, False
    workers = []
    if jobs:
        ctx = mp.get_context("spawn")                   # fresh interpreters: no forked CUDA or thread state
        counter, events = ctx.Value("i", 0), ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // jobs)
        print(f"[bavq] {len(todo)} runs, {jobs} at a time on one device ({threads} CPU thread"
              f"{'s' if threads > 1 else ''} each); their output: {job_log_path(out_dir, grid_name, 1)} ... "
              f"{job_log_path(out_dir, grid_name, jobs).name}", flush=True)
        workers = [ctx.Process(target=_job_worker, args=(configs, todo, grid_name, j, counter, events, threads),
                               daemon=False) for j in range(1, jobs + 1)]
    for w in workers:
        w.start()
    try:
        while alive:
            try:
                kind, job, payload = events.get(timeout=1.0)
            except KeyboardInterrupt:                     # the workers got it too: wait for their checkpoints
                interrupted = True
                continue
            except queue.Empty:                           # a worker that died (killed, out of memory, or could
                if any(w.is_alive() for w in workers):    # not start) sends no "exit": stop waiting when none
                    continue                              # is left (its runs are reported FAILED below)
                break
            if kind == "start":
                print(f"[bavq] job {job}: sweep run {payload + 1}/{len(configs)}: {configs[payload].resolved_name()}",
                      flush=True)
            elif kind == "row":
                i, row = payload
                rows[i] = row
                print(f"[bavq] job {job}: {row[0]} {row[-1]}", flush=True)
            elif kind == "interrupted":
                interrupted = True
            else:                                         # "exit"
                alive -= 1
    finally:
        for w in workers:
            w.join()
    if interrupted:
        raise TrainingInterrupted("The grid was interrupted; each run that was training saved a checkpoint "
                                  f"(see {job_log_path(out_dir, grid_name, 1).name} ... in '{out_dir}'). Run the same "
                                  "command again to go on: finished runs are skipped and interrupted ones resume.")
    missing = [i for i in range(len(configs)) if i not in rows]
    for i in missing:                                    # a worker that died (killed, out of memory)
        rows[i] = _summary_row(configs[i], {}, "FAILED (its job ended)")
    table = [rows[i] for i in range(len(configs))]
    print("\n" + summary_table(table))
    return int(any(r[-1].startswith("FAILED") for r in table))


def _job_worker(configs: list, todo: list, grid_name: str, job: int, counter, events, threads: int) -> None:
    """One ``--jobs`` worker: take the next run of ``todo`` (indices into ``configs``) from ``counter`` until
    none is left."""
    import torch
    torch.set_num_threads(threads)
    log = open(job_log_path(configs[0].out_dir, grid_name, job), "a", buffering=1)
    sys.stdout = sys.stderr = log
    try:
        while True:
            with counter.get_lock():
                n = counter.value
                counter.value += 1
            if n >= len(todo):
                break
            i = todo[n]
            events.put(("start", job, i))
            print(f"\n[bavq] job {job}: sweep run {i + 1}/{len(configs)}: {configs[i].resolved_name()}", flush=True)
            row = _sweep_row(configs[i], grid_name)
            events.put(("row", job, (i, _plain_row(row))))
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        print(f"\n{e}", flush=True)
        events.put(("interrupted", job, None))
    finally:
        events.put(("exit", job, None))
        log.close()


def _plain_row(row: tuple) -> tuple:
    """A summary-table row with only what the table shows (picklable, no tensors)."""
    *head, final, state = row
    keep = {k: final[k] for k in ("epoch", "psnr", "perplexity", "usage_rate") if k in final}
    return (*head, keep, state)


def _grid_file(out_dir: str | os.PathLike, name: str, suffix: str) -> Path:
    """<out_dir>/.grid_<name><suffix>: a grid's own files, beside its runs' directories."""
    return Path(out_dir) / f".grid_{name or 'grid'}{suffix}"


def grid_manifest_path(out_dir: str | os.PathLike, name: str) -> Path:
    return _grid_file(out_dir, name, ".json")


def grid_failure_path(out_dir: str | os.PathLike, grid_name: str, run_name: str) -> Path:
    """Where a failed grid run's error is kept for ``grid_summary`` (next to the manifest, never in the
    run directory, which a refused run must leave untouched)."""
    return _grid_file(out_dir, grid_name, ".failed") / f"{run_name}.txt"


def _mark_failed(cfg: Config, grid_name: str, msg: str) -> None:
    path = grid_failure_path(cfg.out_dir, grid_name, cfg.resolved_name())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, msg + "\n")
    except (OSError, BavqError):
        pass


def _stored_differences(cfg: Config) -> list:
    """How the settings stored in ``cfg``'s run directory differ from ``cfg`` (epochs included); [] when they
    agree or nothing is stored."""
    import yaml
    stored = run_dir_of(cfg) / "config.yaml"
    if not stored.is_file():
        return []
    old = yaml.safe_load(stored.read_text()) or {}
    diff = config_differences(old, cfg)
    if old.get("epochs", cfg.epochs) != cfg.epochs:
        diff.append(f"epochs: {old.get('epochs')!r} -> {cfg.epochs!r}")
    return diff


def _finished_as_asked(cfg: Config) -> dict | None:
    """The final metrics of ``cfg``'s run if it finished with these settings (what ``_sweep_member`` skips),
    else None (not finished, other settings, or --overwrite: a worker handles it)."""
    run_dir = run_dir_of(cfg)
    final_path = run_dir / "final_metrics.json"
    if cfg.overwrite or not ((run_dir / "config.yaml").is_file() and final_path.is_file()) or _stored_differences(cfg):
        return None
    return json.loads(final_path.read_text())


def _sweep_member(cfg: Config) -> tuple[Config, dict, str]:
    """Run (or skip, or resume) one run of a sweep: (its config, final metrics, what happened)."""
    run_dir = run_dir_of(cfg)
    if not cfg.overwrite:
        diff = _stored_differences(cfg)
        if diff:
            raise BavqError(f"'{run_dir}' already holds a run with other settings ({'; '.join(diff)}). "
                            "Nothing was changed. Use another --name for this sweep. A run that was resumed with a "
                            f"new --lr, --grad_clip or --epochs continues with: python train.py --resume {run_dir}. "
                            "--overwrite would retrain every run of the sweep from scratch.")
    final_path = run_dir / "final_metrics.json"
    if final_path.is_file() and not cfg.overwrite:
        print(f"[bavq] {run_dir} already finished; skipped.")
        return cfg, json.loads(final_path.read_text()), "skipped (finished)"
    if not (run_dir.is_dir() and not cfg.overwrite and run_files(run_dir)):
        return cfg, train(cfg), "finished"
    if any(run_dir.glob("checkpoint_*.pt")):
        # resume from the latest checkpoint; a corrupt one is an error, never a restart
        keep = {k: getattr(cfg, k) for k in ("device", "progress", "wandb", "num_workers", "data_dir")}
        cfg = resume_config(run_dir, keep)
        return cfg, train(cfg), "resumed"
    print(f"[bavq] {run_dir} holds an unfinished run without a checkpoint; starting it again.")
    cfg = dataclasses.replace(cfg, overwrite=True)
    return cfg, train(cfg), "restarted"


def parse_shard(text: str | None, env=None) -> tuple[int, int] | None:
    """``--shard I/N`` (1 <= I <= N) -> (I, N). Without it, a SLURM array task's own part: I = task id -
    first task id + 1 of N = SLURM_ARRAY_TASK_COUNT (so --array=0-7 and --array=1-8 both work). None: all."""
    env = os.environ if env is None else env
    if not text:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return None
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")) + 1
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
        source = (f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']}, SLURM_ARRAY_TASK_MIN="
                  f"{env.get('SLURM_ARRAY_TASK_MIN', '0')}, SLURM_ARRAY_TASK_COUNT={n}")
    else:
        source = f"--shard {text}"
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise BavqError(f"--shard takes I/N, the I-th of N parts of the grid (e.g. --shard 2/4); got '{text}'.") from None
    if n < 1:
        raise BavqError(f"{source} splits the grid into {n} parts; give at least 1 part (I/N with N >= 1, e.g. "
                        "--shard 1/4 for the first of four).")
    if not 1 <= i <= n:
        raise BavqError(f"{source} asks for part {i} of {n}; the part must be between 1 and {n} (parts count "
                        f"from 1: --shard 1/{n} is the first).")
    return i, n


def shard_configs(configs: list, shard: tuple[int, int] | None) -> list:
    """The I-th of N disjoint parts of a grid: runs I, I+N, I+2N, ... (1-based) of its fixed order, so
    that each part gets a mix of quantizers, sizes and seeds. None: the whole grid."""
    if shard is None:
        return list(configs)
    i, n = shard
    return [c for j, c in enumerate(configs) if j % n == i - 1]


def write_grid_manifest(configs: list, name: str) -> Path:
    """Record every run of a grid (all shards write the same file) so that ``grid_summary`` can tell
    missing runs from finished ones. A grid of the same name that was run before with other runs (other seeds, other
    groups of a config file: ``--seed 3 4``, ``--groups``) is extended: the record holds the runs of both. A run name
    recorded with other settings is an error (one name, one run)."""
    path = grid_manifest_path(configs[0].out_dir, name)
    runs = [{"name": c.resolved_name(), "quantizer": c.quantizer, "codebook_size": c.codebook_size, "seed": c.seed}
            for c in configs]
    if path.is_file() and not configs[0].overwrite:
        try:
            before = json.loads(path.read_text()).get("runs", [])
        except (ValueError, AttributeError):
            before = []
        old = {r["name"]: r for r in before if isinstance(r, dict) and "name" in r}
        clash = [r["name"] for r in runs if r["name"] in old and old[r["name"]] != r]
        if clash:
            raise BavqError(f"'{path}' records the run '{clash[0]}' of the grid '{name}' with other settings. Nothing "
                            f"was changed. To make this the grid '{name}', delete '{path}' (its finished runs with the "
                            "same settings are kept and skipped), or use another --name. --overwrite would retrain "
                            "every run of the grid from scratch.")
        runs = list(old.values()) + [r for r in runs if r["name"] not in old]
    text = json.dumps({"name": name, "runs": runs}, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_text(path, text)
    except WriteError as e:
        raise e.then("run the same command again (runs that finished are skipped)") from None
    return path


def _run_status(run_dir: Path, failure: Path | None = None) -> tuple[dict, str]:
    """(final metrics or {}, state) of a grid's run directory, from its files alone (and the grid's
    record of its failure, ``failure``)."""
    final = run_dir / "final_metrics.json"
    if final.is_file():
        return json.loads(final.read_text()), "finished"
    claim = RunClaim(run_dir)
    holder = claim._read() if run_dir.is_dir() else None
    if holder is not None and not claim._stale(holder):
        return {}, f"running (pid {holder.get('pid')} on {holder.get('host')})"
    if failure is not None and failure.is_file():
        return {}, "FAILED: " + (failure.read_text().strip().splitlines() or [""])[0][:120]
    if not run_dir.is_dir():
        return {}, "missing"
    done = [e for e in (checkpoint_epoch_number(p) for p in run_dir.glob("checkpoint_*.pt")) if e is not None]
    return {}, f"stopped after epoch {max(done)} (resumable)" if done else "stopped before its first checkpoint"


def grid_summary(out_dir: str | os.PathLike, name: str = "") -> tuple[str, int]:
    """The table of a grid from its run directories, at any time: (text, number of runs not finished).
    Needs the grid's manifest (written when any part of the grid starts)."""
    path = grid_manifest_path(out_dir, name)
    if not path.is_file():
        known = sorted(p.name[len(".grid_"):-len(".json")] for p in Path(out_dir).glob(".grid_*.json"))
        raise BavqError(f"No grid named '{name or 'grid'}' was started in '{out_dir}' (no {path.name}). "
                        + (f"Grids there: {', '.join(known)}." if known else "Start it with several values of "
                           f"{', '.join(SWEEP_KEYS)}, e.g. --quantizer vq_ema ba_vq --name grid."))
    rows, open_runs = [], 0
    for run in json.loads(path.read_text())["runs"]:
        final, state = _run_status(run_dir_at(out_dir, run["name"]), grid_failure_path(out_dir, name, run["name"]))
        rows.append((run["name"], run["quantizer"], run["codebook_size"], run["seed"], final, state))
        open_runs += state != "finished"
    return summary_table(rows), open_runs


def summary_table(rows) -> str:
    """The sweep's table: one row (name, quantizer, K, seed, final metrics, status) per run."""
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
    head = (f"{'run':<32} {'quantizer':<9} {'K':>6} {'seed':>4} {'epochs':>6} {'PSNR':>7} {'perplexity':>10} "
            f"{'usage %':>8}  status")
    lines = [head, "-" * len(head)]
    for name, q, K, seed, final, state in rows:
        usage = final.get("usage_rate")
        lines.append(f"{name:<32} {q:<9} {K:>6} {seed:>4} {f(final.get('epoch'), 'd'):>6} {f(final.get('psnr'), '.2f'):>7} "
                     f"{f(final.get('perplexity'), '.1f'):>10} {f(usage * 100 if usage is not None else None, '.1f'):>8}  {state}")
    return "\n".join(lines)
