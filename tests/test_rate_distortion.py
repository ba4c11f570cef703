"""The rate-distortion curve by Blahut-Arimoto (``vqvae.rate_distortion_curve``), checked against
information theory: the binary symmetric source under Hamming distortion, a Gaussian source, the slope of
the curve, and a deterministic nearest-code quantizer sitting on or above the curve of its own codebook."""
import math

import pytest
import torch

import vqvae


@pytest.mark.parametrize("beta,steps", [(0.3, 1), (1.3, 6), (7.0, 25)])
def test_the_curve_and_the_training_iteration_are_the_same_alternation(beta, steps):
    """``rate_distortion_curve`` (exp domain, float64) stopped after ``steps`` alternations (never converged:
    tol -1) is ``vqvae.blahut_arimoto`` (log space) run for ``steps`` iterations from the uniform Q: the same
    marginal Q and the same (rate, distortion) of the last P, for a uniform source."""
    g = torch.Generator().manual_seed(steps)
    d = torch.rand(50, 7, generator=g, dtype=torch.float64) * 3
    point = vqvae.rate_distortion_curve(d, [beta], tol=-1.0, max_iterations=steps)[0]
    assert point["iterations"] == steps
    log_p, log_q = vqvae.blahut_arimoto(d, beta, steps)
    torch.testing.assert_close(point["log_q"].exp(), log_q.exp(), rtol=1e-12, atol=1e-14)
    rate, dist = vqvae.rate_distortion_point(d, log_p)
    assert point["rate_bits"] == pytest.approx(rate, rel=1e-10, abs=1e-12)
    assert point["distortion"] == pytest.approx(dist, rel=1e-10)


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


def test_the_certificate_bounds_how_far_each_point_lies_above_the_curve():
    """With rate_tol_bits the iterations stop early; each point lies above R(D) = 1 - h(D) (binary symmetric
    source) by at most its excess_bits, which is below the tolerance."""
    hamming = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    skew = torch.log(torch.tensor([0.9, 0.1], dtype=torch.float64))        # start far from the optimum
    for beta in (0.5, 1.5, 3.0):
        p = vqvae.rate_distortion_curve(hamming, [beta], rate_tol_bits=1e-3, log_q0=skew)[0]
        above = p["rate_bits"] - (1 - h2(p["distortion"]))
        assert -1e-12 <= above <= p["excess_bits"] < 1e-3
        assert p["iterations"] > 1


def test_a_sweep_runs_from_the_rate_zero_end_to_the_nearest_letter_end():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(300, 2, generator=g, dtype=torch.float64)
    codes = torch.randn(24, 2, generator=g, dtype=torch.float64)
    d = vqvae.squared_distances(z, codes)
    pts = vqvae.trace_rate_distortion(d)
    assert pts[0]["beta"] == 0 and pts[0]["rate_bits"] == 0
    assert pts[0]["distortion"] == pytest.approx(float(d.mean(0).min()))        # the best single letter
    nearest = d.argmin(1)
    assert pts[-1]["beta"] == math.inf
    assert pts[-1]["distortion"] == pytest.approx(float(d.min(1).values.mean()))
    assert pts[-1]["rate_bits"] == pytest.approx(float(vqvae.entropy_bits(torch.bincount(nearest, minlength=24))))
    inner = pts[1:-1]
    assert len(inner) > 10 and all(p["excess_bits"] < 1e-3 or p["iterations"] == 2000 for p in inner)
    assert sum(p["excess_bits"] < 1e-3 for p in inner) >= 0.8 * len(inner)
    assert inner[-1]["distortion"] - pts[-1]["distortion"] <= 1e-3 * (pts[0]["distortion"] - pts[-1]["distortion"])
    assert all(a["distortion"] >= b["distortion"] - 1e-12 for a, b in zip(pts, pts[1:]))
    cold = vqvae.rate_distortion_curve(d, [1.0, 5.0], max_iterations=3)           # far from converged
    for line in inner + cold:                 # every certified line lies below every achieved point
        for p in pts[:-1] + cold:
            assert p["rate_bits"] >= line["intercept_bits"] - line["beta"] / math.log(2) * p["distortion"] - 1e-9


