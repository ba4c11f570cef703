"""Command-line interface: parse arguments, build the Config, call vqvae.train(cfg).

    python train.py --quantizer ba_vq --codebook_size 512 --epochs 100 --name ba_k512
    python train.py --config config_mac.yaml --quantizer vq_ema --no_wandb

Precedence: Config defaults < --config FILE.yaml < command-line flags. Every Config field is a
flag of the same name; a boolean field `x` has `--x` and `--no_x`.
"""
from __future__ import annotations

import argparse
import sys

import vqvae


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a VQ-VAE on CIFAR-10 with a VQ-EMA or Blahut-Arimoto quantizer.",
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
        if name == "quantizer":
            kwargs["choices"] = list(vqvae.QUANTIZERS)
        elif name == "dataset":
            kwargs["choices"] = list(vqvae.DATASETS)
        elif name == "device":
            kwargs["choices"] = ["auto", "cpu", "cuda", "mps"]
        p.add_argument(f"--{name}", **kwargs)
    return p


def config_from_args(argv=None) -> vqvae.Config:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    values = vqvae.load_yaml_config(config_path) if config_path else {}
    cfg = vqvae.make_config(values, source=f"config file '{config_path}'" if config_path else "defaults")
    merged = {**vqvae.dataclasses.asdict(cfg), **args}
    return vqvae.make_config(merged, source="command-line flags").validate()


def main(argv=None) -> int:
    try:
        cfg = config_from_args(argv)
        vqvae.train(cfg)
    except vqvae.BavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
