"""bavq's analysis: what evaluation computes beyond the method's own metrics (vqvae.py).

    rate-distortion   the R(D) curve of a model's latents against its codebook and a richer alphabet
                      (Blahut-Arimoto to a certificate: ``rate_distortion_curve``, ``trace_rate_distortion``),
                      the Gaussian bound, and ``latent_rate_distortion`` (evaluate.py --rate_distortion)
    papers' metrics   the conventions of the papers' own evaluation code (SQ-VAE's per-batch perplexity,
                      CVQ-VAE's JPEG PSNR / SSIM): ``paper_metrics`` (--eval_metrics)
    frontier          the equal-rate frontier of finished runs as Markdown tables and a plot
                      (``frontier_report``; tools/frontier_table.py is its command line)

Only evaluation uses it (evaluate_run, and a run's final --eval_metrics); the method, vqvae.py, never imports it. Its public names are reachable as ``vqvae.NAME`` too.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqvae import (PAPER_METRICS, QUANTIZERS, BavqError, Quantizer, Runtime, VQVAE, at_least_f32, entropy_bits,
                   eval_batches, evaluating, kmeans_codebook, squared_distances, to_float, validate)

# the names this module hands out (also as vqvae.NAME)
__all__ = ["rate_distortion_curve", "trace_rate_distortion", "curve_rate_at", "curve_distortion_at",
           "gaussian_rate_distortion", "gaussian_distortion_rate", "check_rate_distortion", "latent_rate_distortion",
           "SQVAE_TEST_BATCH", "CVQVAE_JPEG_QUALITY", "perplexity_per_batch", "to_uint8_truncated", "jpeg_roundtrip",
           "ssim_uniform_per_image", "cvqvae_image_metrics", "paper_metrics", "frontier_groups", "frontier_family",
           "frontier_point", "frontier_share_of_variance", "frontier_table", "frontier_points", "equal_rate_table",
           "frontier_plot", "FRONTIER_REFERENCE", "frontier_report", "frontier_record", "frontier_records",
           "frontier_save", "run_bits", "paired_table"]



# ============================================================================= rate-distortion

@torch.no_grad()
def rate_distortion_curve(distances: torch.Tensor, betas, weights: torch.Tensor | None = None,
                          tol: float = 1e-10, max_iterations: int = 10000, rate_tol_bits: float | None = None,
                          log_q0: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> list[dict]:
    """The rate-distortion curve of a discrete source against a reproduction alphabet by Blahut-Arimoto
    (Blahut 1972; Cover & Thomas, Sec. 10.8), one point per slope parameter beta.

    Source: the N rows of ``distances`` (N, K) with probabilities ``weights`` (N,) (uniform when None: an
    empirical source such as a set of latents); reproduction alphabet: the K columns; d(x, k) any
    distortion (squared error for latents, Hamming for the binary tests). For each beta the alternation

        P(k|x) = Q(k) exp(-beta d(x,k)) / Z(x),    Q'(k) = sum_x p(x) P(k|x)

    runs until max |Q' - Q| < ``tol`` or, with ``rate_tol_bits``, until the certificate below is under it
    (at most ``max_iterations``); warm-started from the previous beta's Q (give the betas in increasing
    order; ``log_q0`` starts the first, else uniform). The point is (rate I(X; K) in bits, distortion E d)
    of the last P with its own marginal Q': an achievable pair, on the R(D) curve of that source and
    alphabet once converged, where the curve's slope is dR/dD = -beta / ln 2 bits per unit of distortion.

    Certificates, valid after any number of iterations. With F(Q) = -sum_x p(x) log Z(x) (nats), the point
    has R + beta D <= F(Q) and min over channels of (R + beta D) = min_Q F >= F(Q) - log max_k Q'(k)/Q(k)
    (Jensen; Blahut's c_k = Q'(k)/Q(k)). Hence
      ``excess_bits`` = log2 max_k c_k: the point lies at most this far above R(D) at its own distortion;
      ``intercept_bits`` = (F(Q) - log max_k c_k) / ln 2: R(D) >= intercept_bits - beta D / ln 2 for every D
      (a line below the whole curve; ``curve_rate_at`` takes the best of them as its lower bound).

    Returns [{"beta", "rate_bits", "distortion", "iterations", "excess_bits", "intercept_bits", "log_q"}, ...]
    (log_q: the final log Q' (K,), to warm-start a later call). Computed in the exp domain (Blahut's form:
    A = exp(-beta (d - min_k d)) once per beta, then two products with A per iteration); the point's rate
    from scalars, I = F - beta D - KL(Q' || Q). ``dtype``: float64 by default (float32's rounding can keep
    the certificate above a tight ``rate_tol_bits``).
    ``vqvae.blahut_arimoto`` is the same alternation in log space, for a fixed number of iterations and a uniform
    source, as BA-VQ runs it inside a training step (where autograd differentiates it and exp(-beta d) must never
    underflow); this form differs because a curve needs weights, a convergence certificate and speed at 10^4
    iterations. ``test_the_curve_and_the_training_iteration_are_the_same_alternation`` checks that both give the
    same Q and (R, D) after the same steps; change the maths in both."""
    d = distances.to(dtype)
    N, K = d.shape
    w = (torch.full((N,), 1.0 / N, dtype=dtype, device=d.device) if weights is None
         else weights.to(dtype) / weights.to(dtype).sum())                            # (N,), p(x)
    q = (torch.full((K,), 1.0 / K, dtype=dtype, device=d.device) if log_q0 is None
         else log_q0.to(dtype=dtype, device=d.device).softmax(0))                    # (K,), Q
    d_min = d.min(1).values                                                          # (N,)
    base = float((w * d_min).sum())                                                  # sum_x p(x) min_k d(x, k)
    points = []
    for beta in betas:
        # exp domain (Blahut's form): A = exp(-beta (d - d_min)) (N, K), each row's largest entry 1, so
        # Z(x) = exp(-beta d_min(x)) (A Q)(x) and an iteration is two products with A, no exp or log
        A = torch.exp(-beta * (d - d_min[:, None]))
        for it in range(1, max_iterations + 1):
            z = (A @ q).clamp_min(torch.finfo(dtype).tiny)                            # (N,), Z(x) e^(beta d_min(x))
            c = A.t() @ (w / z)                                                       # (K,), c_k = Q'(k) / Q(k)
            new = q * c                                                               # Q'
            log_c_max = math.log(float(c.max()))
            done = (log_c_max / math.log(2) < rate_tol_bits if rate_tol_bits is not None
                    else bool((new - q).abs().max() < tol))
            if done or it == max_iterations:
                break
            q = new / new.sum()
        # the point: P(k|x) = Q(k) A(x,k) / z(x) from this Q, with its own marginal Q' = new
        D = float(q @ ((A * d).t() @ (w / z)))                                        # sum_x p(x) sum_k P d
        F = beta * base - float((w * z.log()).sum())                                  # -sum_x p(x) log Z(x), nats
        kl = float(torch.where(new > 0, new * c.log(), torch.zeros_like(new)).sum())  # KL(Q' || Q) = sum Q' log c
        rate = (F - beta * D - kl) / math.log(2)                                      # I(X; K) in bits
        points.append({"beta": float(beta), "rate_bits": max(rate, 0.0), "distortion": D, "iterations": it,
                       "excess_bits": max(log_c_max, 0.0) / math.log(2),
                       "intercept_bits": (F - max(log_c_max, 0.0)) / math.log(2),
                       "log_q": (new / new.sum()).log()})
        q = new / new.sum()
    return points


def trace_rate_distortion(distances: torch.Tensor, rate_tol_bits: float = 1e-3, points_per_octave: int = 4,
                          end_tol: float = 1e-3, max_points: int = 120, max_iterations: int = 2000,
                          dtype: torch.dtype = torch.float64, refine_distortions=(), refine_rates=(),
                          refine_bits: float = 0.01, max_refinements: int = 10) -> list[dict]:
    """The whole R(D) curve of the empirical source (rows of ``distances`` (N, K), equally likely) against
    its K-letter alphabet, from end to end, for squared error or any other distortion:

      * beta = 0: rate 0 at D_max = min_k mean_x d(x, k) (the best single letter), exact;
      * betas growing geometrically (``points_per_octave`` per doubling) from 1 / (2 D_max), at or below the
        beta at which the rate leaves 0 for a Gaussian-like source (1 / (2 lambda_max) >= 1 / (2 D_max)),
        each warm-started from the last (``rate_distortion_curve``: at most ``max_iterations``, fewer once
        within ``rate_tol_bits``), until the distortion is within ``end_tol`` (D_max - D_nn) of D_nn;
      * beta = infinity: the nearest-letter assignment, rate H(marginal of the nearest letters), distortion
        D_nn = mean_x min_k d(x, k), the smallest the alphabet allows, exact (ties broken by the lowest index);
      * refinement: for each distortion in ``refine_distortions`` (each rate in ``refine_rates``), betas
        between the two around it (geometric mean; twice the last finite beta next to the infinite end) until
        ``curve_rate_at`` (``curve_distortion_at``, in bits of rate slack: width x the slope) brackets it within
        ``refine_bits``, at most ``max_refinements`` each.

    Points in the order computed, each {"beta", "rate_bits", "distortion", "iterations", "excess_bits",
    "intercept_bits"} (beta = inf for the end). Cost: about 4 passes over (N, K) per BA iteration."""
    d = distances.to(dtype)
    N, K = d.shape
    d_max = float(d.sum(0, dtype=torch.float64).min()) / N                           # min_k mean_x d(x, k)
    nearest = d.argmin(1)                                                            # (N,)
    d_nn = float(d.gather(1, nearest[:, None]).double().mean())
    r_nn = float(entropy_bits(torch.bincount(nearest, minlength=K)))
    points = [{"beta": 0.0, "rate_bits": 0.0, "distortion": d_max, "iterations": 0, "excess_bits": 0.0,
               "intercept_bits": 0.0},
              {"beta": math.inf, "rate_bits": r_nn, "distortion": d_nn, "iterations": 0, "excess_bits": 0.0,
               "intercept_bits": None}]
    if d_max <= d_nn:                                                # one letter, or all letters alike
        return points
    starts = {}                                                      # beta -> its final log Q (warm starts)

    def add(beta, log_q):
        if log_q is not None:        # warm start, mixed with 1e-6 of uniform: a letter the last beta all but
            log_q = torch.logaddexp(log_q + math.log1p(-1e-6), torch.full_like(log_q, math.log(1e-6 / K)))
        p = rate_distortion_curve(d, [beta], rate_tol_bits=rate_tol_bits, max_iterations=max_iterations,
                                  log_q0=log_q, dtype=dtype)[0]                 # dropped can come back in few steps
        starts[beta] = p.pop("log_q")
        points.insert(-1, p)
        return p

    beta, factor = 1.0 / (2.0 * d_max), 2.0 ** (1.0 / points_per_octave)
    while len(points) < max_points:
        p = add(beta, starts.get(beta / factor))
        if p["distortion"] - d_nn <= end_tol * (d_max - d_nn):
            break
        beta *= factor

    def around(key, value):                    # the computed betas just below and above the target on the hull
        hull = _lower_hull(points)
        for a, b in zip(hull, hull[1:]):       # hull in increasing distortion = decreasing rate
            if (key == "distortion" and a["distortion"] <= value <= b["distortion"]) or \
               (key == "rate_bits" and b["rate_bits"] <= value <= a["rate_bits"]):
                return min(a["beta"], b["beta"]), max(a["beta"], b["beta"])
        return None

    for key, targets in (("distortion", refine_distortions), ("rate_bits", refine_rates)):
        for value in targets:
            for _ in range(max_refinements):
                width = (curve_rate_at(points, value) or {}).get("interpolation_bits", 0.0) if key == "distortion" \
                    else curve_distortion_at(points, value)["interpolation_bits"]
                pair = around(key, value)
                if width <= refine_bits or pair is None:
                    break
                lo, hi = pair
                beta = 2.0 * lo if math.isinf(hi) else (lo * hi) ** 0.5 if lo > 0 else hi / 2.0
                if beta in starts:
                    break
                add(beta, starts.get(lo))
    return points


def _lower_hull(points: list[dict]) -> list[dict]:
    """The lower convex hull of the achieved (distortion, rate) points, in increasing distortion: every
    mixture of achievable assignments is achievable (time sharing), so R(D) lies on or below it."""
    pts = sorted(points, key=lambda p: (p["distortion"], p["rate_bits"]))
    hull = []
    for p in pts:
        while len(hull) >= 2:
            (a, b) = hull[-2], hull[-1]
            cross = ((b["distortion"] - a["distortion"]) * (p["rate_bits"] - a["rate_bits"])
                     - (b["rate_bits"] - a["rate_bits"]) * (p["distortion"] - a["distortion"]))
            if cross <= 0:                     # b lies on or above the segment a-p
                hull.pop()
            else:
                break
        hull.append(p)
    end = min(range(len(hull)), key=lambda i: (hull[i]["rate_bits"], -hull[i]["distortion"]))
    return hull[:end + 1]                      # beyond the first rate-0 point the curve is flat at 0


def _lines(points: list[dict]) -> list:
    """(intercept, slope) in bits of the certified lines R(D) >= intercept - slope D (``rate_distortion_curve``)."""
    return [(p["intercept_bits"], p["beta"] / math.log(2)) for p in points if p.get("intercept_bits") is not None]


def curve_rate_at(points: list[dict], D: float) -> dict | None:
    """R(D) of a swept curve (``trace_rate_distortion``) at distortion D, bracketed: the lower convex hull
    of the achieved points (an upper bound: they are achievable, and so are their mixtures) and the best of
    the certified lines below the curve, max_i intercept_i - beta_i / ln 2 D (a lower bound, clipped at 0;
    see ``rate_distortion_curve``). {"rate_bits": the upper bound, "interpolation_bits": upper - lower}, the
    certified uncertainty, from the spacing of the points and from iterations stopped early. None when D
    lies below the curve's smallest distortion D_nn (no assignment to this alphabet reaches it)."""
    hull = _lower_hull(points)
    if D < hull[0]["distortion"] * (1 - 1e-9):              # (1e-9: the distances' expansion rounds)
        return None
    D = max(D, hull[0]["distortion"])                     # within that tolerance below the curve's end: at it
    if D <= hull[0]["distortion"] * (1 + 1e-9) and (hull[0]["beta"] is None or math.isinf(hull[0]["beta"])):
        # at D_nn every channel puts all its mass on the nearest letters: R(D_nn) = H(nearest) exactly
        # (for latents without ties, which continuous values have with probability 1)
        return {"rate_bits": hull[0]["rate_bits"], "interpolation_bits": 0.0}
    if D >= hull[-1]["distortion"]:
        return {"rate_bits": 0.0, "interpolation_bits": 0.0}
    for a, b in zip(hull, hull[1:]):
        if a["distortion"] <= D <= b["distortion"]:
            t = 0.0 if b["distortion"] == a["distortion"] else (D - a["distortion"]) / (b["distortion"] - a["distortion"])
            upper = a["rate_bits"] + t * (b["rate_bits"] - a["rate_bits"])
            break
    lower = max([0.0] + [c - s * D for c, s in _lines(points)])
    return {"rate_bits": upper, "interpolation_bits": max(upper - lower, 0.0)}


