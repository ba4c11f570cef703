"""Specification of the quantizers: shapes, gradients, the EMA update, Blahut-Arimoto maths."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae
from vqvae import BAQuantizer, VQEMAQuantizer, blahut_arimoto, rate_distortion_point, squared_distances

QUANTIZER_NAMES = list(vqvae.QUANTIZERS)
CODEBOOK_QUANTIZERS = ["vq_ema", "vq", "ba_vq"]          # the ones with a codebook (all but fsq)
FSQ_LEVELS = {16: [4, 4], 32: [4, 8], 512: [8, 8, 8]}


def make_quantizer(name, K=16, D=8, **kw):
    torch.manual_seed(0)
    if name == "fsq":
        kw.setdefault("fsq_levels", FSQ_LEVELS[K])
    return vqvae.QUANTIZERS[name](K, D, **kw)


def make_model(name, K=16, D=8, hidden=8):
    kw = {"fsq_levels": FSQ_LEVELS[K]} if name == "fsq" else {}
    return vqvae.VQVAE(name, codebook_size=K, latent_dim=D, hidden_dim=hidden, **kw)


def latents(B=2, D=8, H=4, W=4, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, H, W, generator=g) * scale


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_interface_shapes(name, training):
    q = make_quantizer(name, K=16, D=8).train(training)
    z = latents(B=3, D=8, H=5, W=7)
    z_q, losses, info = q(z)
    assert z_q.shape == z.shape
    stages = (len(q.stages),) if name == "rvq" else ()                # residual VQ: one index per stage
    assert info["code_indices"].shape == (3, *stages, 5, 7) and info["code_indices"].dtype == torch.long
    K = q.num_embeddings                                              # 16 (rvq: 16 per stage)
    assert info["code_counts"].shape == (K,) and int(info["code_counts"].sum()) == info["code_indices"].numel()
    assert 1.0 <= float(info["perplexity"]) <= K
    assert 0.0 < float(info["usage_rate"]) <= 1.0
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert set(losses) == set(vqvae.QUANTIZERS[name].loss_names)


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_eval_output_is_the_hard_code(name):
    """In eval mode z_q is exactly a codebook row at the reported index (BA: argmax of P)."""
    q = make_quantizer(name).eval()
    z = latents()
    z_q, _, info = q(z)
    codebook = q.codebook.detach()
    expected = codebook[info["code_indices"]].permute(0, 3, 1, 2)     # (B, D, H, W)
    torch.testing.assert_close(z_q, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_model_state_dict_is_complete(name):
    """Codebook state is in the state_dict, so a reloaded model quantizes identically."""
    m1 = make_model(name)
    m1.train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m1(x)  # one training step changes EMA buffers / nothing for BA
    m1.quantizer.set_schedule(0.5)
    torch.manual_seed(123)
    m2 = make_model(name)
    m2.load_state_dict(m1.state_dict())
    m1.eval(), m2.eval()
    with torch.no_grad():
        a, b = m1(x), m2(x)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[3]["code_indices"], b[3]["code_indices"])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_straight_through_gradient_reaches_encoder(name):
    """The reconstruction loss alone gives the encoder a gradient through the STE line."""
    torch.manual_seed(0)
    model = make_model(name).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    _, recon_loss, _, _ = model(x)
    recon_loss.backward()
    g = model.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_ste_copies_gradient_exactly():
    """d(sum(w * z_q))/dz = w: the straight-through line is an identity in the backward pass."""
    for name in CODEBOOK_QUANTIZERS:
        q = make_quantizer(name).train()
        z = latents().requires_grad_(True)
        w = torch.randn_like(z)
        z_q, _, _ = q(z)
        (w * z_q).sum().backward()
        torch.testing.assert_close(z.grad, w)


def test_vq_ema_codebook_is_not_a_parameter():
    q = make_quantizer("vq_ema")
    assert list(q.parameters()) == []
    assert {"codebook", "ema_cluster_size", "ema_w"} <= set(q.state_dict())


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


# --------------------------------------------------------------------------- VQ-EMA update by hand


@pytest.mark.parametrize("smoothing", ["overwrite", "copy"])
def test_vq_ema_one_step_equals_hand_computation(smoothing):
    """K=2, D=2, decay 0.5, epsilon 0.1; codes e0=(0,0), e1=(1,1); EMA counts (2,2), sums = 2 e.

    Inputs x1=(0.1,0), x2=(0.9,1.2), x3=(1.1,0.8): x1 -> e0, x2, x3 -> e1, so n = (1, 2),
    sum_0 = (0.1, 0), sum_1 = (2.0, 2.0).
      N   = 0.5*(2,2) + 0.5*(1,2)               = (1.5, 2.0)          (raw EMA counts)
      m_0 = 0.5*(0,0) + 0.5*(0.1,0)             = (0.05, 0)
      m_1 = 0.5*(2,2) + 0.5*(2,2)               = (2, 2)
      n_tot = 3.5; N~ = (N + 0.1) / (3.5 + 0.2) * 3.5 = (5.6/3.7, 7.35/3.7)
      e_0 = m_0 / N~_0 = (0.05*3.7/5.6, 0),   e_1 = m_1 / N~_1 = 2*3.7/7.35 * (1, 1)
    The stored counts are N~ with 'overwrite' (the original code) and the raw N with 'copy' (Sonnet).
    Output uses the old codes: z_q = (0,0), (1,1), (1,1);
    commitment = 0.25 * mean((z - z_q)^2) = 0.25 * (0.01 + 0.05 + 0.05) / 6.
    """
    q = VQEMAQuantizer(2, 2, commitment_cost=0.25, decay=0.5, epsilon=0.1, ema_smoothing=smoothing).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        q.ema_w.copy_(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
        q.ema_cluster_size.copy_(torch.tensor([2.0, 2.0]))
    x = torch.tensor([[0.1, 0.0], [0.9, 1.2], [1.1, 0.8]])          # (N, D)
    z = x.t().reshape(1, 2, 1, 3)                                     # (B=1, D=2, H=1, W=3)
    z_q, losses, info = q(z)

    assert info["code_indices"].flatten().tolist() == [0, 1, 1]
    torch.testing.assert_close(z_q.reshape(2, 3).t(), torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(losses["commitment_loss"], torch.tensor(0.25 * 0.11 / 6))
    stored = torch.tensor([5.6 / 3.7, 7.35 / 3.7]) if smoothing == "overwrite" else torch.tensor([1.5, 2.0])
    torch.testing.assert_close(q.ema_cluster_size, stored)
    torch.testing.assert_close(q.ema_w, torch.tensor([[0.05, 0.0], [2.0, 2.0]]))
    e1 = 2 * 3.7 / 7.35
    torch.testing.assert_close(q.codebook, torch.tensor([[0.05 * 3.7 / 5.6, 0.0], [e1, e1]]))


def test_vq_ema_overwrite_is_the_default_and_matches_the_original_update_over_two_steps():
    """The original code's update, transcribed (EMA counts overwritten by their smoothed values),
    against the quantizer over two steps with random data; 'copy' differs from it."""
    def original(cs, w, z, idx, K, decay=0.99, eps=1e-5):
        onehot = torch.nn.functional.one_hot(idx, K).float()
        cs = cs * decay + (1 - decay) * onehot.sum(0)
        n = cs.sum()
        cs = (cs + eps) / (n + K * eps) * n
        w = w * decay + (1 - decay) * onehot.t() @ z
        return cs, w, w / cs[:, None]
    assert VQEMAQuantizer(4, 3).ema_smoothing == "overwrite" == vqvae.Config().ema_smoothing
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 3, 2, 2, generator=g) for _ in range(2)]
    results = {}
    for smoothing in ("overwrite", "copy"):
        torch.manual_seed(0)
        q = VQEMAQuantizer(4, 3, ema_smoothing=smoothing).train()
        cs, w = q.ema_cluster_size.clone(), q.ema_w.clone()
        for z in zs:
            _, _, info = q(z)
            cs, w, e = original(cs, w, z.permute(0, 2, 3, 1).reshape(-1, 3), info["code_indices"].flatten(), 4)
        results[smoothing] = (q.codebook.clone(), e)
    torch.testing.assert_close(*results["overwrite"])
    assert not torch.allclose(*results["copy"])


def _unused_code_growth(smoothing, steps, K=512, D=16, used=85, seed=0):
    """Norm of an unused code relative to its initial norm after ``steps`` steps from the original start
    state (counts 0, sums = the uniform(-1/K, 1/K) codes), when every step assigns the same ``used``
    codes (batches of 2048 latents)."""
    torch.manual_seed(seed)
    q = VQEMAQuantizer(K, D, ema_smoothing=smoothing).train()
    e0 = q.codebook[K - 1].norm()
    idx = torch.randint(0, used, (2048,), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z = torch.randn(2048, D, generator=g) * 0.1
        counts = vqvae.code_histogram(idx, K)
        q._ema_update(z, idx, counts)
    return float(q.codebook[K - 1].norm() / e0)


@pytest.mark.slow
def test_overwrite_lets_unused_codes_recover_much_faster_than_copy():
    """With the original start state an unused code first jumps to ~decay/eps times its size; with
    'overwrite' the smoothed count it divides by grows back each step, with 'copy' it does not."""
    over = [_unused_code_growth("overwrite", s) for s in (10, 100)]
    copy = [_unused_code_growth("copy", s) for s in (10, 100)]
    assert over[1] < over[0] and copy[0] > 1e4
    assert over[1] * 10 < copy[1]


def test_vq_ema_uses_pre_update_codebook_and_float32_under_autocast():
    q = make_quantizer("vq_ema", K=16, D=8).train()
    before = q.codebook.clone()
    z = latents()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, _, info = q(z)
    expected = before[info["code_indices"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q.float(), expected, rtol=0, atol=1e-6)   # z + (z_q - z) rounds
    assert not torch.equal(before, q.codebook)                     # the step did update it
    for name in ("codebook", "ema_w", "ema_cluster_size"):
        assert getattr(q, name).dtype == torch.float32


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_argmin_is_float32_under_autocast(name):
    """Near-tie codes: bf16 distances would pick wrong codes; the quantizer must not."""
    g = torch.Generator().manual_seed(0)
    D, K = 64, 32
    centres = torch.randn(K // 2, D, generator=g)
    base = torch.cat([centres, centres + 0.02 * torch.randn(K // 2, D, generator=g)])   # pairs of near codes
    q = make_quantizer(name, K=K, D=D).eval()
    if name == "ba_vq":
        q.beta.fill_(1e6)  # hard assignments: argmax P = argmin d
    with torch.no_grad():
        q.codebook.copy_(base)
    pick = torch.randint(0, K // 2, (512,), generator=g)
    z_flat = (base[pick] + base[pick + K // 2]) / 2 + 0.005 * torch.randn(512, D, generator=g)
    z_flat = z_flat.bfloat16().float()                  # representable in bf16: only the maths may differ
    z = z_flat.reshape(8, 8, 8, D).permute(0, 3, 1, 2)
    exact = squared_distances(z_flat, base).argmin(1)
    bf16 = squared_distances(z_flat.bfloat16(), base.bfloat16()).float().argmin(1)
    assert (bf16 != exact).any(), "test premise: bf16 distances must be wrong somewhere"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, info = q(z.bfloat16())
    assert torch.equal(info["code_indices"].flatten(), exact)


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_eval_forward_leaves_state_dict_bit_identical(name):
    torch.manual_seed(0)
    model = make_model(name)
    model.train()
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    model(x)  # make EMA buffers non-trivial
    model.quantizer.set_schedule(0.4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x)
    model(x)  # with grad enabled too
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_vq_ema_train_forward_changes_buffers():
    q = make_quantizer("vq_ema").train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(latents())
    assert all(not torch.equal(before[k], v) for k, v in q.state_dict().items())


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


# --------------------------------------------------------------------------- every coefficient matters


@pytest.mark.parametrize("name,param,value,what", [
    ("vq_ema", "commitment_cost", 1.0, "commitment_loss"),
    ("vq_ema", "decay", 0.5, "codebook"),
    ("vq_ema", "epsilon", 1e-1, "codebook"),
    ("ba_vq", "commitment_cost", 1.0, "commitment_loss"),
    ("ba_vq", "entropy_cost", 0.5, "entropy_loss"),
    ("ba_vq", "codebook_cost", 3.0, "codebook_loss"),
    ("ba_vq", "ba_iterations", 1, "entropy_loss@end"),
    ("ba_vq", "beta_start", 2.0, "entropy_loss"),
    ("ba_vq", "beta_end", 20.0, "entropy_loss@end"),
])
def test_every_coefficient_changes_behaviour(name, param, value, what):
    def run(**kw):
        q = make_quantizer(name, **kw).train()
        if what.endswith("@end"):
            q.set_schedule(1.0)
        else:
            q.set_schedule(0.0)
        _, losses, _ = q(latents(scale=0.5))
        key = what.split("@")[0]
        return (q.codebook.detach().clone() if key == "codebook" else losses[key].detach())
    assert not torch.allclose(run(), run(**{param: value}))


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


def test_fused_ba_backward_is_finite_and_exact_in_float32_with_far_codes():
    """A code thousands of units away (its Q underflows far below float32's range in linear space) at
    a large beta: the float32 fused gradients are finite and equal the float64 autograd ones."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64)
    E = torch.randn(6, 4, generator=g, dtype=torch.float64)
    E[0] += 60.0                                                      # d ~ 3600: beta d ~ 1.8e5
    w = torch.randn(40, 4, generator=g, dtype=torch.float64)
    grads = {}
    for name, dtype in (("fused32", torch.float32), ("autograd64", torch.float64)):
        zz, EE = z.to(dtype).clone().requires_grad_(True), E.to(dtype).clone().requires_grad_(True)
        if name == "fused32":
            zq, lq, _ = vqvae.ba_soft_quantize(zz, EE, 50.0, 4, 16)
        else:
            _, lq = blahut_arimoto(squared_distances(zz, EE), 50.0, 4)                  # entropy: z and E
            log_p, _ = blahut_arimoto(squared_distances(zz.detach(), EE), 50.0, 4)     # z_q: E only (sg[z])
            zq = log_p.exp() @ EE
        assert lq[0] < -1000                                          # the far code's mass: e^(-thousands)
        ((w.to(dtype) * zq).sum() - (lq.exp() * lq).sum()).backward()
        grads[name] = (zz.grad.double(), EE.grad.double())
    for a, b in zip(grads["fused32"], grads["autograd64"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


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


def test_vq_ema_seed_start_state_and_the_ema_init_count_option():
    """The original code starts EMA counts at 0 and EMA sums at the codes: after one step every unused code
    is e * decay / (~eps) (a jump of ~1e5 in norm). ema_init_count = c starts counts at c and sums at
    c * code, so an unused code keeps its scale (decay * c e / (decay * c) = e, up to smoothing)."""
    z = latents(B=2, D=8, H=4, W=4, scale=0.2)
    for c, max_ratio in ((0.0, None), (1.0, 1.01)):
        torch.manual_seed(0)
        q = VQEMAQuantizer(64, 8, ema_init_count=c).train()
        before = q.codebook.norm(dim=1).clone()
        _, _, info = q(z)
        unused = info["code_counts"] == 0
        assert unused.sum() > 10
        ratio = q.codebook.norm(dim=1)[unused] / before[unused]
        if c == 0:
            assert (ratio > 1e3).all()                                  # the original code's artefact, kept by default
        else:
            assert (ratio < max_ratio).all() and (ratio > 0.99).all()
            torch.testing.assert_close(q.ema_cluster_size[unused], torch.full((int(unused.sum()),), 0.99))
