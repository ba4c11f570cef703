"""The equal-rate frontier of the reduced protocol (docs/results.md) as Markdown tables: for every group of finished runs that differ only in
the seed (run name without its `_s<seed>` ending), the validation PSNR and the rate of the codes, mean ± sample
standard deviation over the seeds.

    python tools/frontier_table.py experiments/frontier
    python tools/frontier_table.py experiments/frontier experiments/frontier_k512_seeds34    # runs of one name, pooled
    python tools/frontier_table.py experiments/frontier --plot results/frontier_reduced.png   # and the figure
    python tools/frontier_table.py experiments/ecvq_frontier --reference vq_ema_best_vq_ema   # another reference

Rate: H(code marginal) of the validation codes in bits per latent position (log2 of the validation perplexity,
which is 2^H), and in bits per image (the run's bits_per_image: that times its latent positions per image).
Runs without final_metrics.json (unfinished) are left out and counted. Where runs of a group also have
rate_distortion.json (``python evaluate.py RUN --rate_distortion``), a second table gives the R(D) analysis of
its latents (docs/method.md): the run's squared quantization error per position (also over the latents' total
variance, the trace of their covariance, which compares models whose latents differ in scale), and its rate gaps to the R(D)
curve with its own codebook and with the richer k-means alphabet (bits per position at the run's distortion).
A third table sets every group against the reference family's frontier (--reference; default vq_ema_best_vq_ema)
at the group's own rate.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vqvae import BavqError  # noqa: E402
from vqvae_analysis import frontier_report  # noqa: E402  (the tables and the plot live in the library)

if __name__ == "__main__":
    args = sys.argv[1:]
    out, reference = None, None
    for flag in ("--plot", "--reference"):
        if flag in args:
            i = args.index(flag)
            if i + 1 == len(args):
                sys.exit(f"error: {flag} needs a value")
            out, reference = (Path(args[i + 1]), reference) if flag == "--plot" else (out, args[i + 1])
            del args[i:i + 2]
    try:
        print(frontier_report([Path(a) for a in args] or [Path("experiments/frontier")], out, reference))
    except BavqError as e:
        sys.exit(f"error: {e}")
