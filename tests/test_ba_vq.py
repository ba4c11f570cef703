"""BA-VQ as the method defines it: the Blahut-Arimoto iterations (Blahut 1972, Arimoto 1972) against
rate-distortion theory, the quantizer's losses and gradients against the original code and finite
differences, the beta schedule, the running marginal that evaluation uses, and the fused implementation
against autograd."""
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
    """Eval: z_q is the hard code, info['z_q_soft'] = P.E with P from Q-bar. While Q-bar is still uniform,
    that P is one BA iteration from the uniform Q, i.e. the training forward with ba_iterations = 1."""
    q = make_quantizer("ba_vq", ba_iterations=1).eval()
    q.beta.fill_(0.5)
    z = latents()
    z_q, _, info = q(z)
    assert "z_q_soft" in info and info["z_q_soft"].shape == z.shape
    assert not torch.allclose(info["z_q_soft"], z_q)   # at low beta soft != hard
    q.train()
    z_q_train, _, info_t = q(z)
    torch.testing.assert_close(z_q_train, info["z_q_soft"])


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


# --------------------------------------------------------------------------- fused BA == reference


@pytest.mark.parametrize("codebook_cost,entropy_cost", [(1.0, 0.01), (0.0, 0.5), (2.0, 0.0)])
@pytest.mark.parametrize("chunk_rows", [0, 7])
@pytest.mark.parametrize("prior", ["batch", "ema"])
@pytest.mark.parametrize("cosine,beta", [(False, 3.0), (True, 0.7)])
def test_fused_ba_equals_autograd_reference(codebook_cost, entropy_cost, chunk_rows, prior, cosine, beta):
    """Training forward: outputs, indices, every loss and the gradients of z and the codebook are
    those of autograd through every BA iteration (float64, chunks of 7 rows exercise the chunk loop
    and remainder), starting from the uniform Q or from a non-uniform running marginal."""
    out = {}
    for impl in ("autograd", "fused"):
        torch.manual_seed(0)
        q = BAQuantizer(12, 5, codebook_cost=codebook_cost, entropy_cost=entropy_cost, ba_iterations=4,
                        ba_impl=impl, ba_chunk_rows=chunk_rows, cosine=cosine, ba_prior=prior).double().train()
        q.beta.fill_(beta)
        q.log_q_bar.copy_(torch.log_softmax(torch.randn(12, generator=torch.Generator().manual_seed(3)), 0))
        z = latents(B=2, D=5, H=3, W=5, scale=0.4).double().requires_grad_(True)
        z_q, losses, info = q(z)
        w = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        total = (w * z_q).sum() + sum(losses.values())
        total.backward()
        out[impl] = (z_q.detach(), {k: v.detach() for k, v in losses.items()}, info["code_indices"],
                     z.grad.clone(), q.codebook.grad.clone())
    (zq_a, L_a, i_a, gz_a, ge_a), (zq_f, L_f, i_f, gz_f, ge_f) = out["autograd"], out["fused"]
    torch.testing.assert_close(zq_f, zq_a)
    assert torch.equal(i_f, i_a)
    for k in L_a:
        torch.testing.assert_close(L_f[k], L_a[k])
    torch.testing.assert_close(gz_f, gz_a)
    torch.testing.assert_close(ge_f, ge_a)
    assert ge_a.abs().sum() > 0


