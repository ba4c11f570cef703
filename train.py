"""Command-line interface: parse arguments, build the Config, call vqvae.train(cfg).

    python train.py --quantizer ba_vq --codebook_size 512 --epochs 100 --name ba_k512
    python train.py --config config_mac.yaml --quantizer vq_ema --no_wandb
    python train.py --resume experiments/ba_k512              # continue from the latest checkpoint
    python train.py --quantizer vq_ema ba_vq --codebook_size 512 2048 --seed 0 1 2 --name grid

Precedence: Config defaults < --config FILE.yaml < command-line flags. Every Config field is a
flag of the same name; a boolean field `x` has `--x` and `--no_x`. Giving several values to
--quantizer, --codebook_size or --seed runs the whole grid, one run after another, each in
<out_dir>/<name>_<quantizer>_k<K>_s<seed> (finished runs are skipped, interrupted ones resumed).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from pathlib import Path

import vqvae

SWEEP_KEYS = ("quantizer", "codebook_size", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a VQ-VAE on CIFAR-10 with a VQ-EMA, VQ, Blahut-Arimoto or FSQ quantizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of config values (overridden by flags)")
    defaults = vqvae.Config()
    for name, typ in vqvae.config_fields().items():
        default = getattr(defaults, name)
        if typ is bool:
            g = p.add_mutually_exclusive_group()
            g.add_argument(f"--{name}", dest=name, action="store_const", const=True, default=argparse.SUPPRESS,
                           help=f"turn {name} on (default: {default})")
            g.add_argument(f"--no_{name}", dest=name, action="store_const", const=False,
                           default=argparse.SUPPRESS, help=f"turn {name} off")
            continue
        kwargs = {"type": typ, "default": argparse.SUPPRESS, "help": f"(default: {default!r})"}
        if typ is list:   # list of ints, e.g. --fsq_levels 8 5 5 5
            kwargs.update(type=int, nargs="+")
        if name in SWEEP_KEYS:
            kwargs["nargs"] = "+"
            kwargs["help"] += "; several values run a grid"
        if name == "quantizer":
            kwargs["choices"] = list(vqvae.QUANTIZERS)
        elif name == "dataset":
            kwargs["choices"] = list(vqvae.DATASETS)
        elif name == "device":
            kwargs["choices"] = ["auto", "cpu", "cuda", "mps"]
        elif name == "init":
            kwargs["choices"] = list(vqvae.CODEBOOK_INITS)
        elif name == "gradient_estimator":
            kwargs["choices"] = list(vqvae.GRADIENT_ESTIMATORS)
        elif name == "ba_impl":
            kwargs["choices"] = list(vqvae.BA_IMPLS)
        p.add_argument(f"--{name}", **kwargs)
    return p


def configs_from_args(argv=None) -> tuple[list[vqvae.Config], bool]:
    """The run configs the command line asks for, and whether they form a sweep (grid)."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    values = vqvae.load_yaml_config(config_path) if config_path else {}
    source = f"config file '{config_path}'" if config_path else "defaults"
    # a YAML file may give lists for the sweep keys too
    grid = {k: values.pop(k) for k in SWEEP_KEYS if isinstance(values.get(k), list)}
    grid.update({k: args.pop(k) for k in SWEEP_KEYS if k in args})
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    for k, v in grid.items():
        if not v:
            raise vqvae.BavqError(f"'{k}' was given an empty list of values; give at least one.")
    if args.get("resume"):
        if any(len(v) > 1 for v in grid.values()):
            raise vqvae.BavqError("--resume continues one run; it cannot be combined with several values of "
                                  f"{', '.join(SWEEP_KEYS)}. Re-run the sweep command instead: it resumes "
                                  "interrupted runs of the grid by itself.")
        overrides = {**values, **args, **{k: v[0] for k, v in grid.items()}}
        return [vqvae.resume_config(args["resume"], overrides).validate()], False
    base = vqvae.make_config(values, source=source)
    merged = {**dataclasses.asdict(base), **args}
    sweep = any(len(v) > 1 for v in grid.values())
    combos = list(itertools.product(*(grid.get(k, [merged[k]]) for k in SWEEP_KEYS)))
    configs = []
    for combo in combos:
        run = {**merged, **dict(zip(SWEEP_KEYS, combo))}
        if sweep:
            prefix = f"{merged['name']}_" if merged["name"] else ""
            run["name"] = f"{prefix}{run['quantizer']}_k{run['codebook_size']}_s{run['seed']}"
        configs.append(vqvae.make_config(run, source="command-line flags").validate())
    return configs, sweep