def curve_distortion_at(points: list[dict], R: float) -> dict:
    """D(R) of a swept curve at rate R bits, bracketed as ``curve_rate_at``: the hull's distortion at R (an
    upper bound; D_nn, the curve's end, for any R at or above its end's rate: all the alphabet allows) and
    the lower bound from the lines, D >= (intercept_i - R) ln 2 / beta_i. {"distortion": the upper bound,
    "interpolation": upper - lower, "interpolation_bits": that width times the slope of the hull there, in
    bits of rate}."""
    hull = _lower_hull(points)
    if R >= hull[0]["rate_bits"]:
        return {"distortion": hull[0]["distortion"], "interpolation": 0.0, "interpolation_bits": 0.0}
    R = max(R, hull[-1]["rate_bits"])                     # at or below the hull's lowest rate: its last point
    for a, b in zip(hull, hull[1:]):
        if b["rate_bits"] <= R <= a["rate_bits"]:
            t = 0.0 if a["rate_bits"] == b["rate_bits"] else (a["rate_bits"] - R) / (a["rate_bits"] - b["rate_bits"])
            upper = a["distortion"] + t * (b["distortion"] - a["distortion"])
            slope = (a["rate_bits"] - b["rate_bits"]) / max(b["distortion"] - a["distortion"], 1e-300)
            break
    lower = max([0.0] + [(c - R) / s for c, s in _lines(points) if s > 0])
    width = max(upper - lower, 0.0)
    return {"distortion": upper, "interpolation": width, "interpolation_bits": width * slope}


