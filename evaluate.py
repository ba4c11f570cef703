"""Evaluate finished runs: rebuild each model from its run directory, load final_model.pt (or a
checkpoint), compute every validation metric on the whole test set, and write eval_metrics.json,
eval_recon.png and eval_usage.png into the run directory (for a checkpoint: eval_metrics_<checkpoint>.json, ...;
a checkpoint of another run is refused).

    python evaluate.py experiments/ba_vq_k512_s0
    python evaluate.py experiments/ba_vq_k512_s0 --checkpoint checkpoint_epoch50.pt
    python evaluate.py experiments/                 # every run directory below it (a grid), with a table
    python evaluate.py experiments/ba_vq_k512_s0 --eval_metrics psnr ssim lpips fid
    python evaluate.py experiments/ba_vq_k512_s0 --eval_metrics psnr ssim perplexity_sqvae ssim_cvqvae
    python evaluate.py experiments/ba_vq_k512_s0 --rate_distortion      # + R(D) of its latents (docs/method.md)
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import vqvae
import vqvae_analysis
import vqvae_experiment
import vqvae_grid


def run_dirs(path: Path) -> list:
    """``path`` itself if it is a run directory, else every run directory below it (sorted)."""
    if (path / "config.yaml").is_file():
        return [path]
    return sorted(p.parent for p in path.rglob("config.yaml") if (p.parent / "final_model.pt").is_file())


RD_DEFAULTS = {k: v.default for k, v in inspect.signature(vqvae_analysis.latent_rate_distortion).parameters.items()
               if k in ("positions", "alphabet_size")}


def rate_distortion_line(rd: dict) -> str:
    """One line: the run's point and its rate gaps to the R(D) curves (bits per latent position)."""
    run, gaps = rd["run_point"], rd["gaps"]
    parts = [f"{name} {g['rate_bits']:+.3f}" for name, g in gaps.items() if g.get("rate_bits") is not None]
    return (f"[bavq]   R(D): the model at {run['rate_bits']:.3f} bits/position, distortion {run['distortion']:.4g}; "
            f"rate above the curve at that distortion (bits): {', '.join(parts)} -> {rd['written_to']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("path", help="a run directory, or a folder of run directories (a grid)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint of the run (its file name in the run directory, or a "
                                                        "path) instead of final_model.pt")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(vqvae.DEVICES)}, or cuda:N")
    p.add_argument("--data_dir", default=None, help="where the dataset is now, if not where the run found it")
    p.add_argument("--eval_metrics", nargs="+", default=None, choices=list(vqvae.EVAL_METRICS),
                   help="metrics to compute (psnr and ssim always are; lpips and fid need requirements-eval.txt; "
                        "perplexity_sqvae, psnr_cvqvae, ssim_cvqvae are the papers' conventions, docs/metrics.md); "
                        "default: the run's own --eval_metrics")
    p.add_argument("--rate_distortion", action="store_true",
                   help="also the rate-distortion analysis of the model's latents on the test set: R(D) with its own "
                        "codebook, with a richer k-means alphabet and of a Gaussian, and the run's gaps to them "
                        "(rate_distortion.json and .png; docs/method.md)")
    p.add_argument("--rd_positions", type=int, default=RD_DEFAULTS["positions"],
                   help="latent positions drawn at random for the R(D) curves (default %(default)s)")
    p.add_argument("--rd_alphabet", type=int, default=RD_DEFAULTS["alphabet_size"],
                   help="k-means centroids added to the own codebook for the richer alphabet, 0 for none "
                        "(default %(default)s)")
    p.add_argument("--rd_repeats", type=int, default=1,
                   help="disjoint draws of positions; above 1 the gaps' spread over them is reported (default 1)")
    p.add_argument("--rd_seed", type=int, default=0, help="seed of the draws and of k-means (default 0)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag, value, least in (("--rd_positions", args.rd_positions, 1), ("--rd_alphabet", args.rd_alphabet, 0),
                                   ("--rd_repeats", args.rd_repeats, 1)):
            if value < least:
                raise vqvae.BavqError(f"{flag} {value} is not allowed: give an integer >= {least}.")
        rd = (dict(positions=args.rd_positions, alphabet_size=args.rd_alphabet, repeats=args.rd_repeats,
                   seed=args.rd_seed) if args.rate_distortion else None)
        if not vqvae.known_device(args.device):
            raise vqvae.BavqError(f"--device '{args.device}' is unknown: give one of {', '.join(vqvae.DEVICES)}, or "
                                  "cuda:N for the N-th GPU.")
        dirs = run_dirs(Path(args.path))
        if not dirs:
            raise vqvae.BavqError(f"No finished run found at '{args.path}' (a run directory holds config.yaml and "
                                  "final_model.pt). Pass a run directory or a folder of them.")
        if args.checkpoint and len(dirs) > 1:
            raise vqvae.BavqError("--checkpoint names one checkpoint; pass the run directory it belongs to.")
        rows = []
        for d in dirs:
            m = vqvae_experiment.evaluate_run(d, args.checkpoint, args.device, args.data_dir, eval_metrics=args.eval_metrics,
                                   rate_distortion=rd)
            cfg = vqvae.load_yaml_config(d / "config.yaml")               # the run's settings, for the table
            print(f"[bavq] {d}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, perplexity {m['perplexity']:.1f}, "
                  f"usage {m['usage_rate'] * 100:.1f}% -> {m['written_to']}", flush=True)
            if rd is not None:
                print(rate_distortion_line(m["rate_distortion"]), flush=True)
            rows.append((d.name, cfg["quantizer"], cfg["codebook_size"], cfg["seed"], m, "evaluated"))
        if len(rows) > 1:
            print("\n" + vqvae_grid.summary_table(rows))
    except vqvae.BavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