def test_interpolation_on_the_binary_curve_is_bracketed_by_hull_and_lines():
    """R(D) = 1 - h(D) between swept points: the hull of the points lies above, the certified lines below;
    the same for D(R)."""
    hamming = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    Ds = (0.02, 0.1, 0.25, 0.4)
    coarse = vqvae.trace_rate_distortion(hamming, rate_tol_bits=1e-9, points_per_octave=1)
    pts = vqvae.trace_rate_distortion(hamming, rate_tol_bits=1e-9, points_per_octave=1, refine_distortions=Ds,
                                      refine_rates=[1 - h2(D) for D in Ds], refine_bits=0.005)
    for D in Ds:
        wide, at = vqvae.curve_rate_at(coarse, D), vqvae.curve_rate_at(pts, D)
        for a in (wide, at):
            assert a["rate_bits"] - a["interpolation_bits"] - 1e-9 <= 1 - h2(D) <= a["rate_bits"] + 1e-9
        assert at["interpolation_bits"] <= 0.005                                      # refined where asked
    assert max(vqvae.curve_rate_at(coarse, D)["interpolation_bits"] for D in Ds) > 0.05
    for D in Ds:
        at = vqvae.curve_distortion_at(pts, 1 - h2(D))
        assert at["distortion"] - at["interpolation"] - 1e-9 <= D <= at["distortion"] + 1e-9
        assert at["interpolation_bits"] <= 0.005
    assert vqvae.curve_rate_at(pts, 0.6) == {"rate_bits": 0.0, "interpolation_bits": 0.0}    # beyond D_max
    assert vqvae.curve_rate_at(pts, -0.01) is None                                     # below D_nn = 0
    assert vqvae.curve_distortion_at(pts, 5.0) == {"distortion": 0.0, "interpolation": 0.0,
                                                   "interpolation_bits": 0.0}          # the curve's end


def test_the_curves_ends_are_read_within_their_rounding_tolerance():
    """A distortion a hair (< 1e-9 relative) below the hull's first point whose beta is finite (the curve stopped
    short of D_nn), and a rate at or below the hull's lowest: both read the end point instead of failing."""
    pts = [{"distortion": 1.0, "rate_bits": 2.0, "beta": 5.0, "intercept_bits": None},
           {"distortion": 2.0, "rate_bits": 0.5, "beta": 1.0, "intercept_bits": None}]
    assert vqvae.curve_rate_at(pts, 1.0 - 1e-12)["rate_bits"] == 2.0
    assert vqvae.curve_distortion_at(pts, 0.5)["distortion"] == 2.0
    assert vqvae.curve_distortion_at(pts, 0.2)["distortion"] == 2.0


def test_gaussian_reverse_water_filling_by_hand():
    """Eigenvalues (4, 1): D = 1.5 waters both components to theta = 0.75, R = 1/2 log2(4/.75) + 1/2 log2(1/.75);
    D = 2.5 leaves the small one at its variance, theta = 1.5, R = 1/2 log2(4/1.5)."""
    lam = torch.tensor([4.0, 1.0])
    assert vqvae.gaussian_rate_distortion(lam, 1.5) == pytest.approx(0.5 * math.log2(4 / .75) + 0.5 * math.log2(1 / .75))
    assert vqvae.gaussian_rate_distortion(lam, 2.5) == pytest.approx(0.5 * math.log2(4 / 1.5))
    assert vqvae.gaussian_rate_distortion(lam, 5.0) == 0.0
    for D in (0.3, 1.5, 2.5, 4.9):
        R = vqvae.gaussian_rate_distortion(lam, D)
        assert vqvae.gaussian_distortion_rate(lam, R) == pytest.approx(D, rel=1e-9)


