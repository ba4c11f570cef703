"""The equal-rate frontier of issue 23 as a Markdown table: for every group of finished runs that differ only in
the seed (run name without its `_s<seed>` ending), the validation PSNR and the rate of the codes, mean ± sample
standard deviation over the seeds.

    python tools/frontier_table.py experiments/frontier
    python tools/frontier_table.py experiments/frontier experiments/frontier_k512_seeds34    # runs of one name, pooled
    python tools/frontier_table.py experiments/frontier --plot results/frontier_reduced.png   # and the figure

Rate: H(code marginal) of the validation codes in bits per latent position (log2 of the validation perplexity,
which is 2^H), and in bits per image (the run's bits_per_image: that times its latent positions per image).
Runs without final_metrics.json (unfinished) are left out and counted. Where runs of a group also have
rate_distortion.json (``python evaluate.py RUN --rate_distortion``), a second table gives the R(D) analysis of
its latents (docs/method.md): the run's squared quantization error per position (also over the latents' total
variance, the trace of their covariance, which compares models whose latents differ in scale), and its rate gaps to the R(D)
curve with its own codebook and with the richer k-means alphabet (bits per position at the run's distortion).
A third table sets every group against the vq_ema_best frontier at the group's own rate (``equal_rate``).
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


def family(key: str) -> str:
    """The line of the plot a group belongs to: its key without _k<K>, and without what else sets its rate in
    tools/frontier.sh: FSQ's levels (fsq_8x5x5_fsq -> fsq_fsq) and BA-VQ's beta range (ba_vq_best_beta1000_ba_vq
    -> ba_vq_best_beta_ba_vq)."""
    fam = key.rsplit("_k", 1)[0]
    return re.sub(r"_beta\d+", "_beta", re.sub(r"^fsq_\d+(?:x\d+)*_", "fsq_", fam))


def point(key: str, g: dict) -> str:
    """What sets the rate of a group within its family (K, FSQ's levels or BA-VQ's final beta)."""
    levels, beta = re.match(r"^fsq_(\d+(?:x\d+)*)_", key), re.search(r"_beta(\d+)", key)
    return levels.group(1) if levels else f"beta {beta.group(1)}" if beta else str(g["K"])


def in_order(found: dict) -> list:
    """The groups as (key, group), by family and then K (then name: the beta ranges share K)."""
    return sorted(found.items(), key=lambda kv: (family(kv[0]), kv[1]["K"], kv[0]))


def mean_sd(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def per_image(run: dict, positions: int = 64) -> float:
    """Bits per image of a run: its own ``bits_per_image`` (rate x latent positions per image), or, for runs that
    predate that metric, the rate x ``positions`` (8 x 8 for 32 x 32 images)."""
    return run.get("bits_per_image", math.log2(run["perplexity"]) * positions)


def share_of_variance(rds: list) -> str:
    """Mean ± sd of distortion / total latent variance over the runs whose latents vary; an encoder collapsed to
    one output has none (the ratio is infinite), and the cell says how many runs it left out."""
    variances = [(rd["run"]["distortion"], sum(rd["covariance_eigenvalues"])) for rd in rds]
    shares = [distortion / variance for distortion, variance in variances if variance > 0]
    if len(shares) == len(rds):
        return mean_sd(shares)
    return (mean_sd(shares) + " " if shares else "") + f"({len(rds) - len(shares)} of {len(rds)} without latent variance)"


def table(found: dict, unfinished: int) -> str:
    """The frontier table (and the R(D) table) of ``groups``' result."""
    lines = ["| runs (seeds) | quantizer | K | PSNR dB | perplexity | bits / position | bits / image |",
             "|---|---|---|---|---|---|---|"]
    for key, g in in_order(found):
        runs = g["runs"]
        bits = [math.log2(r["perplexity"]) for r in runs]
        lines.append(f"| `{key}` ({len(runs)}) | {g['quantizer']} | {g['K']} | {mean_sd([r['psnr'] for r in runs])} | "
                     f"{mean_sd([r['perplexity'] for r in runs])} | {mean_sd(bits)} | "
                     f"{mean_sd([per_image(r) for r in runs])} |")
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
            f"{share_of_variance(rds)} | "
            f"{mean_sd([rd['gaps']['codebook']['rate_bits'] for rd in rds])} | "
            f"{mean_sd([rd['gaps']['kmeans']['rate_bits'] for rd in rds])} | "
            f"{mean_sd([rd['gaps']['kmeans']['distortion'] for rd in rds])} |")
    text = "\n".join(lines) + f"\n\n{sum(len(g['runs']) for g in found.values())} finished runs, {unfinished} unfinished."
    if len(rd_lines) > 2:
        text += ("\n\nR(D) of the latents (the runs of each group that have rate_distortion.json; their number in "
                 "brackets):\n\n" + "\n".join(rd_lines))
    return text


