"""BA-VQ as the method defines it: the Blahut-Arimoto iterations (Blahut 1972, Arimoto 1972) against
rate-distortion theory, the quantizer's losses and gradients against the original code and finite
differences, the beta schedule and the running marginal that evaluation uses (the fused fast path against this reference:
tests/test_ba_fused.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae
from vqvae import BAQuantizer, blahut_arimoto, rate_distortion_point, squared_distances
from conftest import latent_grid, latents, make_quantizer


# --------------------------------------------------------------------------- Blahut-Arimoto


def test_ba_rows_sum_to_one_and_q_is_mean_of_p():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(50, 12, generator=g) * 4
    for beta in (0.1, 2.0, 30.0):
        log_p, log_q = blahut_arimoto(d, beta, 7)
        p = log_p.exp()
        torch.testing.assert_close(p.sum(1), torch.ones(50))
        torch.testing.assert_close(log_q.exp(), p.mean(0))
        assert (p >= 0).all()


def test_ba_one_iteration_is_softmax_of_distances():
    """From a uniform Q the first E-step is softmax(-beta d)."""
    d = torch.rand(10, 5)
    log_p, _ = blahut_arimoto(d, 1.7, 1)
    torch.testing.assert_close(log_p.exp(), torch.softmax(-1.7 * d, dim=1))


def test_ba_two_iterations_by_hand():
    """Two points, two codes: d = [[0, 1], [1, 0]] with the source skewed by a third row [0, 1]."""
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    beta = math.log(3.0)                  # exp(-beta) = 1/3
    log_p, log_q = blahut_arimoto(d, beta, 2)
    # iteration 1: P rows (3/4, 1/4), (1/4, 3/4), (3/4, 1/4); Q = (7/12, 5/12)
    # iteration 2: P(k|x) ∝ Q(k) * 3^{-d}: row0 ∝ (7/12, 5/36) -> (21/26, 5/26); row1 ∝ (7/36, 5/12) -> (7/22, 15/22)
    p = log_p.exp()
    torch.testing.assert_close(p[0], torch.tensor([21 / 26, 5 / 26]))
    torch.testing.assert_close(p[1], torch.tensor([7 / 22, 15 / 22]))
    torch.testing.assert_close(log_q.exp(), torch.tensor([(2 * 21 / 26 + 7 / 22) / 3, (2 * 5 / 26 + 15 / 22) / 3]))


def test_ba_large_beta_is_nearest_neighbour():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 6, generator=g)
    E = torch.randn(20, 6, generator=g)
    d = squared_distances(z, E)
    log_p, _ = blahut_arimoto(d, 1e4, 5)
    assert torch.equal(log_p.argmax(1), d.argmin(1))
    assert (log_p.exp().max(1).values > 0.999).all()


def test_ba_quantizer_large_beta_equals_vq_assignment():
    q = make_quantizer("ba_vq", K=16, D=8).eval()
    q.beta.fill_(1e4)
    z = latents(scale=0.2)
    _, _, info = q(z)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(info["code_indices"].flatten(), squared_distances(z_flat, q.codebook.detach()).argmin(1))


@pytest.mark.parametrize("beta", [0.1, 5.0, 1e3])
def test_ba_no_nan_at_huge_distances(beta):
    """Squared distances ~1e6: exp(-beta d) underflows in the probability domain, not in log space."""
    q = make_quantizer("ba_vq", K=16, D=8).train()
    q.beta.fill_(beta)
    z = (latents(scale=1.0) * 300).requires_grad_(True)            # d ~ 8 * 300^2 ~ 7e5
    z_q, losses, info = q(z)
    d = squared_distances(z.detach().permute(0, 2, 3, 1).reshape(-1, 8), q.codebook.detach())
    assert d.max() > 1e5
    loss = sum(losses.values()) + z_q.square().mean()
    loss.backward()
    for t in (z_q, loss, z.grad, q.codebook.grad):
        assert torch.isfinite(t).all()
    log_p, log_q = blahut_arimoto(d, beta, 5)
    assert torch.isfinite(log_p).all() and torch.isfinite(log_q).all()
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(d.shape[0]))


def _h2(p):
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.0])
def test_ba_fair_binary_source_hamming_reaches_rate_distortion_function(beta):
    """Fair binary source, Hamming distortion: R(D) = 1 - H2(D), and slope beta gives D = 1/(1+e^beta)."""
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    log_p, log_q = blahut_arimoto(d, beta, 200)
    R, D = rate_distortion_point(d, log_p)
    assert abs(D - 1 / (1 + math.exp(beta))) < 1e-9
    assert abs(R - (1 - _h2(D))) < 1e-3


@pytest.mark.parametrize("beta", [pytest.param(1.5, marks=pytest.mark.slow), 2.5, pytest.param(4.0, marks=pytest.mark.slow)])
def test_ba_skewed_binary_source_converges_to_rate_distortion_function(beta):
    """Bernoulli(0.2) source (rows 0,0,0,0,1), Hamming distortion: R(D) = H2(0.2) - H2(D) for
    D < 0.2, with D = 1/(1+e^beta). Q starts uniform and must converge to the optimal output
    distribution, so this checks the alternation, not just one softmax."""
    d = torch.tensor([[0.0, 1.0]] * 4 + [[1.0, 0.0]], dtype=torch.float64)
    log_p, log_q = blahut_arimoto(d, beta, 3000)
    R, D = rate_distortion_point(d, log_p)
    D_star = 1 / (1 + math.exp(beta))
    assert abs(D - D_star) < 1e-4
    assert abs(R - (_h2(0.2) - _h2(D))) < 1e-3
    # optimal output marginal: Q(1) = (p - D) / (1 - 2D)
    assert abs(log_q.exp()[1].item() - (0.2 - D_star) / (1 - 2 * D_star)) < 1e-4
    # and the few-iteration answer is measurably off: the alternation matters here
    R1, D1 = rate_distortion_point(d, blahut_arimoto(d, beta, 1)[0])
    assert abs(R1 - (_h2(0.2) - _h2(D1))) > 1e-3


def test_rate_distortion_point_weights_q_by_the_source_weights():
    """Rows (0,1), (1,0) with p = (0.8, 0.2) are the same source as 4 copies of the first row and one
    of the second with uniform weights: same R and D (Q must be the weighted mean of P, not the plain one)."""
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    log_p = torch.log_softmax(-2.0 * d + torch.tensor([0.3, -0.3], dtype=torch.float64), dim=1)
    weighted = rate_distortion_point(d, log_p, torch.tensor([0.8, 0.2], dtype=torch.float64))
    copies = rate_distortion_point(d[[0, 0, 0, 0, 1]], log_p[[0, 0, 0, 0, 1]])
    assert weighted == pytest.approx(copies, rel=1e-12)
    assert weighted[0] != pytest.approx(rate_distortion_point(d, log_p)[0], rel=1e-3)


# --------------------------------------------------------------------------- losses and gradients


def _ba_grads(q, z, loss_fn):
    z = z.clone().requires_grad_(True)
    q.zero_grad(set_to_none=True)
    z_q, losses, info = q(z)
    loss_fn(z_q, losses).backward()
    gz = z.grad.clone() if z.grad is not None else torch.zeros_like(z)
    ge = q.codebook.grad.clone() if q.codebook.grad is not None else torch.zeros_like(q.codebook)
    return gz, ge


def test_ba_codebook_term_moves_only_the_codebook():
    """codebook_cost * mse(sg[z], P.E): non-zero codebook gradient, zero encoder gradient."""
    q = make_quantizer("ba_vq", K=16, D=8, codebook_cost=1.0).train()
    q.set_schedule(0.3)
    z = latents(scale=0.2)
    gz, ge = _ba_grads(q, z, lambda zq, L: L["codebook_loss"])
    assert ge.abs().sum() > 0
    assert torch.equal(gz, torch.zeros_like(gz))


def test_ba_codebook_term_matches_finite_differences():
    """The codebook term's gradient is that of mse(sg[z], P(z, E) E) w.r.t. E (through P too)."""
    q = make_quantizer("ba_vq", K=6, D=3, codebook_cost=2.0, ba_iterations=3).double().train()
    q.beta.fill_(3.0)
    z = latents(B=1, D=3, H=2, W=3, scale=0.5).double()
    _, ge = _ba_grads(q, z, lambda zq, L: L["codebook_loss"])

    def f(E):
        zf = z.permute(0, 2, 3, 1).reshape(-1, 3)
        lp, _ = blahut_arimoto(squared_distances(zf, E), 3.0, 3)
        return 2.0 * F.mse_loss(zf, lp.exp() @ E)

    E0 = q.codebook.detach().clone()
    num = torch.zeros_like(E0)
    h = 1e-6
    for i in range(E0.shape[0]):
        for j in range(E0.shape[1]):
            Ep, Em = E0.clone(), E0.clone()
            Ep[i, j] += h
            Em[i, j] -= h
            num[i, j] = (f(Ep) - f(Em)) / (2 * h)
    torch.testing.assert_close(ge, num, rtol=1e-5, atol=1e-8)


