"""The equal-rate frontier of issue 23 as a Markdown table: for every group of finished runs that differ only in
the seed (run name without its `_s<seed>` ending), the validation PSNR and the rate of the codes, mean ± sample
standard deviation over the seeds.

    python tools/frontier_table.py experiments/frontier
    python tools/frontier_table.py experiments/frontier experiments/frontier_k512_seeds34    # runs of one name, pooled
    python tools/frontier_table.py experiments/frontier --plot results/frontier_reduced.png   # and the figure

Rate: H(code marginal) of the validation codes in bits per latent position (log2 of the validation perplexity,
which is 2^H), and that times the latent positions per image (8 x 8 = 64 for 32 x 32 images) in bits per image.
Runs without final_metrics.json (unfinished) are left out and counted. Where runs of a group also have
rate_distortion.json (``python evaluate.py RUN --rate_distortion``), a second table gives the R(D) analysis of
its latents (docs/method.md): the run's squared quantization error per position (also over the latents' total
variance, the trace of their covariance, which compares models whose latents differ in scale), and its rate gaps to the R(D)
curve with its own codebook and with the richer k-means alphabet (bits per position at the run's distortion).
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

import yaml


def groups(roots: list) -> tuple[dict, int]:
    """{run name without _s<seed>: {quantizer, K, runs: [final metrics + "rd"]}} over every folder of ``roots``,
    and how many run directories are unfinished."""
    found, unfinished = {}, 0
    for run in sorted(p for root in roots for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        final = run / "final_metrics.json"
        if not final.is_file():
            unfinished += 1
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        m = json.loads(final.read_text())
        rd = run / "rate_distortion.json"
        m = {**m, "rd": json.loads(rd.read_text()) if rd.is_file() else None}
        key = re.sub(r"_s\d+$", "", run.name)
        found.setdefault(key, {"quantizer": cfg["quantizer"], "K": cfg["codebook_size"], "runs": []})["runs"].append(m)
    return found, unfinished


def in_order(found: dict) -> list:
    """The groups as (key, group), by family (the key without _k<K>) and then K."""
    return sorted(found.items(), key=lambda kv: (kv[0].rsplit("_k", 1)[0], kv[1]["K"]))


def mean_sd(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(found: dict, unfinished: int, positions: int = 64) -> str:
    """The frontier table (and the R(D) table) of ``groups``' result."""
    lines = ["| runs (seeds) | quantizer | K | PSNR dB | perplexity | bits / position | bits / image |",
             "|---|---|---|---|---|---|---|"]
    for key, g in in_order(found):
        runs = g["runs"]
        bits = [math.log2(r["perplexity"]) for r in runs]
        lines.append(f"| `{key}` ({len(runs)}) | {g['quantizer']} | {g['K']} | {mean_sd([r['psnr'] for r in runs])} | "
                     f"{mean_sd([r['perplexity'] for r in runs])} | {mean_sd(bits)} | "
                     f"{mean_sd([b * positions for b in bits])} |")
    rd_lines = ["| runs (seeds) | K | R(D) positions | rate bits | distortion | distortion / latent variance | "
                "own-codebook rate gap | k-means rate gap | k-means distortion gap |", "|---|---|---|---|---|---|---|---|---|"]
    for key, g in in_order(found):
        rds = [r["rd"] for r in g["runs"] if r["rd"]]
        if not rds or any(rd["gaps"]["codebook"]["rate_bits"] is None or rd["gaps"].get("kmeans") is None
                          or rd["gaps"]["kmeans"]["rate_bits"] is None for rd in rds):
            continue
        rd_lines.append(
            f"| `{key}` ({len(rds)}) | {g['K']} | {rds[0]['positions']} | {mean_sd([rd['run_measured']['rate_bits'] for rd in rds])} | "
            f"{mean_sd([rd['run_measured']['distortion'] for rd in rds])} | "
            f"{mean_sd([rd['run']['distortion'] / sum(rd['covariance_eigenvalues']) for rd in rds])} | "
            f"{mean_sd([rd['gaps']['codebook']['rate_bits'] for rd in rds])} | "
            f"{mean_sd([rd['gaps']['kmeans']['rate_bits'] for rd in rds])} | "
            f"{mean_sd([rd['gaps']['kmeans']['distortion'] for rd in rds])} |")
    text = "\n".join(lines) + f"\n\n{sum(len(g['runs']) for g in found.values())} finished runs, {unfinished} unfinished."
    if len(rd_lines) > 2:
        text += ("\n\nR(D) of the latents (the runs of each group that have rate_distortion.json; their number in "
                 "brackets):\n\n" + "\n".join(rd_lines))
    return text


def plot(found: dict, roots: list, path: Path) -> None:
    """PSNR against bits per latent position, one line per family of runs (the group name without _k<K>), a point
    per K at the mean over seeds with the sample standard deviation as error bars in both directions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = {}
    for key, g in in_order(found):
        families.setdefault(key.rsplit("_k", 1)[0], []).append(g)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family, gs in families.items():
        bits = [[math.log2(r["perplexity"]) for r in g["runs"]] for g in gs]
        psnr = [[r["psnr"] for r in g["runs"]] for g in gs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        ax.errorbar([statistics.mean(b) for b in bits], [statistics.mean(p) for p in psnr],
                    xerr=[sd(b) for b in bits], yerr=[sd(p) for p in psnr], marker="o", capsize=3,
                    label=f"{family} ({'/'.join(str(g['K']) for g in gs)})")
    ax.set_xlabel("rate: H(code marginal), bits per latent position")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title(f"Equal-rate frontier, reduced protocol ({', '.join(str(r) for r in roots)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--plot" in args:
        i = args.index("--plot")
        out = Path(args[i + 1])
        del args[i:i + 2]
    roots = [Path(a) for a in args] or [Path("experiments/frontier")]
    found, unfinished = groups(roots)
    print(table(found, unfinished))
    if out is not None:
        plot(found, roots, out)
        print(f"\nplot written to {out}")
