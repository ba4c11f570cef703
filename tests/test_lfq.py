"""LFQ (Yu et al. 2023, MAGVIT-v2): sign codes, the entropy terms by hand and as the first Blahut-Arimoto
step from a uniform prior, straight-through and exact entropy gradients, and its coefficients."""
import math

import pytest
import torch

import vqvae
from conftest import latent_grid as _latent_grid, tiny_config


def _lfq_by_hand(beta=1.0, **kw):
    """K=4 (d=2), D=2, identity projections: h = z. Codes c_k: bit i of k -> +1, else -1 (LSB first):
    c_0 = (-1,-1), c_1 = (1,-1), c_2 = (-1,1), c_3 = (1,1)."""
    q = vqvae.LFQQuantizer(4, 2, lfq_inv_temperature=beta, **kw)
    with torch.no_grad():
        for lin in (q.proj_in, q.proj_out):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    return q, torch.tensor([[0.3, -0.2], [-0.1, 0.4], [0.5, 0.6]])


def test_lfq_forward_and_losses_by_hand():
    q, h = _lfq_by_hand(beta=1.0)
    assert q.codes.tolist() == [[-1, -1], [1, -1], [-1, 1], [1, 1]]
    z_q, losses, info = q.train()(_latent_grid(h))
    assert info["code_indices"].flatten().tolist() == [1, 2, 3]              # sum_i 2^(i-1) [h_i > 0]
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(z_q.reshape(2, 3).t(), sign)
    # p(k|x) = softmax_k(2 beta <h_x, c_k>), written out
    P = torch.tensor([[math.exp(2 * sum(a * b for a, b in zip(x, c))) for c in q.codes.tolist()]
                      for x in h.tolist()], dtype=torch.float64)
    P = P / P.sum(1, keepdim=True)
    sample_h = -(P * P.log()).sum(1).mean()
    avg = P.mean(0)
    codebook_h = -(avg * avg.log()).sum()
    torch.testing.assert_close(losses["sample_entropy_loss"].double(), 0.1 * sample_h)
    torch.testing.assert_close(losses["codebook_entropy_loss"].double(), -0.1 * 1.0 * codebook_h)
    torch.testing.assert_close(losses["commitment_loss"], 0.25 * ((h - sign) ** 2).mean())
    torch.testing.assert_close(q.decode_indices(info["code_indices"]), z_q)


def test_lfq_assignment_is_the_first_blahut_arimoto_step_from_a_uniform_prior():
    """||c_k||^2 = d for every code, so softmax(2 beta <h, c>) = softmax(-beta ||h - c||^2): BA-VQ's P
    after one iteration from the uniform Q, and the codebook entropy is H of BA's marginal."""
    torch.manual_seed(0)
    q = vqvae.LFQQuantizer(16, 8, lfq_inv_temperature=0.7).double().train()
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    _, losses, _ = q(z)
    h = q.proj_in(z.permute(0, 2, 3, 1).reshape(-1, 8))
    log_p, log_q = vqvae.blahut_arimoto(vqvae.squared_distances(h, q.codes.double()), 0.7, iterations=1)
    sample_h = -(log_p.exp() * log_p).sum(1).mean()
    torch.testing.assert_close(losses["sample_entropy_loss"], 0.1 * sample_h)
    torch.testing.assert_close(losses["codebook_entropy_loss"], 0.1 * (log_q.exp() * log_q).sum())


def test_lfq_gradients_straight_through_and_exact_entropy():
    q, h = _lfq_by_hand(beta=2.0)
    q = q.double().train()
    z = _latent_grid(h).double().requires_grad_(True)
    z_q, losses, _ = q(z)
    w = torch.randn_like(z_q)
    (gz,) = torch.autograd.grad((w * z_q).sum(), z)
    torch.testing.assert_close(gz, w)                          # identity projections: the STE copies
    def entropy_terms(z):
        _, l, _ = q(z)
        return l["sample_entropy_loss"] + l["codebook_entropy_loss"]
    assert torch.autograd.gradcheck(entropy_terms, (z,))


def test_lfq_needs_a_power_of_two_and_its_coefficients_matter():
    with pytest.raises(vqvae.BavqError, match="power of two"):
        tiny_config(quantizer="lfq", codebook_size=48)
    with pytest.raises(vqvae.BavqError, match="power of two"):
        vqvae.VQVAE("lfq", codebook_size=48, latent_dim=8, hidden_dim=8)   # a model built in a notebook
    def run(**kw):
        torch.manual_seed(0)
        q = vqvae.LFQQuantizer(16, 8, **kw).train()
        _, losses, _ = q(torch.randn(2, 8, 4, 4))
        return torch.stack(list(losses.values())).detach()
    for param, value in [("commitment_cost", 1.0), ("lfq_entropy_cost", 0.5), ("lfq_diversity_gamma", 2.0),
                         ("lfq_inv_temperature", 3.0)]:
        assert not torch.allclose(run(), run(**{param: value})), param