def _water_level(lam: torch.Tensor, too_low) -> float:
    """Reverse water-filling's level theta on the eigenvalues ``lam`` (float64): bisection of [0, max lam], 200
    halvings, for the theta where ``too_low(theta)`` turns False."""
    lo, hi = 0.0, float(lam.max())
    for _ in range(200):
        theta = 0.5 * (lo + hi)
        lo, hi = (theta, hi) if too_low(theta) else (lo, theta)
    return 0.5 * (lo + hi)


def _water_distortion(lam: torch.Tensor, theta: float) -> float:
    """D(theta) = sum_i min(theta, lambda_i)."""
    return float(torch.minimum(lam, torch.tensor(theta, dtype=lam.dtype)).sum())


def _water_rate(lam: torch.Tensor, theta: float) -> float:
    """R(theta) = sum_i max(0, 1/2 log2(lambda_i / theta)) bits (infinite at theta = 0)."""
    pos = lam[lam > 0]
    return float(0.5 * torch.log2(pos[pos > theta] / theta).sum()) if theta > 0 else math.inf


def gaussian_rate_distortion(eigenvalues: torch.Tensor, D: float) -> float:
    """R(D) in bits of a Gaussian vector with covariance eigenvalues lambda_i under squared error summed
    over its components, by reverse water-filling (Cover & Thomas, Thm. 10.3.3): D = sum_i min(theta, lambda_i),
    R = sum_i max(0, 1/2 log2(lambda_i / theta)); theta found by bisection (float64). It bounds from above
    the R(D) of every source with that covariance (the Gaussian is the hardest to compress)."""
    lam = eigenvalues.double().clamp_min(0)
    if D >= float(lam.sum()):
        return 0.0
    if D <= 0:
        return math.inf
    return _water_rate(lam, _water_level(lam, lambda theta: _water_distortion(lam, theta) < D))


def gaussian_distortion_rate(eigenvalues: torch.Tensor, R: float) -> float:
    """D(R) of the same Gaussian (the inverse of ``gaussian_rate_distortion``): theta by bisection on
    R(theta) = R (the rate falls from infinity at theta = 0 to 0 at max lambda), D = D(theta)."""
    lam = eigenvalues.double().clamp_min(0)
    if R <= 0:
        return float(lam.sum())
    return _water_distortion(lam, _water_level(lam, lambda theta: _water_rate(lam, theta) > R))


@torch.no_grad()
def check_rate_distortion(model: "VQVAE") -> None:
    """Raise BavqError unless the model's quantizer has an explicit alphabet (``rate_distortion_source``)."""
    q = model.quantizer
    p = next(model.parameters())
    if q.rate_distortion_source(torch.zeros(1, q.embedding_dim, 1, 1, dtype=p.dtype, device=p.device)) is None:
        supported = [n for n, c in QUANTIZERS.items() if c.rate_distortion_source is not Quantizer.rate_distortion_source]
        raise BavqError(f"The rate-distortion analysis needs an explicit alphabet of decoder inputs (K vectors, one "
                        f"per code, that the decoder can receive), and this model's quantizer has none: "
                        f"{q.alphabet_note}. It is defined for {', '.join(supported)}.")


