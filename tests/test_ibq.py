"""IBQ (Shi et al. 2024, index backpropagation quantization): the straight-through one-hot of a softmax
over dot-product logits, so every code gets a gradient at every step; its four loss terms and defaults
as the authors' code (TencentARC/SEED-Voken) has them."""
import pytest
import torch
import torch.nn.functional as F

import vqvae
from conftest import latent_grid, latents


def _seed_voken_ibq(z_flat, E, st=1.0, commit=1.0, beta=0.25, ent=0.05, T=0.01, gamma=1.0):
    """IndexPropagationQuantize.forward and compute_entropy_loss, transcribed: (z_q, total loss, codes)."""
    logits = torch.einsum("nd,kd->nk", z_flat, E)
    soft = logits.softmax(1)
    ind = soft.max(1, keepdim=True)[1]
    hard = torch.zeros_like(logits).scatter_(1, ind, 1.0)
    one_hot = hard - soft.detach() + soft
    z_q = torch.einsum("nk,kd->nd", one_hot, E)
    z_q_2 = torch.einsum("nk,kd->nd", hard, E)
    quant = (st * F.mse_loss(z_q, z_flat) + commit * F.mse_loss(z_q_2.detach(), z_flat)
             + beta * F.mse_loss(z_q_2, z_flat.detach()))
    probs = (logits / T).softmax(1)
    log_probs = (logits / T + 1e-5).log_softmax(1)
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = (-(probs * log_probs).sum(1)).mean()
    return z_q, quant + ent * (sample_entropy - gamma * avg_entropy), ind.squeeze(1)


def test_ibq_equals_the_transcription_of_the_authors_code_in_float64():
    """Codes, z_q, the total loss and the gradients reaching z and every code, to float64 rounding."""
    torch.manual_seed(0)
    q = vqvae.IBQQuantizer(16, 4).double().train()
    z = latents(B=2, D=4, H=3, W=3, scale=1.0).double().requires_grad_(True)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z_q, losses, info = q(z)
    g_z, g_E = torch.autograd.grad((w * z_q).sum() + sum(losses.values()), [z, q.codebook])
    E = q.codebook.detach().clone().requires_grad_(True)
    zz = z.detach().clone().requires_grad_(True)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 4)                      # noqa: E731, (N, D)
    zq_ref, loss_ref, idx_ref = _seed_voken_ibq(flat(zz), E)
    g_z_ref, g_E_ref = torch.autograd.grad((flat(w) * zq_ref).sum() + loss_ref, [zz, E])
    assert torch.equal(info["code_indices"].flatten(), idx_ref)
    torch.testing.assert_close(flat(z_q), zq_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(losses.values()), loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_z, g_z_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_E, g_E_ref, rtol=1e-10, atol=1e-12)


def test_ibq_code_is_the_largest_dot_product_not_the_nearest_code():
    """z = (1, 0) with codes (1, 0) and (3, 0): the nearest code is the first, IBQ's argmax of <z, e_k>
    the second; the decoder gets it exactly (the one-hot's soft part is zero in value)."""
    q = vqvae.IBQQuantizer(2, 2).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    z_q, losses, info = q(latent_grid(torch.tensor([[1.0, 0.0]])))
    assert info["code_indices"].flatten().tolist() == [1]
    torch.testing.assert_close(z_q.flatten(), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(losses["commitment_loss"], torch.tensor((2.0 ** 2) / 2))   # 1.0 x mse((1,0),(3,0))
    torch.testing.assert_close(losses["codebook_loss"], torch.tensor(0.25 * 2.0))


def test_every_code_gets_a_gradient_from_the_decoder_at_every_step():
    """The decoder's gradient alone (no loss term) reaches all K codes through P, not only the used one."""
    torch.manual_seed(0)
    q = vqvae.IBQQuantizer(32, 8, init="normal").train()
    z = latents(B=1, D=8, H=2, W=2, scale=1.0)
    z_q, _, info = q(z)
    (w := torch.randn_like(z_q)).requires_grad_(False)
    (g_E,) = torch.autograd.grad((w * z_q).sum(), [q.codebook])
    assert len(set(info["code_indices"].flatten().tolist())) < 32
    assert (g_E.norm(dim=1) > 0).all()
    vq = vqvae.VQQuantizer(32, 8, init="normal").train()                 # plain VQ: only the used codes
    z_q, _, info = vq(z)
    (g,) = torch.autograd.grad((w * z_q).sum() + 0 * vq.codebook.sum(), [vq.codebook])
    assert int((g.norm(dim=1) > 0).sum()) == 0                          # the decoder's gradient skips the codebook


def test_ibq_defaults_are_the_authors_and_its_remedy_limits():
    cfg = vqvae.make_config({"quantizer": "ibq"})
    assert (cfg.commitment_cost, cfg.codebook_cost, cfg.init) == (1.0, 0.25, "normal")
    assert (cfg.ibq_straight_through_cost, cfg.ibq_entropy_cost, cfg.ibq_entropy_temperature,
            cfg.ibq_diversity_gamma) == (1.0, 0.05, 0.01, 1.0)
    assert vqvae.make_config({"quantizer": "ibq", "commitment_cost": 0.25}).commitment_cost == 0.25
    assert vqvae.make_config({"quantizer": "vq"}).codebook_cost == 1.0       # the others keep theirs
    with pytest.raises(vqvae.BavqError, match="gradient_estimator does not apply to ibq"):
        vqvae.make_config({"quantizer": "ibq", "gradient_estimator": "rotation"}).validate()


@pytest.mark.parametrize("field,term", [("ibq_straight_through_cost", "straight_through_loss"),
                                        ("commitment_cost", "commitment_loss"), ("codebook_cost", "codebook_loss"),
                                        ("ibq_entropy_cost", "entropy_loss")])
def test_each_coefficient_scales_its_own_term(field, term):
    z = latents(B=1, D=4, H=2, W=2, scale=1.0)
    base = {}
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        kw = {field: {"ibq_straight_through_cost": 1.0, "commitment_cost": 1.0, "codebook_cost": 0.25,
                      "ibq_entropy_cost": 0.05}[field] * scale}
        _, losses, _ = vqvae.IBQQuantizer(8, 4, **kw).train()(z)
        base[scale] = {k: float(v.detach()) for k, v in losses.items()}
    assert base[3.0][term] == pytest.approx(3 * base[1.0][term])
    assert all(base[3.0][k] == pytest.approx(base[1.0][k]) for k in base[1.0] if k != term)


def test_entropy_temperature_and_gamma_change_the_entropy_term():
    z = latents(B=1, D=4, H=2, W=2, scale=1.0)
    values = []
    for kw in ({}, {"ibq_entropy_temperature": 1.0}, {"ibq_diversity_gamma": 0.0}):
        torch.manual_seed(0)
        values.append(float(vqvae.IBQQuantizer(8, 4, **kw).train()(z)[1]["entropy_loss"].detach()))
    assert len(set(values)) == 3