def test_ba_without_codebook_or_entropy_term_codebook_gets_no_gradient():
    """The original code's STE line: reconstruction + commitment send nothing to the codebook."""
    q = make_quantizer("ba_vq", codebook_cost=0.0, entropy_cost=0.0).train()
    z = latents()
    w = torch.randn_like(z)
    _, ge = _ba_grads(q, z, lambda zq, L: (w * zq).sum() + L["commitment_loss"])
    assert torch.equal(ge, torch.zeros_like(ge))


class SeedBAQuantizer(torch.nn.Module):
    """The original code's BA quantizer, transcribed from the original code (probability domain,
    Q clamped at 1e-10), used as the reference for codebook_cost = 0."""

    def __init__(self, codebook, beta, iters, commitment_cost=0.25, entropy_cost=0.01):
        super().__init__()
        self.embedding = torch.nn.Parameter(codebook.clone())
        self.beta, self.iters, self.cc, self.ec = beta, iters, commitment_cost, entropy_cost

    def forward(self, z):
        B, D, H, W = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        e = self.embedding
        distances = (z_flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z_flat @ e.t()
        K = e.shape[0]
        Q = torch.ones(K) / K
        for _ in range(self.iters):
            log_Q = torch.log(Q.clamp(min=1e-10))
            P = torch.softmax(log_Q - self.beta * distances, dim=1)
            Q = P.mean(dim=0).clamp(min=1e-10)
        z_q_soft = P @ e
        commitment = self.cc * F.mse_loss(z_flat, z_q_soft.detach())
        Qm = P.mean(dim=0)
        entropy_loss = -self.ec * (-(Qm * torch.log(Qm.clamp(min=1e-10))).sum())
        z_q = z_q_soft.reshape(B, H, W, D).permute(0, 3, 1, 2)
        z_q = z + (z_q - z).detach()
        return z_q, {"commitment_loss": commitment, "entropy_loss": entropy_loss}


def test_ba_with_codebook_cost_zero_matches_the_seed():
    """Same outputs, losses and gradients (encoder and codebook) as the original BA quantizer."""
    q = make_quantizer("ba_vq", K=16, D=8, codebook_cost=0.0, ba_iterations=5).train()
    q.beta.fill_(2.5)
    ref = SeedBAQuantizer(q.codebook.detach() + 0.0, beta=2.5, iters=5)
    z = latents(scale=0.3)
    w = torch.randn_like(z)

    z1 = z.clone().requires_grad_(True)
    zq1, L1, _ = q(z1)
    z2 = z.clone().requires_grad_(True)
    zq2, L2 = ref(z2)
    torch.testing.assert_close(zq1, zq2)
    for k in ("commitment_loss", "entropy_loss"):
        torch.testing.assert_close(L1[k], L2[k])
    assert float(L1["codebook_loss"]) == 0.0
    loss1 = (w * zq1).sum() + L1["commitment_loss"] + L1["entropy_loss"] + L1["codebook_loss"]
    loss2 = (w * zq2).sum() + L2["commitment_loss"] + L2["entropy_loss"]
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(q.codebook.grad, ref.embedding.grad)
    assert q.codebook.grad.abs().sum() > 0   # the entropy term does move the codebook


def test_ba_codebook_cost_changes_the_codebook_gradient():
    z = latents(scale=0.3)
    grads = []
    for cost in (0.0, 1.0):
        q = make_quantizer("ba_vq", codebook_cost=cost).train()
        grads.append(_ba_grads(q, z, lambda zq, L: sum(L.values()))[1])
    assert not torch.allclose(grads[0], grads[1])


# --------------------------------------------------------------------------- beta schedule, evaluation and the running marginal


def test_beta_schedule_is_cosine_from_start_to_end():
    q = make_quantizer("ba_vq", beta_start=0.5, beta_end=4.5)
    for progress, expected in [(0.0, 0.5), (0.5, 2.5), (1.0, 4.5), (0.25, 0.5 + 4 * (1 - math.cos(math.pi / 4)) / 2)]:
        q.set_schedule(progress)
        assert float(q.beta) == pytest.approx(expected)


def test_ba_eval_reports_soft_and_hard():
    """Eval: z_q is the hard code, info['other_decoder_inputs']['soft'] = P.E with P from Q-bar. While Q-bar is still uniform,
    that P is one BA iteration from the uniform Q, i.e. the training forward with ba_iterations = 1."""
    q = make_quantizer("ba_vq", ba_iterations=1).eval()
    q.beta.fill_(0.5)
    z = latents()
    z_q, _, info = q(z)
    soft = info["other_decoder_inputs"]["soft"]
    assert soft.shape == z.shape
    assert not torch.allclose(soft, z_q)   # at low beta soft != hard
    q.train()
    z_q_train, _, info_t = q(z)
    torch.testing.assert_close(z_q_train, soft)


def _ba_eval_codes(q, z):
    with torch.no_grad():
        return q.eval()(z)[2]["code_indices"]


@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_ba_code_of_an_image_does_not_depend_on_its_batch(impl):
    """Evaluation assigns every latent with the running marginal Q-bar: the codes of an image alone
    equal its codes inside any batch (a batch-computed Q would change them)."""
    q = make_quantizer("ba_vq", ba_impl=impl).train()
    q.set_schedule(0.3)
    for _ in range(3):                                   # some training steps: Q-bar is no longer uniform
        q(latents(scale=0.5))
    assert not torch.allclose(q.log_q_bar, torch.full_like(q.log_q_bar, -math.log(16)))
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(9, 8, 4, 4, generator=g) * 0.5
    alone = torch.cat([_ba_eval_codes(q, zs[i:i + 1]) for i in range(9)])
    for perm in (torch.arange(9), torch.randperm(9, generator=g)):
        together = _ba_eval_codes(q, zs[perm])
        assert torch.equal(together, alone[perm])
    together_with_others = _ba_eval_codes(q, torch.cat([zs[:3], 3.0 + torch.randn(20, 8, 4, 4, generator=g)]))[:3]
    assert torch.equal(together_with_others, alone[:3])


def test_ba_running_marginal_follows_its_ema_definition():
    """Q-bar_t = decay Q-bar_{t-1} + (1 - decay) Q_T(step t), from the uniform Q-bar_0; eval leaves it."""
    q = make_quantizer("ba_vq", marginal_decay=0.8).train()
    expect = torch.full((16,), 1 / 16, dtype=torch.float64)
    for s in range(3):
        z = latents(scale=0.5 + s)
        with torch.no_grad():
            E = q.codebook.detach()
            _, log_q = blahut_arimoto(squared_distances(q._latents(z), E).double(), float(q.beta), 5)
        q(z)
        expect = 0.8 * expect + 0.2 * log_q.exp()
        torch.testing.assert_close(q.log_q_bar.double().exp(), expect, rtol=1e-5, atol=1e-7)
    before = q.log_q_bar.clone()
    q.eval()(latents())
    assert torch.equal(q.log_q_bar, before)
    assert "quantizer.log_q_bar" in vqvae.VQVAE("ba_vq", 16, 8, 8).state_dict()   # saved and resumed


def test_ba_prior_ema_starts_the_iterations_from_the_running_marginal():
    """--ba_prior ema, one iteration: P = softmax(log Q-bar - beta d) (batch: from the uniform Q)."""
    z = latents(scale=0.5)
    log_q_bar = torch.log_softmax(torch.randn(16, generator=torch.Generator().manual_seed(1)), 0)
    out = {}
    for prior in ("batch", "ema"):
        for impl in ("fused", "autograd"):
            q = make_quantizer("ba_vq", ba_prior=prior, ba_iterations=1, ba_impl=impl).train()
            q.log_q_bar.copy_(log_q_bar)
            q.beta.fill_(2.0)
            z_q, _, _ = q(z)
            out[prior, impl] = z_q
    zf = z.permute(0, 2, 3, 1).reshape(-1, 8)
    E = make_quantizer("ba_vq").codebook.detach()
    for prior, start in (("batch", torch.full((16,), -math.log(16))), ("ema", log_q_bar)):
        p = torch.softmax(start - 2.0 * squared_distances(zf, E), dim=1)
        expect = (p @ E).reshape(z.shape[0], z.shape[2], z.shape[3], 8).permute(0, 3, 1, 2)
        for impl in ("fused", "autograd"):
            torch.testing.assert_close(out[prior, impl], expect, rtol=1e-5, atol=1e-6)


# K=3, D=2: codes (0,0), (2,0), (0,2); running marginal Q-bar = (0.3, 0.65, 0.05); four latents
_EVAL_CODES = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]
_EVAL_Q_BAR = [0.3, 0.65, 0.05]
_EVAL_LATENTS = [[0.9, 0.0], [0.0, 1.2], [1.6, 0.1], [0.1, 1.9]]


