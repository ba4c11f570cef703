"""The rate-distortion curve by Blahut-Arimoto (``vqvae.rate_distortion_curve``), checked against
information theory: the binary symmetric source under Hamming distortion, a Gaussian source, the slope of
the curve, and a deterministic nearest-code quantizer sitting on or above the curve of its own codebook."""
import math

import pytest
import torch

import vqvae


def h2(p):
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_binary_symmetric_source_under_hamming_distortion_is_one_minus_h_of_d():
    """X ~ Bernoulli(1/2), reproduction {0, 1}, d = Hamming: R(D) = 1 - h(D) for D <= 1/2; the optimal
    test channel flips with probability D = 1 / (1 + e^beta)."""
    hamming = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for p in vqvae.rate_distortion_curve(hamming, [0.5, 1.0, 2.0, 4.0, 8.0]):
        D = p["distortion"]
        assert D == pytest.approx(1 / (1 + math.exp(p["beta"])), abs=1e-9)
        assert p["rate_bits"] == pytest.approx(1 - h2(D), abs=1e-9)


def test_a_biased_source_through_weights():
    """Bernoulli(0.2) with Hamming distortion: R(D) = h(0.2) - h(D) for D <= 0.2 (Cover & Thomas 10.3.1)."""
    hamming = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for p in vqvae.rate_distortion_curve(hamming, [2.0, 3.0, 5.0], weights=torch.tensor([0.8, 0.2])):
        assert p["distortion"] < 0.2
        assert p["rate_bits"] == pytest.approx(h2(0.2) - h2(p["distortion"]), abs=1e-7)


def test_gaussian_source_with_a_fine_alphabet_approaches_half_log_sigma2_over_d():
    """N(0, 1) on a fine grid (weights from the density), the same grid as reproduction alphabet, squared
    error: R(D) = 1/2 log2(1 / D) for D < 1, to within the discretisation."""
    x = torch.linspace(-6, 6, 601, dtype=torch.float64)
    w = torch.exp(-x ** 2 / 2)
    d = (x[:, None] - x[None, :]) ** 2
    for p in vqvae.rate_distortion_curve(d, [2.0, 5.0, 20.0], weights=w):
        assert 0 < p["distortion"] < 1
        assert p["rate_bits"] == pytest.approx(0.5 * math.log2(1 / p["distortion"]), abs=0.01)
        assert p["distortion"] == pytest.approx(1 / (2 * p["beta"]), rel=0.02)   # D = 1/(2 beta) for a Gaussian


def test_the_slope_of_the_curve_is_minus_beta_over_ln_2():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 2, generator=g, dtype=torch.float64)
    codes = torch.randn(16, 2, generator=g, dtype=torch.float64)
    d = vqvae.squared_distances(z, codes)
    for beta in (1.0, 3.0):
        a, b = vqvae.rate_distortion_curve(d, [beta - 1e-3, beta + 1e-3])
        slope = (b["rate_bits"] - a["rate_bits"]) / (b["distortion"] - a["distortion"])
        assert slope == pytest.approx(-beta / math.log(2), rel=1e-3)


def test_a_nearest_code_quantizer_sits_on_or_above_the_curve_of_its_own_codebook():
    """Deterministic nearest-code assignment: rate = H(code marginal), distortion D_nn = mean d to the code,
    the smallest distortion the alphabet allows (the curve's beta -> infinity end). Every point of the curve
    has D >= D_nn, so R(D) <= R(D_nn) <= H(nn): the quantizer sits on or above the curve."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64)
    codes = torch.randn(32, 3, generator=g, dtype=torch.float64)
    d = vqvae.squared_distances(z, codes)
    nearest = d.argmin(1)
    rate_nn = float(vqvae.entropy_bits(torch.bincount(nearest, minlength=32)))
    dist_nn = float(d.gather(1, nearest[:, None]).mean())
    curve = vqvae.rate_distortion_curve(d, [0.5 * 1.2 ** i for i in range(40)])
    assert all(p["distortion"] >= dist_nn - 1e-12 and p["rate_bits"] <= rate_nn + 1e-9 for p in curve)
    assert curve[-1]["distortion"] == pytest.approx(dist_nn, rel=1e-3)   # the sweep reaches its end
    assert curve[-1]["rate_bits"] == pytest.approx(rate_nn, abs=0.01)     # and approaches it from below
    assert all(a["rate_bits"] <= b["rate_bits"] + 1e-12 and a["distortion"] >= b["distortion"] - 1e-12
               for a, b in zip(curve, curve[1:]))                        # R falls as D grows along the sweep