def test_fused_ba_entropy_gradient_matches_finite_differences():
    """d H(Q_T) / d z through all iterations, checked against central differences."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.5
    E = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5

    def H(zz):
        _, lq, _ = vqvae.ba_soft_quantize(zz, E, 2.0, 3, 4)
        return -(lq.exp() * lq).sum()
    zz = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(H(zz), zz)
    num = torch.zeros_like(z)
    for i in range(6):
        for j in range(3):
            zp, zm = z.clone(), z.clone()
            zp[i, j] += 1e-6
            zm[i, j] -= 1e-6
            num[i, j] = (H(zp) - H(zm)) / 2e-6
    torch.testing.assert_close(gz, num, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_normal_is_exp_with_exact_zeros_where_exp_would_be_subnormal(dtype):
    """exp_normal and its in-place form: exp(L) where exp(L) >= e x the smallest normal float, exactly 0 below
    (an entry at that floor instead of 0 makes every product with it subnormal: a matmul 90x slower on the CPU),
    -inf gives 0; the in-place form overwrites its argument and equals the other."""
    tiny = torch.finfo(dtype).tiny
    floor = math.log(tiny) + 1.0
    L = torch.tensor([0.0, -1.0, floor + 0.5, floor - 0.5, math.log(tiny) - 5.0, -1e4, -math.inf], dtype=dtype)
    want = torch.cat([L[:3].double().exp().to(dtype), torch.zeros(4, dtype=dtype)])   # L as stored in dtype
    out = vqvae.exp_normal(L)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0.0)
    assert (out[3:] == 0).all() and (out[:3] >= math.e * tiny).all()
    L2 = L.clone()
    assert torch.equal(vqvae.exp_normal_(L2), out) and torch.equal(L2, out)
    buf = torch.empty_like(L)
    assert torch.equal(vqvae.exp_normal_to(L, buf), out) and torch.equal(buf, out)


@pytest.mark.parametrize("linear_sums", [True, False])
@pytest.mark.parametrize("log_q0", [False, True])
def test_fused_ba_column_sums_in_linear_or_log_space_equal_the_reference(linear_sums, log_q0):
    """The fused forward's two forms of sum_x P_t(k|x) (linear with the log-space fallback: the CPU path;
    log space: the GPU and compiled path) give the autograd reference's z_q, log Q, codes, diagnostics,
    centroid sums and gradients (float64, chunks of 7 rows), from the uniform Q or a given Q_0."""
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(30, 4, generator=g, dtype=torch.float64)
    E0 = torch.randn(9, 4, generator=g, dtype=torch.float64)
    q0 = torch.log_softmax(torch.randn(9, generator=g, dtype=torch.float64), 0) if log_q0 else None
    w = torch.randn(30, 4, generator=g, dtype=torch.float64)
    z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    zq, lq, idx, diag, sums = vqvae.ba_soft_quantize(z, E, 1.5, 4, 7, log_q0=q0, full=True, centroid_sums=True,
                                                     linear_sums=linear_sums)
    ((w * zq).sum() - (lq.exp() * lq).sum()).backward()
    zr, Er = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    d = squared_distances(zr, Er)
    _, lq_r = blahut_arimoto(d, 1.5, 4, q0)                                       # entropy: z and E
    log_p, _ = blahut_arimoto(squared_distances(zr.detach(), Er), 1.5, 4, q0)    # z_q: E only (sg[z])
    p = log_p.exp()
    ((w * (p @ Er)).sum() - (lq_r.exp() * lq_r).sum()).backward()
    torch.testing.assert_close(zq, (p @ Er).detach())
    torch.testing.assert_close(lq, lq_r.detach())
    assert torch.equal(idx, log_p.argmax(1))
    torch.testing.assert_close(diag, torch.cat([vqvae.distance_sums(d.detach()), vqvae.assignment_sums(log_p)]))
    torch.testing.assert_close(sums, p.t() @ z0)
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(E.grad, Er.grad)


@pytest.mark.parametrize("linear_sums", [True, False])
def test_fused_ba_backward_is_finite_and_exact_in_float32_with_far_codes(linear_sums):
    """A code thousands of units away (its Q underflows far below float32's range in linear space) at
    a large beta: the float32 fused log Q and gradients are finite and equal the float64 autograd ones,
    with the forward's column sums in linear space (the far code's column is recomputed in log space)
    or in log space throughout."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64)
    E = torch.randn(6, 4, generator=g, dtype=torch.float64)
    E[0] += 60.0                                                      # d ~ 3600: beta d ~ 1.8e5
    w = torch.randn(40, 4, generator=g, dtype=torch.float64)
    grads = {}
    for name, dtype in (("fused32", torch.float32), ("autograd64", torch.float64)):
        zz, EE = z.to(dtype).clone().requires_grad_(True), E.to(dtype).clone().requires_grad_(True)
        if name == "fused32":
            zq, lq, _ = vqvae.ba_soft_quantize(zz, EE, 50.0, 4, 16, linear_sums=linear_sums)
        else:
            _, lq = blahut_arimoto(squared_distances(zz, EE), 50.0, 4)                  # entropy: z and E
            log_p, _ = blahut_arimoto(squared_distances(zz.detach(), EE), 50.0, 4)     # z_q: E only (sg[z])
            zq = log_p.exp() @ EE
        assert lq[0] < -1000                                          # the far code's mass: e^(-thousands)
        ((w.to(dtype) * zq).sum() - (lq.exp() * lq).sum()).backward()
        grads[name] = (zz.grad.double(), EE.grad.double(), lq.detach().double())
    for a, b in zip(grads["fused32"], grads["autograd64"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("linear_sums", [True, False])
def test_fused_ba_gradient_of_a_far_codes_log_q_equals_autograd(linear_sums):
    """A loss that weights log Q_T of every code, a far one included (d ~ 3600, beta 50: its Q is e^(-1.8e5), every
    P(k|x) of it far below float range's reach): d log Q_far / dz and dE are not small (moving the code toward the
    data raises its log Q), and the fused backward gets them from W_t = P_t / (N Q_t) in its shifted columns
    (``_column_shift``), in float64 as autograd does, and in chunks of 7 rows."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(30, 4, generator=g, dtype=torch.float64)
    E0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    E0[0] += 30.0
    c = torch.randn(6, generator=g, dtype=torch.float64)
    w = torch.randn(30, 4, generator=g, dtype=torch.float64)
    z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    zq, lq, _ = vqvae.ba_soft_quantize(z, E, 50.0, 4, 7, linear_sums=linear_sums)
    assert lq[0] < -1000
    ((w * zq).sum() + (c * lq).sum()).backward()
    zr, Er = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    _, lq_r = blahut_arimoto(squared_distances(zr, Er), 50.0, 4)
    log_p, _ = blahut_arimoto(squared_distances(zr.detach(), Er), 50.0, 4)
    ((w * (log_p.exp() @ Er)).sum() + (c * lq_r).sum()).backward()
    assert Er.grad[0].abs().max() > 1.0                               # the far code's log Q pulls it
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(E.grad, Er.grad)


def _sharp_beta_gradients(seed: int, beta: float, loss: str, impl: str, dtype: torch.dtype):
    """Gradients (z, codebook) of BA-VQ's training forward (N = 64 latents of 8 dims, K = 16 codes of which three
    lie far from every latent, 5 iterations, fixed absolute beta) under its default losses plus a decoder term
    (``default``) or under the entropy term alone (``entropy``). Latents and codes lie on a grid of 1/8, so that
    squared distances and beta x distances are exact in float32 as in float64: the float32 paths and the float64
    reference start from the same logits, and only the BA iterations and their backward round."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 8, generator=g, dtype=torch.float64)
    E = torch.randn(16, 8, generator=g, dtype=torch.float64)
    E[:3] += 6.0 * torch.randn(3, 8, generator=g, dtype=torch.float64).sign()        # three far codes
    z, E = (z * 8).round() / 8, (E * 8).round() / 8
    w = torch.randn(64, 8, generator=g, dtype=torch.float64)
    costs = dict(commitment_cost=0.25, entropy_cost=0.01, codebook_cost=1.0) if loss == "default" else \
        dict(commitment_cost=0.0, entropy_cost=1.0, codebook_cost=0.0)
    q = BAQuantizer(16, 8, ba_iterations=5, ba_impl=impl, **costs).to(dtype).train()
    q.beta.fill_(beta)
    with torch.no_grad():
        q.codebook.copy_(E)
    zz = latent_grid(z.to(dtype)).requires_grad_(True)
    z_q, losses, _ = q(zz)
    total = sum(losses.values()) + ((latent_grid(w.to(dtype)) * z_q).mean() if loss == "default" else 0.0)
    total.backward()
    return zz.grad.double(), q.codebook.grad.double()


@pytest.mark.parametrize("beta", [0.5, 20.0, 200.0, 2000.0])
@pytest.mark.parametrize("loss", ["default", "entropy"])
def test_fused_float32_gradients_are_as_accurate_as_autograd_at_any_beta(beta, loss):
    """The fused backward in float32 is as accurate as autograd's in float32, against a float64 reference, from a
    soft (beta 0.5) to a hard (beta 2000, logit gaps of thousands) assignment, with three far codes: summed over
    8 draws, its max-abs error of dz and of dE is at most 4x autograd's plus 1e-5 of the reference's max-abs plus
    1e-30. Summing over draws is what keeps the bound machine-independent: both errors are float32 rounding,
    and on one draw either may land well below its typical size (seen: a 6x ratio either way). The 1e-30: the
    fused pass flushes entries of P below e x float32's smallest normal (3.2e-38) to 0 for speed, which loses
    gradients of 1e-36 and below (beta 2000, where every larger term cancels exactly; autograd keeps them as
    subnormals), 22 orders below Adam's epsilon. Before the fix (W_t rebuilt by subtracting large log values,
    its columns assumed to sum to 1, P_t as W_t N Q_t) the fused error at beta 200 was 10-60x autograd's."""
    err = {"fused": torch.zeros(2), "autograd": torch.zeros(2)}
    scale = torch.zeros(2)
    for seed in range(8):
        ref = _sharp_beta_gradients(seed, beta, loss, "autograd", torch.float64)
        scale += torch.tensor([r.abs().max().item() for r in ref])
        for impl in err:
            got = _sharp_beta_gradients(seed, beta, loss, impl, torch.float32)
            err[impl] += torch.tensor([(a - r).abs().max().item() for a, r in zip(got, ref)])
    bound = 4 * err["autograd"] + 1e-5 * scale + 1e-30
    assert (err["fused"] <= bound).all(), (err, scale)
    assert scale[1] > 0


@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_fused_ba_keeps_one_n_by_k_matrix_for_the_backward(impl):
    """What BA-VQ's training forward saves for the backward (the memory that limits K at a batch):
    the fused path one (N, K) matrix plus (N, D) and (K,) tensors; autograd at least one per iteration."""
    B, D, H, W, K, T = 4, 4, 16, 16, 256, 5
    N = B * H * W
    q = BAQuantizer(K, D, ba_iterations=T, ba_impl=impl).train()
    z = latents(B=B, D=D, H=H, W=W, scale=0.4).requires_grad_(True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(z)
    saved, nk = sum(storages.values()), N * K * 4
    if impl == "fused":
        assert nk <= saved <= nk + 16 * N * D * 4 + 4 * (T + 1) * K * 4
    else:
        assert saved >= T * nk


def test_the_kept_backward_accumulators_carry_nothing_from_one_step_to_the_next():
    """BA-VQ's fused backward keeps its two (N, K) accumulators between steps on the CPU (``BAWorkspace``):
    a second backward on other latents, through the same workspace, gives the gradients of a fresh one, and
    a batch of another size gets tensors of its own size; a copy of the model starts with none."""
    import copy
    g = torch.Generator().manual_seed(4)
    E0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ws = vqvae.BAWorkspace()

    def grads(z0, workspace):
        z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
        zq, lq, _ = vqvae.ba_soft_quantize(z, E, 2.0, 3, 4, workspace=workspace)
        ((zq * z0.flip(0)).sum() - (lq.exp() * lq).sum()).backward()
        return z.grad, E.grad
    for n in (12, 12, 9):
        z0 = torch.randn(n, 3, generator=g, dtype=torch.float64)
        for a, b in zip(grads(z0, ws), grads(z0, None)):
            assert torch.equal(a, b)
        assert ws._kept["dA"].shape == (n, 7) and ws._kept["dA_b"].shape == (n, 7)
    q = BAQuantizer(8, 3).train()
    q(latents(B=1, D=3, H=2, W=2, scale=0.4).requires_grad_(True))[1]["entropy_loss"].backward()
    assert q._ba_workspace._kept and not copy.deepcopy(q)._ba_workspace._kept
    q.eval()                                                     # validation does not hold them
    assert not q._ba_workspace._kept
