"""Command-line interface: parse arguments, build the Config, call vqvae_experiment.train(cfg).

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
import os
import sys
import typing

import vqvae
import vqvae_experiment
import vqvae_grid


class _Parser(argparse.ArgumentParser):
    """Unknown or malformed flags: one line and a pointer to --help (not the whole usage), exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message}. python train.py --help lists every option.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="Train a VQ-VAE on CIFAR-10 with one of the quantizers in vqvae.QUANTIZERS. --resume RUN_DIR "
                    "(or a checkpoint file) continues a run from its latest checkpoint with its own settings; only "
                    "settings that change how it runs (device, epochs, logging, evaluation, speed options, the "
                    "explosion guard) and, to recover from a divergence, --lr and --grad_clip may be given with it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML file of config values (overridden by flags)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the I-th of N disjoint parts of a grid (1 <= I <= N), e.g. one per GPU or machine; "
                        "default under a SLURM array: the task's own part (SLURM_ARRAY_TASK_ID, _MIN, _COUNT)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N runs of a grid at once on the same device (each with 1/N of the CPU threads; output "
                        "in <out_dir>/.grid_<name>.job<i>.log), for grids of small models that leave the device idle")
    p.add_argument("--groups", nargs="+", default=None, metavar="GROUP",
                   help="with a --config file of named groups (its 'groups:' mapping, e.g. configs/frontier_reduced.yaml): "
                        "run only these groups")
    p.add_argument("--summarize", action="store_true",
                   help="print the table of the grid <out_dir>/<name>_* from its run directories (finished, running, "
                        "stopped, failed, missing runs) and exit; runs nothing")
    defaults = vqvae.Config()
    choices = vqvae.field_choices()
    comments = {k: v.replace('%', '%%') for k, v in vqvae.config_comments().items()}
    for name, typ in vqvae.config_fields().items():
        default = getattr(defaults, name)
        if typ is bool:
            g = p.add_mutually_exclusive_group()
            g.add_argument(f"--{name}", dest=name, action="store_const", const=True, default=argparse.SUPPRESS,
                           help=f"{comments.get(name, '')} (default: {default})")
            g.add_argument(f"--no_{name}", dest=name, action="store_const", const=False,
                           default=argparse.SUPPRESS, help=f"turn {name} off")
            continue
        kwargs = {"type": typ, "default": argparse.SUPPRESS, "help": f"{comments.get(name, '')} (default: {default!r})"}
        if typing.get_origin(typ) is list:   # --fsq_levels 8 5 5 5, --eval_metrics psnr ssim fid
            kwargs.update(type=typing.get_args(typ)[0], nargs="+")
        if name in vqvae_grid.SWEEP_KEYS:
            kwargs["nargs"] = "+"
            kwargs["help"] += "; several values run a grid"
        if name in choices:
            kwargs["choices"] = list(choices[name])
        elif name == "device":
            kwargs["help"] += f"; one of {', '.join(vqvae.DEVICES)}, or cuda:N"
        p.add_argument(f"--{name}", **kwargs)
    return p