@torch.no_grad()
def latent_rate_distortion(model: "VQVAE", images_u8: torch.Tensor, positions: int = 4096, alphabet_size: int = 2048,
                           kmeans_iters: int = 10, repeats: int = 1, seed: int = 0, batch_size: int = 500,
                           rate_tol_bits: float = 1e-2, points_per_octave: int = 2, max_iterations: int = 100,
                           refine_bits: float = 0.01, dtype: torch.dtype = torch.float64,
                           rt: "Runtime | None" = None) -> dict:
    """Where a trained model's quantizer sits on the rate-distortion plane of its own encoder's latents.

    The source: the latents of ``images_u8`` (the validation set) in the space where the quantizer measures
    distortion (``Quantizer.rate_distortion_source``: the encoder output; its normalised direction with
    --cosine; FSQ's bounded and LFQ's projected values), every latent position one letter, equally likely.
    Distortion d(x, k) = ||x - a_k||^2 summed over the d channels, per position; rates in bits per position
    (x positions per image for bits per image).

      run        the model's own operating point over every position: rate = H of its eval code
                 marginal, distortion = mean ||x - a_code||^2 (exact, all images);
      codebook   R(D) with the run's own alphabet a_1..a_K (``trace_rate_distortion``): what an optimal,
                 rate-aware assignment to the same codes could reach;
      kmeans     R(D) with a richer alphabet, the own codes plus ``alphabet_size`` k-means centroids
                 (k-means++ and ``kmeans_iters`` Lloyd steps) fitted on other positions than the ones
                 measured: the estimate of the source's R(D);
      gaussian   R(D) of a Gaussian with the latents' covariance (all positions), reverse water-filling:
                 the classical reference, an upper bound on the R(D) of any source with that covariance.

    The two curves are computed on ``positions`` latent positions drawn at random (``seed``) without
    replacement; with ``repeats`` > 1 on that many disjoint draws, and the spread of each gap over the draws
    is reported as the error the subsample adds. The gaps compare like with like: the run's point on the
    same positions (``run_measured``: its codes' entropy and mean distortion there) against each curve:
    ``rate_bits`` = R_run - R(D_run) (bits of rate slack at the run's distortion) and ``distortion`` =
    D_run - D(R_run) (distortion slack at its rate), each with its certified uncertainty
    (``rate_uncertainty_bits``, ``distortion_uncertainty``: ``curve_rate_at`` / ``curve_distortion_at``; the
    sweep is refined around the run's point until the rate is bracketed within ``refine_bits``). The Gaussian
    gaps use the point over all positions. BA iterations: at most ``max_iterations`` per beta, stopped at
    ``rate_tol_bits``; ``dtype`` of the (positions, letters) passes (float64; float32 gives the same gaps to
    1e-3 bits but took twice as long, its rounding keeping the certificate from reaching the tolerance).
    Raises BavqError for a quantizer without an explicit alphabet of decoder inputs."""
    q = model.quantizer
    check_rate_distortion(model)
    rt = rt or Runtime(images_u8.device)
    started = time.perf_counter()
    with evaluating(model):
        per_image = q.rate_distortion_source(model.encoder(rt.prepare(to_float(images_u8[:1]))))[0].shape[0]
    total = images_u8.shape[0] * per_image
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=g)
    measured = min(positions, total // repeats)
    if measured < 1:
        raise BavqError(f"{images_u8.shape[0]} images give {total} latent positions, too few for {repeats} disjoint "
                        f"draws of positions; give more images or fewer repeats.")
    # k-means is fitted on up to 4 x alphabet_size other positions; where fewer than alphabet_size are left,
    # on the measured ones (then the kmeans curve is optimistic: its centroids have seen the positions measured)
    n_fit = min(total - repeats * measured, 4 * alphabet_size)
    fit_on_measured = alphabet_size > 0 and n_fit < alphabet_size
    chosen = order[:repeats * measured + (0 if fit_on_measured else n_fit)]
    slot = torch.full((total,), -1, dtype=torch.long)
    slot[chosen] = torch.arange(chosen.numel())
    K = q.num_embeddings
    counts = torch.zeros(K, dtype=torch.float64)
    dist_sum, x_sum, xx_sum, kept = 0.0, None, None, []
    with evaluating(model):
        for start, x_img in eval_batches(model, images_u8, batch_size, rt):
            with rt.autocast():
                z = model.encoder(x_img)
            z = at_least_f32(z)
            x, alphabet = q.rate_distortion_source(z)                                      # (B*H*W, d), (K, d)
            idx = q(z)[2]["code_indices"].reshape(-1)                                      # (B*H*W,) eval codes
            x64 = x.double()
            counts += torch.bincount(idx, minlength=K).double().cpu()
            dist_sum += float((x - alphabet[idx]).pow(2).sum())
            x_sum = x64.sum(0) if x_sum is None else x_sum + x64.sum(0)
            xx_sum = x64.t() @ x64 if xx_sum is None else xx_sum + x64.t() @ x64          # (d, d)
            s = slot[start * per_image:start * per_image + x.shape[0]].to(x.device)
            keep = s >= 0
            kept.append((s[keep].cpu(), x[keep].double().cpu(), idx[keep].cpu()))
    order_kept = torch.cat([k[0] for k in kept]).argsort()
    X = torch.cat([k[1] for k in kept])[order_kept]                                  # (chosen, d), in draw order
    codes = torch.cat([k[2] for k in kept])[order_kept]                              # (chosen,), the run's codes
    own = alphabet.double().cpu()                                                    # (K, d)
    mean = x_sum.cpu() / total
    cov = xx_sum.cpu() / total - mean[:, None] * mean[None, :]                       # (d, d), biased
    eig = torch.linalg.eigvalsh(cov).clamp_min(0)
    run = {"rate_bits": float(entropy_bits(counts)), "distortion": dist_sum / total}
    fit = X[:measured] if fit_on_measured else X[repeats * measured:]
    rich = own
    if alphabet_size:
        centres, _ = kmeans_codebook(fit.float(), min(alphabet_size, fit.shape[0]), kmeans_iters, generator=g)
        rich = torch.cat([own, centres.double()])
    curves = {"codebook": [], "kmeans": []}
    gaps = {"codebook": [], "kmeans": []}
    drawn = []
    for r in range(repeats):
        xs, cs = X[r * measured:(r + 1) * measured], codes[r * measured:(r + 1) * measured]
        point = {"rate_bits": float(entropy_bits(torch.bincount(cs, minlength=K))),    # the run on these positions
                 "distortion": float((xs - own[cs]).pow(2).sum(1).mean())}
        drawn.append(point)
        for name, alpha in (("codebook", own), ("kmeans", rich)):
            if name == "kmeans" and not alphabet_size:
                continue
            pts = trace_rate_distortion(squared_distances(xs, alpha), rate_tol_bits, points_per_octave,
                                        max_iterations=max_iterations, dtype=dtype,
                                        refine_distortions=[point["distortion"]], refine_rates=[point["rate_bits"]],
                                        refine_bits=refine_bits)
            curves[name].append(sorted(pts, key=lambda p: p["beta"]))
            at, dr = curve_rate_at(pts, point["distortion"]), curve_distortion_at(pts, point["rate_bits"])
            gaps[name].append({
                "rate_bits": None if at is None else point["rate_bits"] - at["rate_bits"],
                "rate_uncertainty_bits": None if at is None else at["interpolation_bits"],
                "distortion": point["distortion"] - dr["distortion"], "distortion_uncertainty": dr["interpolation"]})
    out = {"positions": measured, "positions_total": total, "positions_per_image": per_image, "repeats": repeats,
           "seed": seed, "latent_channels": int(own.shape[1]), "codebook_size": K,
           "alphabet_size": int(rich.shape[0]), "kmeans_iters": kmeans_iters, "kmeans_positions": int(fit.shape[0]) if alphabet_size else 0,
           "kmeans_fit_on_measured": fit_on_measured,
           "rate_tol_bits": rate_tol_bits, "run": {**run, "bits_per_image": run["rate_bits"] * per_image},
           "run_measured": drawn[0] if repeats == 1 else drawn, "curves": {}, "gaps": {}}
    for name in ("codebook", "kmeans"):
        if not curves[name]:
            continue
        # beta None = infinity, the nearest-letter end (JSON has no infinity); curve_rate_at reads either
        out["curves"][name] = [{**p, "beta": None if math.isinf(p["beta"]) else p["beta"]} for p in curves[name][0]]
        out["gaps"][name] = _mean_gap(gaps[name])
    g_rate = gaussian_rate_distortion(eig, run["distortion"])
    out["gaps"]["gaussian"] = {"rate_bits": run["rate_bits"] - g_rate,
                               "distortion": run["distortion"] - gaussian_distortion_rate(eig, run["rate_bits"])}
    d_lo, total = min(min(p["distortion"] for p in c[0]) for c in curves.values() if c), float(eig.sum())
    if total > 0:
        out["curves"]["gaussian"] = [{"rate_bits": gaussian_rate_distortion(eig, D), "distortion": D} for D in
                                     torch.logspace(math.log10(max(d_lo, 1e-12)), math.log10(total), 40,
                                                    dtype=torch.float64).tolist()]
    else:            # latents without variance (an encoder collapsed to one output): R(D) = 0 at every D >= 0
        out["curves"]["gaussian"] = [{"rate_bits": 0.0, "distortion": 0.0}]
    out["covariance_eigenvalues"] = eig.flip(0).tolist()
    out["seconds"] = time.perf_counter() - started
    return out


def _mean_gap(per_draw: list) -> dict:
    """Gaps over the draws of positions: their mean, and with several draws their standard deviation
    (``*_spread``, n - 1) and the per-draw values."""
    out = {}
    for key in per_draw[0]:
        vals = [g[key] for g in per_draw]
        if any(v is None for v in vals):
            out[key] = None
            continue
        out[key] = sum(vals) / len(vals)
        if len(vals) > 1:
            out[key + "_spread"] = statistics.stdev(vals)
            out[key + "_draws"] = vals
    return out


# ----------------------------------------------------------------------------- the papers' metric conventions
# Each computes what a paper's own evaluation code computes, so that our runs can sit in its table; the
# library's metrics above stay the defined ones (docs/metrics.md states both and their measured difference).
# Asked for by name in --eval_metrics (the protocol configs do), computed by ``paper_metrics`` at the end of
# a run and by evaluate.py.

SQVAE_TEST_BATCH = 32        # sony/sqvae: cfgs.train.bs (32) serves the test loader too (main.py, get_loader)
CVQVAE_JPEG_QUALITY = 75     # lyndonzheng/CVQ-VAE: imageio.imwrite(.jpg) -> Pillow's default quality


def perplexity_per_batch(indices: torch.Tensor, K: int, images_per_batch: int = SQVAE_TEST_BATCH,
                         eps: float = 1e-7) -> float:
    """sony/sqvae's test perplexity (vision/quantizer.py, trainer.py ``_test_sub``): for consecutive
    batches of ``images_per_batch`` images (the last partial batch included, shuffle off), p = the
    batch's code histogram / its positions, perplexity_b = exp(-sum_k p_k log(p_k + 1e-7)); the plain
    mean over batches. ``indices`` (N, ...) in test-set order. It depends on the batch size: K codes
    used uniformly read about K exp(-(K - 1) / (2 n)) at n positions per batch (the plug-in entropy's bias,
    Miller 1955), not K. Indices (N, S, H, W)
    of S codebooks of K / S codes: stage s's codes count as s K / S + k (the layout of code_counts)."""
    if indices.dim() == 4:
        S = indices.shape[1]
        indices = indices + (torch.arange(S, device=indices.device) * (K // S))[None, :, None, None]
    flat = indices.reshape(indices.shape[0], -1)                                   # (N, positions)
    values = []
    for start in range(0, flat.shape[0], images_per_batch):
        c = torch.bincount(flat[start:start + images_per_batch].flatten(), minlength=K).double()
        p = c / c.sum()
        values.append(torch.exp(-(p * torch.log(p + eps)).sum()))
    return float(torch.stack(values).mean())


def to_uint8_truncated(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 as CVQ-VAE's ``tensor2im``: ((x + 1) / 2).clamp(0, 1) * 255, truncated
    (numpy's astype(uint8)), not rounded."""
    return (at_least_f32(x).add(1).div(2).clamp(0, 1) * 255).to(torch.uint8)


def jpeg_roundtrip(images_u8: torch.Tensor, quality: int = CVQVAE_JPEG_QUALITY) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> the same images written as JPEG by Pillow at ``quality`` (its default
    chroma subsampling) and read back as RGB, on the CPU."""
    from PIL import Image
    out = []
    for img in images_u8.cpu().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2)


def ssim_uniform_per_image(a01: torch.Tensor, b01: torch.Tensor, window: int = 11) -> torch.Tensor:
    """scikit-image 0.19's structural_similarity(a, b, multichannel=True, data_range=1, win_size=11),
    CVQ-VAE's call: per channel, local means and sample (co)variances (factor n / (n - 1), n = 121)
    under a uniform 11 x 11 window, K1 = 0.01, K2 = 0.03, the SSIM map cropped by (win - 1) / 2 on each
    side (so only windows inside the image count), averaged over positions, then over channels.
    Images (B, C, H, W) already in [0, 1]; float64; (B,) out."""
    a, b = a01.double(), b01.double()
    mean = lambda t: F.avg_pool2d(t, window, stride=1)                              # noqa: E731, (B, C, H-10, W-10)
    n = window * window
    ux, uy = mean(a), mean(b)
    cov_norm = n / (n - 1)
    vx, vy = cov_norm * (mean(a * a) - ux * ux), cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    S = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return S.mean(dim=(2, 3)).mean(1)


def cvqvae_image_metrics(x: torch.Tensor, x_recon: torch.Tensor) -> dict:
    """CVQ-VAE's test.py + evaluation.py on a batch of [-1, 1] images: both the input and the
    reconstruction go through ``to_uint8_truncated`` and a JPEG file (quality 75), are read back /255,
    and scored per image: ``psnr_cvqvae`` = skimage peak_signal_noise_ratio(data_range=1) (one MSE over
    all values), ``ssim_cvqvae`` = ``ssim_uniform_per_image``. (B,) tensors on the CPU."""
    a = jpeg_roundtrip(to_uint8_truncated(x)).double() / 255
    b = jpeg_roundtrip(to_uint8_truncated(x_recon)).double() / 255
    mse = (a - b).pow(2).flatten(1).mean(1)
    return {"psnr_cvqvae": 10 * torch.log10(1.0 / mse), "ssim_cvqvae": ssim_uniform_per_image(a, b)}


class PaperMetrics:
    """The papers' conventions among ``names`` (PAPER_METRICS), collected from the batches of one evaluation pass
    in test-set order: ``validate(..., observe=pm.add)``, then ``pm.result()``. No second pass over the set."""

    def __init__(self, names, num_embeddings: int):
        self.names = [n for n in PAPER_METRICS if n in names]
        self.K = num_embeddings
        self.indices, self.per_image = [], {"psnr_cvqvae": [], "ssim_cvqvae": []}

    def add(self, x: torch.Tensor, x_recon: torch.Tensor, info: dict) -> None:
        """One batch: its images x and reconstructions on the [-1, 1] scale, the quantizer's info."""
        self.indices.append(info["code_indices"])
        if "psnr_cvqvae" in self.names or "ssim_cvqvae" in self.names:
            for k, v in cvqvae_image_metrics(x, x_recon.float()).items():
                self.per_image[k].append(v)

    def result(self) -> dict:
        out = {}
        if "perplexity_sqvae" in self.names:
            out["perplexity_sqvae"] = perplexity_per_batch(torch.cat(self.indices), self.K)
        for k in ("psnr_cvqvae", "ssim_cvqvae"):
            if k in self.names:
                out[k] = float(torch.cat(self.per_image[k]).mean())
        return out


def paper_metrics(model: VQVAE, images_u8: torch.Tensor, names, batch_size: int, rt: Runtime | None = None) -> dict:
    """The papers' conventions among ``names`` on ``images_u8`` in their order, by an evaluation pass of its own at
    ``batch_size`` (the validation batch size: BA-VQ's codes depend on it). Runs and evaluations collect them from
    their validation pass instead (``PaperMetrics``)."""
    pm = PaperMetrics(names, model.quantizer.num_embeddings)
    if pm.names:
        validate(model, images_u8, batch_size, rt=rt, observe=pm.add)
    return pm.result()


# ============================================================================= the equal-rate frontier

RD_SUMMARY_KEYS = ("positions", "run", "run_measured", "gaps", "covariance_eigenvalues")   # what the tables read


def frontier_record(run: Path) -> dict | None:
    """A finished run as the frontier reads it: {"config": the settings that differ from the defaults, "final": its
    final metrics without the per-code lists, "rd": the summary of its rate_distortion.json or None}; None when the
    run is unfinished (no final_metrics.json)."""
    final = run / "final_metrics.json"
    if not final.is_file():
        return None
    import yaml
    from vqvae import Config
    defaults = dataclasses.asdict(Config())
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    rd_path = run / "rate_distortion.json"
    rd = json.loads(rd_path.read_text()) if rd_path.is_file() else None
    return {"config": {k: v for k, v in cfg.items() if k not in defaults or defaults[k] != v or k == "quantizer"},
            "final": {k: v for k, v in json.loads(final.read_text()).items() if not isinstance(v, list)},
            "rd": {k: rd[k] for k in RD_SUMMARY_KEYS if k in rd} if rd else None}


def frontier_records(roots: list) -> tuple[dict, int]:
    """{run name: ``frontier_record``} of every finished run under ``roots``: folders of run directories, or JSON
    files written by ``frontier_save`` (e.g. results/frontier_reduced.json, the reference runs measured here);
    and how many run directories are unfinished. A run name found twice is an error."""
    records, unfinished = {}, 0
    for root in map(Path, roots):
        if root.is_file():
            try:
                found = json.loads(root.read_text())["runs"]
            except (ValueError, KeyError, TypeError):
                raise BavqError(f"{root} is not a frontier file (a JSON file with the runs that frontier_table.py "
                                "--save writes); give folders of run directories or such files.") from None
        elif root.is_dir():
            found = {}
            for run in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                rec = frontier_record(run)
                unfinished += rec is None
                if rec is not None:
                    found[run.name] = rec
        else:
            raise BavqError(f"{root} does not exist: give folders of run directories or frontier files (JSON).")
        twice = sorted(set(found) & set(records))
        if twice:
            raise BavqError(f"Runs of the same name come from two places ({', '.join(twice[:3])}{' ...' if len(twice) > 3 else ''}; "
                            f"the second: {root}). Give each folder or file once, or rename one set.")
        records.update(found)
    return records, unfinished


def frontier_save(roots: list, path: Path, note: str = "") -> int:
    """Write the finished runs under ``roots`` as a frontier file (JSON): {"note", "runs": {name: record}}, so that
    others can place their runs against them without the run directories. Returns the number of runs."""
    records, _ = frontier_records(roots)
    Path(path).write_text(json.dumps({"note": note, "runs": records}, indent=1, sort_keys=True) + "\n")
    return len(records)


def _codes_depend_on_batch(config: dict) -> bool:
    """Whether a run's evaluation codes depend on their batch (its quantizer's ``batch_dependent`` for its settings)."""
    from vqvae import make_config
    try:
        return QUANTIZERS[config["quantizer"]].batch_dependent(make_config(config))
    except (BavqError, KeyError):
        return False


def frontier_groups(roots: list) -> tuple[dict, int]:
    """{run name without _s<seed>: {quantizer, K, several_codes, batch_dependent, runs: [final metrics + "rd"]}} over
    ``roots`` (see ``frontier_records``), and how many run directories are unfinished. ``several_codes``: a position
    carries several codes (residual VQ's stages, OptVQ's heads: the final metrics have ``combined_entropy_bits``);
    ``batch_dependent``: the evaluation codes depend on their batch."""
    records, unfinished = frontier_records(roots)
    found = {}
    for name in sorted(records):
        rec = records[name]
        key = re.sub(r"_s\d+$", "", name)
        g = found.setdefault(key, {"quantizer": rec["config"]["quantizer"], "K": rec["config"].get("codebook_size", 512),
                                   "several_codes": "combined_entropy_bits" in rec["final"],
                                   "batch_dependent": _codes_depend_on_batch(rec["config"]), "runs": []})
        seed = re.search(r"_s(\d+)$", name)
        g["runs"].append({**rec["final"], "rd": rec["rd"], "seed": int(seed.group(1)) if seed else None})
    return found, unfinished


def run_bits(run: dict) -> float:
    """The rate of a run in bits per latent position: log2 of its validation perplexity (= the entropy of its code
    marginal), or, where a position carries several codes, ``code_entropy_bits``, the sum of their entropies."""
    if "combined_entropy_bits" in run:
        return run["code_entropy_bits"]
    return math.log2(run["perplexity"])


KNOB = re.compile(r"_(beta|lam|eps)(\d[\d.]*(?:e-?\d+)?)(?=_|$)")   # a rate knob in a group's name: _lam0.01, _eps10


def frontier_family(key: str) -> str:
    """The line of the plot a group belongs to: its key without _k<K>, and without what else sets its rate in the
    frontier's grid configs (configs/frontier_reduced.yaml): FSQ's levels (fsq_8x5x5_fsq -> fsq_fsq), BA-VQ's beta
    range (ba_vq_best_beta1000_ba_vq -> ba_vq_best_beta_ba_vq), ECVQ's lam (ecvq_lam0.01_ecvq -> ecvq_lam_ecvq),
    OptVQ's eps (optvq_eps10_optvq -> optvq_eps_optvq)."""
    fam = key.rsplit("_k", 1)[0]
    return KNOB.sub(lambda m: f"_{m.group(1)}", re.sub(r"^fsq_\d+(?:x\d+)*_", "fsq_", fam))


def frontier_point(key: str, g: dict) -> str:
    """What sets the rate of a group within its family: FSQ's levels, the knob in its name (beta, lam or eps; with K
    when the family also spans K), or K."""
    levels, knob = re.match(r"^fsq_(\d+(?:x\d+)*)_", key), KNOB.search(key.rsplit("_k", 1)[0])
    if levels:
        return levels.group(1)
    return f"{knob.group(1)} {knob.group(2)}" + (f", K {g['K']}" if g.get("spans_K") else "") if knob else str(g["K"])


def _in_order(found: dict) -> list:
    """The groups as (key, group), by family and then K (then name: the beta ranges share K)."""
    return sorted(found.items(), key=lambda kv: (frontier_family(kv[0]), kv[1]["K"], kv[0]))


def _mean_sd(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _per_image(run: dict, positions: int = 64) -> float:
    """Bits per image of a run: its own ``bits_per_image`` (rate x latent positions per image), or, for runs that
    predate that metric, the rate x ``positions`` (8 x 8 for 32 x 32 images)."""
    return run.get("bits_per_image", math.log2(run["perplexity"]) * positions)


def frontier_share_of_variance(rds: list) -> str:
    """Mean ± sd of distortion / total latent variance over the runs whose latents vary; an encoder collapsed to
    one output has none (the ratio is infinite), and the cell says how many runs it left out."""
    variances = [(rd["run"]["distortion"], sum(rd["covariance_eigenvalues"])) for rd in rds]
    shares = [distortion / variance for distortion, variance in variances if variance > 0]
    if len(shares) == len(rds):
        return _mean_sd(shares)
    return (_mean_sd(shares) + " " if shares else "") + f"({len(rds) - len(shares)} of {len(rds)} without latent variance)"


def frontier_table(found: dict, unfinished: int) -> str:
    """The frontier table (and the R(D) table) of ``frontier_groups``' result."""
    lines = ["| runs (seeds) | quantizer | K | PSNR dB | perplexity | bits / position | bits / image |",
             "|---|---|---|---|---|---|---|"]
    for key, g in _in_order(found):
        runs = g["runs"]
        bits = [run_bits(r) for r in runs]
        mark = ("†" if g.get("several_codes") else "") + ("‡" if g.get("batch_dependent") else "")
        lines.append(f"| `{key}` ({len(runs)}){mark} | {g['quantizer']} | {g['K']} | {_mean_sd([r['psnr'] for r in runs])} | "
                     f"{_mean_sd([r['perplexity'] for r in runs])} | {_mean_sd(bits)} | "
                     f"{_mean_sd([_per_image(r) for r in runs])} |")
    rd_lines = ["| runs (seeds) | K | R(D) positions | rate bits | distortion | distortion / latent variance | "
                "own-codebook rate gap | k-means rate gap | k-means distortion gap |", "|---|---|---|---|---|---|---|---|---|"]
    for key, g in _in_order(found):
        rds = [r["rd"] for r in g["runs"] if r["rd"]]
        if not rds or any(rd["gaps"]["codebook"]["rate_bits"] is None or rd["gaps"].get("kmeans") is None
                          or rd["gaps"]["kmeans"]["rate_bits"] is None for rd in rds):
            continue
        rd_lines.append(
            f"| `{key}` ({len(rds)}) | {g['K']} | {rds[0]['positions']} | {_mean_sd([rd['run_measured']['rate_bits'] for rd in rds])} | "
            f"{_mean_sd([rd['run_measured']['distortion'] for rd in rds])} | "
            f"{frontier_share_of_variance(rds)} | "
            f"{_mean_sd([rd['gaps']['codebook']['rate_bits'] for rd in rds])} | "
            f"{_mean_sd([rd['gaps']['kmeans']['rate_bits'] for rd in rds])} | "
            f"{_mean_sd([rd['gaps']['kmeans']['distortion'] for rd in rds])} |")
    text = "\n".join(lines) + f"\n\n{sum(len(g['runs']) for g in found.values())} finished runs, {unfinished} unfinished."
    if any(g.get("several_codes") for g in found.values()):
        text += ("\n† several codes per position (residual VQ's stages, OptVQ's heads): the rate is the sum of their "
                 "code entropies, an upper bound on the position's entropy; perplexity is over every (slot, code) pair.")
    if any(g.get("batch_dependent") for g in found.values()):
        text += ("\n‡ evaluation codes that depend on their batch (e.g. --optvq_eval sinkhorn): not one code per "
                 "latent, so left out of the equal-rate comparison and the plot.")
    if len(rd_lines) > 2:
        text += ("\n\nR(D) of the latents (the runs of each group that have rate_distortion.json; their number in "
                 "brackets):\n\n" + "\n".join(rd_lines))
    return text


def _frontier_summary(g: dict) -> tuple:
    """(mean bits per position, mean PSNR, standard error of the PSNR mean; NaN for one seed) of a group."""
    psnr = [r["psnr"] for r in g["runs"]]
    se = statistics.stdev(psnr) / math.sqrt(len(psnr)) if len(psnr) > 1 else float("nan")
    return statistics.mean(run_bits(r) for r in g["runs"]), statistics.mean(psnr), se


def frontier_points(found: dict, fam: str) -> list:
    """The measured points of a family as ``_frontier_summary`` tuples, by rate."""
    return sorted(_frontier_summary(g) for key, g in found.items()
                  if frontier_family(key) == fam and not g.get("batch_dependent"))


def _at_rate(points: list, bits: float):
    """(PSNR, its standard error) of a frontier at ``bits`` by linear interpolation between the two measured
    points around it (weights 1 - t and t, so SE = sqrt((1 - t)^2 SE_a^2 + t^2 SE_b^2)); None outside its range."""
    for (b0, p0, s0), (b1, p1, s1) in zip(points, points[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0) if b1 > b0 else 0.0
            return p0 + t * (p1 - p0), math.hypot((1 - t) * s0, t * s1)
    return None


def equal_rate_table(found: dict, reference: str) -> str:
    """Every group's PSNR against the reference family's frontier at the group's own rate: the difference of the
    means, with the standard error of that difference (the group's and the interpolated reference's, independent
    seeds). Groups of the reference family and groups outside its range of rates are left out."""
    ref = frontier_points(found, reference)
    lines = [f"| runs (seeds) | bits / position | PSNR dB | `{reference}` at that rate | difference ± SE |",
             "|---|---|---|---|---|"]
    for key, g in _in_order(found):
        if frontier_family(key) == reference or g.get("batch_dependent"):
            continue
        bits, psnr, se = _frontier_summary(g)
        there = _at_rate(ref, bits)
        if there is None:
            continue
        lines.append(f"| `{key}` ({len(g['runs'])}) | {bits:.2f} | {psnr:.2f} | {there[0]:.2f} | "
                     f"{psnr - there[0]:+.2f} ± {math.hypot(se, there[1]):.2f} |")
    return "\n".join(lines)


def _mean_se(values: list) -> str:
    if len(values) < 2:
        return f"{values[0]:+.2f}" if values else ""
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values) / math.sqrt(len(values)):.2f}"


def paired_table(found: dict, prefix: str) -> str:
    """The groups whose name starts with ``prefix``, in name order (a ladder: r0, r1, ...), each against the group
    before it seed by seed: the mean over the seeds both have of the differences in PSNR and in rate, with the
    standard error of that mean (sd / sqrt(n)); and the R(D) analysis' share of the latents' variance left as error
    and the own-codebook rate gap, where the runs have it."""
    keys = sorted(k for k in found if k.startswith(prefix))
    lines = ["| group (seeds) | PSNR dB | bits / position | PSNR − previous (paired) | bits − previous (paired) | "
             "distortion / latent variance | own-codebook rate gap |", "|---|---|---|---|---|---|---|"]
    previous = None
    for key in keys:
        runs = {r["seed"]: r for r in found[key]["runs"]}
        dpsnr = dbits = []
        if previous is not None:
            both = sorted(set(runs) & set(previous))
            dpsnr = [runs[s]["psnr"] - previous[s]["psnr"] for s in both]
            dbits = [run_bits(runs[s]) - run_bits(previous[s]) for s in both]
        rds = [r["rd"] for r in runs.values() if r.get("rd") and r["rd"].get("gaps", {}).get("codebook")]
        share = frontier_share_of_variance(rds) if rds else ""
        gap = _mean_sd([rd["gaps"]["codebook"]["rate_bits"] for rd in rds]) if rds else ""
        lines.append(f"| `{key}` ({len(runs)}) | {_mean_sd([r['psnr'] for r in runs.values()])} | "
                     f"{_mean_sd([run_bits(r) for r in runs.values()])} | {_mean_se(dpsnr)} | {_mean_se(dbits)} | "
                     f"{share} | {gap} |")
        previous = runs
    return "\n".join(lines)


def frontier_plot(found: dict, roots: list, path: Path) -> None:
    """PSNR against bits per latent position, one line per family of runs (``frontier_family``), a point per K, FSQ level
    set or beta range (``frontier_point``), in order of rate, at the mean over seeds with the sample standard deviation as error bars in both directions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families, spans = {}, {}
    for key, g in _in_order(found):
        spans.setdefault(frontier_family(key), set()).add(g["K"])
    for key, g in _in_order(found):
        if not g.get("batch_dependent"):                      # one code per latent only (frontier_table's ‡)
            g = {**g, "spans_K": len(spans[frontier_family(key)]) > 1}
            families.setdefault(frontier_family(key), []).append((frontier_point(key, g), g))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    for fam, points in families.items():
        bits = [[run_bits(r) for r in g["runs"]] for _, g in points]
        psnr = [[r["psnr"] for r in g["runs"]] for _, g in points]
        by_rate = sorted(range(len(points)), key=lambda i: statistics.mean(bits[i]))   # the line runs along the rate
        ax.errorbar([statistics.mean(bits[i]) for i in by_rate], [statistics.mean(psnr[i]) for i in by_rate],
                    xerr=[sd(bits[i]) for i in by_rate], yerr=[sd(psnr[i]) for i in by_rate], marker="o", capsize=3,
                    label=f"{fam} ({', '.join(points[i][0] for i in by_rate)})")
    ax.set_xlabel("rate: H(code marginal), bits per latent position")
    ratios = {round(_per_image(r) / run_bits(r), 2) for g in found.values() for r in g["runs"]
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


FRONTIER_REFERENCE = "vq_ema_best_vq_ema"      # the group every other is set against at equal rate


def frontier_report(roots: list, plot_path: Path | None = None, reference: str | None = None,
                    paired: str | None = None) -> str:
    """The frontier tables of the finished runs under ``roots`` (folders of run directories): PSNR and rate per
    group of seeds, the R(D) table where the runs have rate_distortion.json, and every group against the
    ``reference`` family's frontier at equal rate (a family: the run names without _k<K>_s<seed>, e.g.
    vq_ema_best_vq_ema; None: ``FRONTIER_REFERENCE``, the table left out where it has no runs); with ``plot_path``,
    also the figure there; with ``paired`` (a group-name prefix), also ``paired_table`` of those groups."""
    found, unfinished = frontier_groups([Path(r) for r in roots])
    families = sorted({frontier_family(k) for k in found})
    if reference is not None and reference not in families:
        raise BavqError(f"No runs of the reference family '{reference}' under {', '.join(map(str, roots))}: the "
                        f"families there are {', '.join(families)}. Pass one of them as the reference (tools/"
                        "frontier_table.py --reference NAME), or add the reference's runs to the folders given.")
    reference = reference or FRONTIER_REFERENCE
    out = [frontier_table(found, unfinished)]
    if len(frontier_points(found, reference)) > 1:
        out.append(f"\nAt equal rate: each group against the `{reference}` frontier, linearly interpolated in "
                   f"bits per position between its measured points (groups outside its range of rates left out):\n")
        out.append(equal_rate_table(found, reference))
    if paired is not None:
        if not any(k.startswith(paired) for k in found):
            raise BavqError(f"No group's name starts with '{paired}' (--paired): the groups are {', '.join(sorted(found))}.")
        out.append(f"\nEach `{paired}*` group against the one before it, seed by seed (mean ± standard error of the "
                   "per-seed differences over the seeds both have):\n")
        out.append(paired_table(found, paired))
    if plot_path is not None:
        frontier_plot(found, [Path(r) for r in roots], Path(plot_path))
        out.append(f"\nplot written to {plot_path}")
    return "\n".join(out)