def config_from_args(argv=None) -> vqvae.Config:
    """The single run config of a command line (a grid is an error here)."""
    configs, sweep = configs_from_args(argv)
    if sweep:
        raise vqvae.BavqError("several values were given for a sweep key; use configs_from_args")
    return configs[0]


def run_sweep(configs: list[vqvae.Config]) -> int:
    """Run each config in turn: skip finished runs, resume interrupted ones, keep going after a
    failed run. An existing run with other settings (epochs included) is reported FAILED and left
    alone. Prints a summary table; returns the exit status (0 if every run finished)."""
    import json
    import yaml
    rows, status = [], 0
    for i, cfg in enumerate(configs, 1):
        run_dir = Path(cfg.out_dir) / cfg.resolved_name()
        print(f"\n[bavq] sweep run {i}/{len(configs)}: {cfg.resolved_name()}", flush=True)
        final_path = run_dir / "final_metrics.json"
        try:
            stored = run_dir / "config.yaml"
            if stored.is_file() and not cfg.overwrite:
                old = yaml.safe_load(stored.read_text()) or {}
                diff = vqvae.config_differences(old, cfg)
                if old.get("epochs", cfg.epochs) != cfg.epochs:
                    diff.append(f"epochs: {old.get('epochs')!r} -> {cfg.epochs!r}")
                if diff:
                    raise vqvae.BavqError(f"'{run_dir}' already holds a run with other settings ({'; '.join(diff)}). "
                                          "Nothing was changed. Use another --name for this sweep, or --overwrite "
                                          "to replace those runs.")
            if final_path.is_file() and not cfg.overwrite:
                final, state = json.loads(final_path.read_text()), "skipped (finished)"
                print(f"[bavq] {run_dir} already finished; skipped.")
            elif run_dir.is_dir() and not cfg.overwrite and vqvae._run_files(run_dir):
                if any(run_dir.glob("checkpoint_*.pt")):
                    # resume from the latest checkpoint; a corrupt one is an error, never a restart
                    keep = {k: getattr(cfg, k) for k in ("device", "progress", "wandb", "num_workers", "data_dir")}
                    cfg = vqvae.resume_config(run_dir, keep)
                    state = "resumed"
                else:
                    print(f"[bavq] {run_dir} holds an unfinished run without a checkpoint; starting it again.")
                    cfg = dataclasses.replace(cfg, overwrite=True)
                    state = "restarted"
                final = vqvae.train(cfg)
            else:
                final, state = vqvae.train(cfg), "done"
        except vqvae.TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise
        except Exception as e:   # BavqError, CUDA out of memory, ...: report it and go on with the grid
            msg = str(e) if isinstance(e, vqvae.BavqError) else f"{type(e).__name__}: {e}"
            print(f"error: {msg}", file=sys.stderr)
            final, state, status = {}, "FAILED", 1
        rows.append((cfg.resolved_name(), cfg.quantizer, cfg.codebook_size, cfg.seed, final, state))
    print("\n" + summary_table(rows))
    return status


def summary_table(rows) -> str:
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


def main(argv=None) -> int:
    try:
        configs, sweep = configs_from_args(argv)
        if sweep:
            return run_sweep(configs)
        vqvae.train(configs[0])
    except vqvae.TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except vqvae.BavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\naborted without saving a checkpoint.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
