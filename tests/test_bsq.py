"""BSQ (Zhao, Xiong & Kraehenbuehl 2024) as the authors' code under their image-tokenizer configs: one step equals a
float64 transcription of their quantizer (zhaoyue-zephyrus/bsq-vit, transcoder/models/quantizer/bsq.py with the
model's normalisation), its entropies are LFQ's on the sphere when one group holds every bit, the entropy weight
ramps as their criterion's, and the group size must divide the bits."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae


def their_bsq(h, bits, group_size, tau=1.0, gamma0=1.0, gamma=1.0, zeta=1.0, beta=0.0):
    """BinarySphericalQuantizer.forward with soft_entropy, 'group' per-sample entropy and l2_norm (after the model's
    F.normalize), written in their order: sign with 0 -> -1, straight-through, MSB-first indices, scale 1/sqrt(bits)
    after the straight-through line; p = softmax(-(-2 <u_g, c / sqrt(bits)>) tau) over each group's 2^g patterns;
    H = -sum p log(p + 1e-8); loss = beta commit + zeta (gamma0 H_s - gamma H_c) / tau."""
    u = F.normalize(h, dim=-1)
    zhat = torch.where(u > 0, torch.ones_like(u), -torch.ones_like(u))
    zq = u + (zhat - u).detach()
    msb = ((zhat > 0).long() * 2 ** torch.arange(bits - 1, -1, -1)).sum(-1)
    G, q_scale = bits // group_size, 1.0 / math.sqrt(bits)
    d = torch.arange(2 ** group_size)[:, None]
    cb = (((d // 2 ** torch.arange(group_size - 1, -1, -1)) % 2).to(u.dtype) * 2 - 1) * q_scale
    prob = (2 * torch.einsum("ngc,dc->ngd", u.unflatten(-1, (G, group_size)), cb) * tau).softmax(-1)
    ent = lambda p: -(p * torch.log(p + 1e-8)).sum(-1)
    per_sample = ent(prob).sum(-1).mean()
    cb_entropy = ent(prob.mean(0)).sum()
    zq = zq * q_scale
    commit = beta * ((zq.detach() - u) ** 2).sum(-1).mean()
    return zq, commit + zeta * (gamma0 * per_sample - gamma * cb_entropy) / tau, msb


@pytest.mark.parametrize("K, group, tau, beta", [(512, 9, 1.0, 0.0), (512, 3, 5.0, 0.25), (64, 2, 1.0, 0.0)])
def test_one_step_equals_their_quantizer_in_float64(K, group, tau, beta):
    """The decoder input (their z_q through our output projection), the quantizer loss at the ramp's weight, and the
    gradients of the encoder's latents and both projections equal the transcription's."""
    torch.manual_seed(0)
    D = 6
    q = vqvae.BSQQuantizer(K, D, commitment_cost=beta, bsq_group_size=group, bsq_inv_temperature=tau).double().train()
    q.set_schedule(0.0, 500)                                          # w = 0.1 r + 0.3 (1 - r), r = 1/4
    w = 0.25
    assert q.entropy_weight == pytest.approx(0.1 * w + 0.3 * (1 - w))
    z = torch.randn(3, D, 4, 4, dtype=torch.float64, requires_grad=True)
    z_q, losses, info = q(z)
    mine = losses["commitment_loss"] + losses["sample_entropy_loss"] + losses["codebook_entropy_loss"]
    (z_q.square().sum() + mine).backward()
    grads = [z.grad.clone(), q.proj_in.weight.grad.clone(), q.proj_out.weight.grad.clone()]
    for p in (z, q.proj_in.weight, q.proj_out.weight):
        p.grad = None
    bits = K.bit_length() - 1
    zq_ref, loss_ref, msb = their_bsq(q.proj_in(vqvae._flatten_latents(z)), bits, group, tau, beta=beta)
    out_ref = vqvae._unflatten_latents(q.proj_out(zq_ref), z.shape)
    weight = q.entropy_weight                                        # their criterion weights the whole loss
    torch.testing.assert_close(mine, weight * loss_ref, rtol=1e-12, atol=1e-14)
    (out_ref.square().sum() + weight * loss_ref).backward()
    for a, b in zip(grads, [z.grad, q.proj_in.weight.grad, q.proj_out.weight.grad]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z_q, out_ref, rtol=1e-12, atol=1e-12)
    lsb = sum(((msb >> (bits - 1 - i)) & 1) << i for i in range(bits))            # their index, bits reversed
    assert torch.equal(info["code_indices"].reshape(-1), lsb)


def test_the_commitment_term_sums_over_the_bits_and_takes_the_ramps_weight():
    torch.manual_seed(1)
    q = vqvae.BSQQuantizer(16, 5, commitment_cost=0.25, bsq_group_size=4).double().train()
    z = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    _, losses, _ = q(z)
    u = F.normalize(q.proj_in(vqvae._flatten_latents(z)), dim=1)
    expected = 0.3 * 0.25 * ((torch.sign(u) / 2 - u) ** 2).sum(1).mean()          # w = 0.3 before any step
    torch.testing.assert_close(losses["commitment_loss"], expected)


def test_with_one_group_the_entropies_are_lfqs_on_the_sphere():
    """g = bits: the per-sample and codebook entropies are LFQ's exact ones over all 2^d codes with beta = tau /
    sqrt(d) on u (up to their log(p + 1e-8)); smaller groups give the same per-sample entropy and a larger codebook
    entropy (a sum over groups: an upper bound)."""
    torch.manual_seed(2)
    u = F.normalize(torch.randn(200, 6, dtype=torch.float64), dim=1)
    tau = 4.0
    one = vqvae.BSQQuantizer(64, 3, bsq_group_size=6, bsq_inv_temperature=tau).double()
    logp = (2 * tau / math.sqrt(6) * u @ vqvae.sign_patterns(6).double().t()).log_softmax(1)
    lfq_sample = -(logp.exp() * logp).sum(1).mean()
    log_avg = logp.logsumexp(0) - math.log(200)
    lfq_codebook = -(log_avg.exp() * log_avg).sum()
    hs, hc = one.entropies(u)
    assert float(hs) == pytest.approx(float(lfq_sample), abs=64 * 1e-8)
    assert float(hc) == pytest.approx(float(lfq_codebook), abs=64 * 1e-8)
    hs3, hc3 = vqvae.BSQQuantizer(64, 3, bsq_group_size=3, bsq_inv_temperature=tau).double().entropies(u)
    assert float(hs3) == pytest.approx(float(hs), abs=64 * 1e-8) and float(hc3) > float(hc) + 1e-3


def test_the_output_is_a_unit_sign_vector_and_the_straight_through_gradient_is_scaled():
    torch.manual_seed(3)
    q = vqvae.BSQQuantizer(512, 4, bsq_group_size=9).double()
    u = F.normalize(torch.randn(7, 9, dtype=torch.float64), dim=1).requires_grad_(True)
    out = vqvae.straight_through(u, torch.where(u > 0, 1.0, -1.0)) / math.sqrt(q.bits)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7, dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(u.grad, torch.full_like(u, 1 / 3))


def test_the_entropy_weight_ramps_as_their_criterion_and_the_defaults_are_theirs():
    q = vqvae.BSQQuantizer(512, 4)
    for step, w in ((0, 0.3), (1000, 0.2), (2000, 0.1), (9000, 0.1)):
        q.set_schedule(0.5, step)
        assert q.entropy_weight == pytest.approx(w)
    cfg = vqvae.make_config({"quantizer": "bsq"})
    assert (cfg.commitment_cost, cfg.bsq_group_size, cfg.bsq_inv_temperature, cfg.bsq_entropy_cost,
            cfg.bsq_entropy_cost_start, cfg.bsq_entropy_rampup_steps, cfg.bsq_diversity_gamma) == (0.0, 0, 1.0, 0.1, 0.3,
                                                                                               2000, 1.0)
    assert vqvae.BSQQuantizer(512, 4).group_size == 9 and vqvae.BSQQuantizer(64, 4).group_size == 6   # 0: all bits
    with pytest.raises(vqvae.BavqError, match="bsq_group_size 9 must divide the bits log2 K = 10 .*1, 2, 5, 10"):
        vqvae.make_config({"quantizer": "bsq", "codebook_size": 1024, "bsq_group_size": 9}).validate()
    with pytest.raises(vqvae.BavqError, match="power of two"):
        vqvae.make_config({"quantizer": "bsq", "codebook_size": 500}).validate()