def test_a_sampled_gaussian_with_a_fine_alphabet_follows_reverse_water_filling():
    """2000 samples of N(0, diag(4, 1)) against a grid of letters: the empirical source's R(D) follows the
    Gaussian's (to sampling and grid error) where it is far from the log2(2000) ceiling."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    axis = torch.linspace(-6, 6, 25, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)                                      # (625, 2), step 0.5
    Ds = (0.4, 1.0, 2.0, 3.5)
    pts = vqvae.trace_rate_distortion(vqvae.squared_distances(x, grid), rate_tol_bits=1e-2, points_per_octave=2,
                                      max_iterations=200, refine_distortions=Ds)
    for D in Ds:
        at = vqvae.curve_rate_at(pts, D)
        assert at["interpolation_bits"] <= 0.03                  # iterations stop at 0.01 bits of excess
        assert at["rate_bits"] == pytest.approx(vqvae.gaussian_rate_distortion(torch.tensor([4.0, 1.0]), D), abs=0.05)


# ----------------------------------------------------------------------------- a model's own latents

RD_QUANTIZERS = [n for n, c in vqvae.QUANTIZERS.items()
                 if c.rate_distortion_source is not vqvae.Quantizer.rate_distortion_source]
SMALL = {"codebook_size": 64, "latent_dim": 16, "hidden_dim": 16}


def small_model(name: str) -> vqvae.VQVAE:
    torch.manual_seed(0)
    extra = {"fsq": {"fsq_levels": [4, 4, 4]}, "optvq": {"optvq_heads": 1, "optvq_eval": "nearest"}}.get(name, {})
    m = vqvae.VQVAE.from_config(vqvae.make_config({"quantizer": name, **SMALL, **extra}))
    if name == "ba_vq":         # a running marginal far from uniform: the eval codes are then not the nearest
        m.quantizer.log_q_bar.copy_(torch.randn(64).mul(3).log_softmax(0))
    if name == "ecvq":          # uneven code lengths: the eval codes are then not the nearest either
        m.quantizer.ema_cluster_size.copy_(torch.rand(64).mul(3).exp())
    return m.eval()


def test_the_analysis_is_defined_for_every_quantizer_with_an_explicit_alphabet():
    assert set(RD_QUANTIZERS) == {"vq_ema", "vq", "ba_vq", "fsq", "simvq", "sq_vae", "lfq", "ibq", "ecvq", "optvq",
                                  "bsq", "diveq", "wasserstein_vq", "nsvq"}


@pytest.mark.parametrize("setting, says", [({"optvq_heads": 4, "optvq_eval": "nearest"}, "tuple of codes"),
                                           ({"optvq_heads": 1, "optvq_eval": "sinkhorn"}, "depend on the batch")])
def test_optvq_with_several_heads_or_batch_codes_is_refused_with_why(setting, says):
    m = vqvae.VQVAE.from_config(vqvae.make_config({"quantizer": "optvq", **SMALL, **setting}))
    with pytest.raises(vqvae.BavqError, match=says):
        vqvae.latent_rate_distortion(m, vqvae._fake_images(4, 1))


@pytest.mark.parametrize("name", RD_QUANTIZERS)
def test_a_model_sits_on_or_above_the_curve_of_its_own_alphabet(name, float64):
    """Every position measured: the run's point (its eval codes) is an achievable (rate, distortion) of the
    empirical source with its own alphabet, so it lies on or above that curve, and exactly at the curve's
    end when its codes are the nearest letters. The richer alphabet (own codes + k-means) lies below. The
    run's rate is validation's log2 perplexity (in batches of 20 where the analysis takes 40 at once: in
    float64, so that the last bits in which the two batchings' latents differ cannot move a code)."""
    m = small_model(name)
    images = vqvae._fake_images(40, 1)
    out = vqvae.latent_rate_distortion(m, images, positions=10 ** 6, alphabet_size=128, kmeans_iters=3)
    assert out["positions"] == out["positions_total"] == 40 * 64 and out["kmeans_fit_on_measured"]
    run, gap = out["run"], out["gaps"]
    assert run["rate_bits"] == pytest.approx(math.log2(vqvae.validate(m, images, 20)["perplexity"]), abs=1e-6)
    own, rich = gap["codebook"], gap["kmeans"]
    assert own["rate_bits"] >= -own["rate_uncertainty_bits"] - 1e-9
    assert own["distortion"] >= -1e-5 * run["distortion"]
    assert rich["rate_bits"] >= own["rate_bits"] - 1e-3                      # a larger alphabet, a lower curve
    x, alphabet = m.quantizer.rate_distortion_source(m.encoder(vqvae.to_float(images)))
    nearest = bool((vqvae.squared_distances(x, alphabet).argmin(1)
                    == m.encode(vqvae.to_float(images)).reshape(-1)).all())
    if nearest:
        assert own["rate_bits"] == pytest.approx(0, abs=1e-4) and own["distortion"] == pytest.approx(0, abs=1e-5)
    else:
        assert own["rate_bits"] > 0.01 or own["distortion"] > 1e-3 * run["distortion"]
    assert name not in ("ba_vq", "ibq") or not nearest                     # the two that are not nearest-code
    assert gap["gaussian"]["rate_bits"] == pytest.approx(
        run["rate_bits"] - vqvae.gaussian_rate_distortion(torch.tensor(out["covariance_eigenvalues"]), run["distortion"]))


def test_the_run_distortion_is_the_commitment_mse_times_the_channels():
    """VQ-EMA's commitment loss is commitment_cost * mean over positions and channels of (z - e)^2, so the
    distortion per position (summed over channels) is that / commitment_cost * channels."""
    m = small_model("vq_ema")
    images = vqvae._fake_images(40, 1)
    out = vqvae.latent_rate_distortion(m, images, positions=512, alphabet_size=0)
    val = vqvae.validate(m, images, 20)
    assert out["run"]["distortion"] == pytest.approx(val["commitment_loss"] / m.quantizer.commitment_cost * 16, rel=1e-5)
    assert out["run"]["bits_per_image"] == pytest.approx(out["run"]["rate_bits"] * 64)
    assert set(out["gaps"]) == {"codebook", "gaussian"} and out["positions"] == 512


class ConstantEncoder(torch.nn.Module):
    """An encoder collapsed to one output: every latent position of every image is the same vector."""
    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z)                                          # (D,)

    def forward(self, x):
        return self.z[None, :, None, None].expand(x.shape[0], -1, x.shape[2] // 4, x.shape[3] // 4)


@pytest.mark.parametrize("z", ["zeros", "a vector"])
def test_latents_collapsed_to_one_vector_are_a_source_of_zero_rate(z):
    """A source of one letter: every curve is at rate 0, the run's rate is 0, its distortion is the squared
    distance to its code, and the Gaussian reference (zero covariance) is the point (0 bits, 0)."""
    m = small_model("vq_ema")
    torch.manual_seed(1)
    vec = torch.zeros(16) if z == "zeros" else torch.randn(16)
    m.encoder = ConstantEncoder(vec)
    out = vqvae.latent_rate_distortion(m, vqvae._fake_images(40, 1), positions=512, alphabet_size=16, kmeans_iters=2)
    nearest = vqvae.squared_distances(vec[None], m.quantizer.codebook).min()
    assert out["run"]["rate_bits"] == 0 and out["run"]["distortion"] == pytest.approx(float(nearest), rel=1e-5)
    assert out["gaps"]["codebook"]["rate_bits"] == 0 and out["gaps"]["codebook"]["distortion"] == pytest.approx(0, abs=1e-6)
    assert all(p["rate_bits"] == 0 for name in ("codebook", "kmeans") for p in out["curves"][name])
    assert max(out["covariance_eigenvalues"]) < 1e-12
    if z == "zeros":                                                          # exactly zero variance
        assert out["curves"]["gaussian"] == [{"rate_bits": 0.0, "distortion": 0.0}]


def test_draws_of_positions_report_their_spread():
    m = small_model("ba_vq")
    out = vqvae.latent_rate_distortion(m, vqvae._fake_images(40, 1), positions=600, alphabet_size=64, repeats=3,
                                       kmeans_iters=2)
    g = out["gaps"]["codebook"]
    assert len(g["rate_bits_draws"]) == 3 and g["rate_bits"] == pytest.approx(sum(g["rate_bits_draws"]) / 3)
    assert g["rate_bits_spread"] == pytest.approx(torch.tensor(g["rate_bits_draws"]).std().item())
    assert not out["kmeans_fit_on_measured"] and out["kmeans_positions"] == 4 * 64     # other positions: 760 left


def test_a_quantizer_without_an_explicit_alphabet_is_refused_with_the_reason():
    m = vqvae.VQVAE("rvq", 64, 16, 16)
    with pytest.raises(vqvae.BavqError, match=r"sum of one code per stage.*defined for vq_ema, vq, ba_vq"):
        vqvae.latent_rate_distortion(m, vqvae._fake_images(4, 1))


def test_a_point_stopped_early_is_the_mutual_information_and_distortion_of_its_channel():
    """max_iterations=1 from the uniform Q: the channel is P(k|x) = softmax_k(-beta d), the point is I(X; K)
    with P's own marginal and E d, by definition (so the KL(Q'||Q) term of the scalar formula is tested)."""
    g = torch.Generator().manual_seed(4)
    d = vqvae.squared_distances(torch.randn(50, 3, generator=g, dtype=torch.float64),
                                torch.randn(7, 3, generator=g, dtype=torch.float64))
    p = vqvae.rate_distortion_curve(d, [2.0], max_iterations=1)[0]
    P = torch.softmax(-2.0 * d, 1)                                                  # (N, K)
    Q = P.mean(0)
    assert p["rate_bits"] == pytest.approx(float((P * (P / Q).log2()).sum(1).mean()), rel=1e-10)
    assert p["distortion"] == pytest.approx(float((P * d).sum(1).mean()), rel=1e-12)
    assert p["excess_bits"] == pytest.approx(math.log2(float((Q * 7).max())), rel=1e-10)