@pytest.mark.parametrize("beta,by_hand", [(1.0, [1, 0, 1, 2]), (4.0, [0, 2, 1, 2])])
@pytest.mark.parametrize("prior", ["batch", "ema"])
@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_ba_eval_code_is_the_argmax_of_log_q_bar_minus_beta_d(beta, by_hand, prior, impl):
    """Evaluation's rule (the docstring's): each latent takes argmax_k [log Q-bar(k) - beta d(x,k)], Q-bar
    the running marginal buffer (whatever ``ba_prior``, which only sets where training's iterations start),
    not the nearest code argmin_k d. By hand, d = (0.81, 1.21, 4.81), (1.44, 5.44, 0.64), (2.57, 0.17, 6.17),
    (3.62, 7.22, 0.02) and log Q-bar = (-1.204, -0.431, -2.996): at beta = 1 the prior moves the first latent
    to code 1 and the second to code 0 (nearest: 0 and 2); at beta = 4 distance wins and the codes are the
    nearest ones (so the rule is not argmax log Q-bar either). z_q is the chosen code."""
    q = BAQuantizer(3, 2, ba_impl=impl, ba_prior=prior).eval()
    E = torch.tensor(_EVAL_CODES)
    with torch.no_grad():
        q.codebook.copy_(E)
        q.log_q_bar.copy_(torch.tensor(_EVAL_Q_BAR).log())
    q.beta.fill_(beta)
    x = torch.tensor(_EVAL_LATENTS)
    # the rule in float64 with math, row by row
    ref = []
    for z in _EVAL_LATENTS:
        d = [sum((a - b) ** 2 for a, b in zip(z, e)) for e in _EVAL_CODES]
        score = [math.log(qk) - beta * dk for qk, dk in zip(_EVAL_Q_BAR, d)]
        ref.append(max(range(3), key=score.__getitem__))
    assert ref == by_hand
    if beta == 1.0:
        assert ref != squared_distances(x, E).argmin(1).tolist()        # the case tells the two rules apart
    with torch.no_grad():
        z_q, _, info = q(latent_grid(x))                                 # (B=1, D=2, H=1, W=4)
    assert info["code_indices"].flatten().tolist() == by_hand
    torch.testing.assert_close(z_q.reshape(2, 4).t(), E[by_hand])