def configs_from_args(argv=None) -> tuple[list[vqvae.Config], bool]:
    """The run configs the command line asks for, and whether they form a sweep (grid)."""
    args = vars(build_parser().parse_args(argv))
    for key in ("shard", "summarize", "jobs"):
        args.pop(key)
    config_path, chosen = args.pop("config"), args.pop("groups")
    values = vqvae.load_yaml_config(config_path) if config_path else {}
    source = f"config file '{config_path}'" if config_path else "defaults"
    groups = values.pop("groups", None)
    if chosen is not None:
        if not isinstance(groups, dict):
            raise vqvae.BavqError(f"--groups chooses among the named groups of a config file, but {source} has none "
                                  "('groups:'); drop --groups, or give a file of groups such as "
                                  "configs/frontier_reduced.yaml with --config.")
        unknown = [g for g in chosen if g not in groups]
        if unknown:
            raise vqvae.BavqError(f"--groups {' '.join(unknown)}: {source} has no such group; its groups are "
                                  f"{', '.join(groups)}. Nothing was run.")
        groups = {g: groups[g] for g in groups if g in chosen}
    # a YAML file may give lists for the sweep keys too
    grid = {k: values.pop(k) for k in vqvae_grid.SWEEP_KEYS if isinstance(values.get(k), list)}
    flag_keys = tuple(k for k in vqvae_grid.SWEEP_KEYS if k in args)
    grid.update({k: args.pop(k) for k in flag_keys})
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    if groups is not None:                               # a grid of named groups (the ladder, a frontier)
        if args.get("resume"):
            raise vqvae.BavqError(f"--resume continues one run, but {source} is a grid of groups. Re-run the grid "
                                  "command instead: it resumes the grid's interrupted runs by itself.")
        return vqvae_grid.group_configs(values, groups, grid, args, source, fixed=flag_keys), True
    if args.get("resume"):
        if any(len(v) > 1 for v in grid.values()):
            raise vqvae.BavqError("--resume continues one run; it cannot be combined with several values of "
                                  f"{', '.join(vqvae_grid.SWEEP_KEYS)}. Re-run the sweep command instead: it resumes "
                                  "interrupted runs of the grid by itself.")
        if values:                                        # --config with --resume: only what a resume may change
            run = vqvae_experiment.resume_config(args["resume"])
            may = vqvae_experiment.RESUME_MAY_CHANGE + vqvae_experiment.RESUME_RECOVERY
            file_cfg = vqvae.make_config({**dataclasses.asdict(run), **values}, source=source)
            clash = vqvae_experiment.config_differences(dataclasses.asdict(run), file_cfg, may)
            if clash:
                shown = ", ".join(k for k in may if k not in ("resume", "out_dir", "name", "overwrite"))
                raise vqvae.BavqError(
                    f"--config {config_path} sets {'; '.join(clash)} (the run's value -> the file's), but a resumed run "
                    f"keeps its own settings; only {shown} may change. Nothing was changed. Drop --config when "
                    "resuming and give the settings that may change as flags, or start a new run under another "
                    "--name with this file.")
        overrides = {**values, **args, **{k: v[0] for k, v in grid.items() if v}}
        return [vqvae_experiment.resume_config(args["resume"], overrides).validate()], False
    vqvae.make_config(values, source=source)              # the file's keys and types, named in any error
    return vqvae_grid.grid_configs({**values, **args}, grid)     # only what was given: defaults and derived values fill the rest


def config_from_args(argv=None) -> vqvae.Config:
    """The single run config of a command line (a grid is an error here)."""
    configs, sweep = configs_from_args(argv)
    if sweep:
        raise vqvae.BavqError("several values were given for a sweep key; use configs_from_args")
    return configs[0]


def main(argv=None) -> int:
    try:
        extra = build_parser().parse_args(argv)
        values = vqvae.load_yaml_config(extra.config) if extra.config else {}
        grid_name = getattr(extra, "name", values.get("name", ""))          # the grid's runs: <name>_<q>_k<K>_s<seed>
        if extra.summarize:
            out_dir = getattr(extra, "out_dir", values.get("out_dir", vqvae.Config.out_dir))
            print(vqvae_grid.grid_summary(out_dir, grid_name)[0])
            return 0
        configs, sweep = configs_from_args(argv)
        shard = vqvae_grid.parse_shard(extra.shard, {} if not sweep and not extra.shard else None)
        if extra.jobs < 1:
            raise vqvae.BavqError(f"--jobs {extra.jobs}: give the number of runs to run at once, 1 or more.")
        if sweep:
            return vqvae_grid.run_sweep(configs, shard, grid_name, jobs=extra.jobs)
        if shard is not None and shard != (1, 1):
            raise vqvae.BavqError(f"--shard {extra.shard} splits a grid, but this command runs one run. Give several "
                                  f"values of {', '.join(vqvae_grid.SWEEP_KEYS)} to run a grid.")
        vqvae_experiment.train(configs[0])
    except vqvae_experiment.TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except vqvae.BavqError as e:
        if os.environ.get("RANK", "0") == "0":     # under torchrun every process stops with the same message:
            print(f"error: {e}", file=sys.stderr)  # process 0 says it once
        return 2
    except KeyboardInterrupt:
        print("\naborted without saving a checkpoint.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
