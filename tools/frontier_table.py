"""Place finished runs on the equal-rate plane of the reduced protocol (docs/results.md): for every group of runs that
differ only in the seed (run name without its `_s<seed>` ending), the validation PSNR and the rate of the codes, mean ±
sample standard deviation over the seeds; their R(D) analysis; each group against a reference family at its own rate;
and the plot.

    python tools/frontier_table.py experiments/mine results/frontier_reduced.json --rate_distortion --data_dir data
    python tools/frontier_table.py experiments/frontier --plot results/frontier_reduced.png
    python tools/frontier_table.py experiments/ladder experiments/frontier --paired ladder_       # the gap ladder
    python tools/frontier_table.py experiments/frontier --save results/frontier_reduced.json   # a frontier file

ROOTS are folders of run directories, or frontier files (JSON: the runs as --save writes them, e.g. the reference
runs measured here, results/frontier_reduced.json). Rate: H(code marginal) of the validation codes in bits per latent
position (log2 of the validation perplexity; with several codes per position the sum of their entropies, marked †),
and in bits per image. Runs whose evaluation codes depend on their batch are marked ‡ and kept off the equal-rate
comparison and the plot. Unfinished runs are left out and counted. --rate_distortion first runs the R(D) analysis of
every finished run that lacks it (evaluate.py RUN --rate_distortion; --data_dir, --device as there); the second table
gives it: the squared quantization error per position (also over the latents' total variance) and the rate gaps to
the R(D) curve with the run's own codebook and with the richer k-means alphabet (docs/method.md). The third table sets
every group against the reference family's frontier (--reference; default vq_ema_best_vq_ema) at the group's rate.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vqvae import BavqError  # noqa: E402
from vqvae_analysis import frontier_report, frontier_save  # noqa: E402  (the tables and the plot live in the library)
from vqvae_experiment import complete_rate_distortion  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The equal-rate frontier of finished runs (tables, and a plot).")
    p.add_argument("roots", nargs="*", default=["experiments/frontier"],
                   help="folders of run directories, or frontier files (JSON) such as results/frontier_reduced.json")
    p.add_argument("--reference", default=None, help="the family every group is set against (default vq_ema_best_vq_ema)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write the figure there")
    p.add_argument("--paired", default=None, metavar="PREFIX",
                   help="also set each group whose name starts with PREFIX against the one before it, seed by seed "
                        "(a ladder: --paired ladder_)")
    p.add_argument("--rate_distortion", action="store_true", help="first run the R(D) analysis of the runs that lack it")
    p.add_argument("--data_dir", default=None, help="with --rate_distortion: the runs' data folder, if not where they ran")
    p.add_argument("--device", default="auto", help="with --rate_distortion: where to run it")
    p.add_argument("--rd_positions", type=int, default=None, help="with --rate_distortion: as evaluate.py's")
    p.add_argument("--rd_alphabet", type=int, default=None, help="with --rate_distortion: as evaluate.py's")
    p.add_argument("--save", default=None, metavar="JSON", help="write the runs as a frontier file instead of the tables")
    args = p.parse_args(argv)
    try:
        if args.save:
            print(f"{frontier_save(args.roots, Path(args.save))} runs written to {args.save}")
            return 0
        if args.rate_distortion:
            options = {k: v for k, v in (("positions", args.rd_positions), ("alphabet_size", args.rd_alphabet))
                       if v is not None}
            complete_rate_distortion(args.roots, args.data_dir, args.device, options)
        print(frontier_report([Path(a) for a in args.roots], Path(args.plot) if args.plot else None, args.reference,
                              args.paired))
    except BavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