def summary(g: dict) -> tuple:
    """(mean bits per position, mean PSNR, standard error of the PSNR mean; NaN for one seed) of a group."""
    psnr = [r["psnr"] for r in g["runs"]]
    se = statistics.stdev(psnr) / math.sqrt(len(psnr)) if len(psnr) > 1 else float("nan")
    return statistics.mean(math.log2(r["perplexity"]) for r in g["runs"]), statistics.mean(psnr), se


def frontier(found: dict, fam: str) -> list:
    """The measured points of a family as ``summary`` tuples, by rate."""
    return sorted(summary(g) for key, g in found.items() if family(key) == fam)


def at_rate(points: list, bits: float):
    """(PSNR, its standard error) of a frontier at ``bits`` by linear interpolation between the two measured
    points around it (weights 1 - t and t, so SE = sqrt((1 - t)^2 SE_a^2 + t^2 SE_b^2)); None outside its range."""
    for (b0, p0, s0), (b1, p1, s1) in zip(points, points[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0) if b1 > b0 else 0.0
            return p0 + t * (p1 - p0), math.hypot((1 - t) * s0, t * s1)
    return None


def equal_rate(found: dict, reference: str) -> str:
    """Every group's PSNR against the reference family's frontier at the group's own rate: the difference of the
    means, with the standard error of that difference (the group's and the interpolated reference's, independent
    seeds). Groups of the reference family and groups outside its range of rates are left out."""
    ref = frontier(found, reference)
    lines = [f"| runs (seeds) | bits / position | PSNR dB | `{reference}` at that rate | difference ± SE |",
             "|---|---|---|---|---|"]
    for key, g in in_order(found):
        if family(key) == reference:
            continue
        bits, psnr, se = summary(g)
        there = at_rate(ref, bits)
        if there is None:
            continue
        lines.append(f"| `{key}` ({len(g['runs'])}) | {bits:.2f} | {psnr:.2f} | {there[0]:.2f} | "
                     f"{psnr - there[0]:+.2f} ± {math.hypot(se, there[1]):.2f} |")
    return "\n".join(lines)


def plot(found: dict, roots: list, path: Path) -> None:
    """PSNR against bits per latent position, one line per family of runs (``family``), a point per K, FSQ level
    set or beta range (``point``), in order of rate, at the mean over seeds with the sample standard deviation as error bars in both directions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = {}
    for key, g in in_order(found):
        families.setdefault(family(key), []).append((point(key, g), g))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    for fam, points in families.items():
        bits = [[math.log2(r["perplexity"]) for r in g["runs"]] for _, g in points]
        psnr = [[r["psnr"] for r in g["runs"]] for _, g in points]
        by_rate = sorted(range(len(points)), key=lambda i: statistics.mean(bits[i]))   # the line runs along the rate
        ax.errorbar([statistics.mean(bits[i]) for i in by_rate], [statistics.mean(psnr[i]) for i in by_rate],
                    xerr=[sd(bits[i]) for i in by_rate], yerr=[sd(psnr[i]) for i in by_rate], marker="o", capsize=3,
                    label=f"{fam} ({', '.join(points[i][0] for i in by_rate)})")
    ax.set_xlabel("rate: H(code marginal), bits per latent position")
    ratios = {round(per_image(r) / math.log2(r["perplexity"]), 2) for g in found.values() for r in g["runs"]
              if r["perplexity"] > 1.01}                        # float32 metrics: the ratio is 64 to ~1e-6
    if len(ratios) == 1:                                      # one latent grid for every run: a bits-per-image axis
        n = ratios.pop()
        top = ax.secondary_xaxis("top", functions=(lambda b: b * n, lambda i: i / n))
        top.set_xlabel(f"bits per image ({n:g} latent positions)")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title(f"Equal-rate frontier: {sum(len(g['runs']) for g in found.values())} runs in "
                 f"{', '.join(Path(r).name for r in roots)}", fontsize=9)
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
    reference = "vq_ema_best_vq_ema"
    if len(frontier(found, reference)) > 1:
        print(f"\nAt equal rate: each group against the `{reference}` frontier, linearly interpolated in bits per "
              f"position between its measured points (groups outside its range of rates left out):\n")
        print(equal_rate(found, reference))
    if out is not None:
        plot(found, roots, out)
        print(f"\nplot written to {out}")
