"""NSVQ, "Beyond Stationarity" (arXiv 2602.18896), as the paper's CelebA-HQ setup: one training step equals a
float64 transcription of the intended forward (CAIR-LAB-WFUSM/NS-VQ-TransVQ, its soft-distance quantizer), the
weights are 1 at the winner and capped softmax elsewhere, tau halves every epoch, evaluation is hard VQ, and the
chosen codes get their share of the decoder's gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae


def their_forward(z_bchw, codebook, tau, w=0.01, commit=0.25, cb_weight=1.0, alpha=1.0):
    """The soft-distance forward as written there: d by the expanded squared distance, token = argmin, weights
    w K softmax(-d / tau) (detached) off the winner, 1 on it, clamped to [0, 1]; embedding loss (1/N) sum c mean_D
    (sg z - e_k)^2 over the (N, K, D) differences; loss commit mse(sg z_q, z) + cb_weight emb; their straight-through
    line z + a z_q + sg(z_q - a z_q - z), a = 2 alpha / (B H W D)."""
    B, D, H, W = z_bchw.shape
    K = codebook.shape[0]
    zf = z_bchw.permute(0, 2, 3, 1).reshape(-1, D)
    d = zf.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * zf @ codebook.t()
    token = d.argmin(1)
    z_q = codebook[token]
    soft = w * K * F.softmax(-d / tau, dim=1).detach()
    one_hot = F.one_hot(token, K).to(d.dtype)
    cw = torch.clamp(soft * (1 - one_hot) + one_hot, 0.0, 1.0)
    emb = (cw * (zf.detach().unsqueeze(1) - codebook.unsqueeze(0)).pow(2).mean(-1)).sum() / zf.shape[0]
    loss = commit * torch.mean((z_q.detach() - zf) ** 2) + cb_weight * emb
    a = 2 * alpha / (B * H * W * D)
    out = zf + a * z_q + (z_q - a * z_q - zf).detach()
    return out.reshape(B, H, W, D).permute(0, 3, 1, 2), loss, token


@pytest.mark.parametrize("tau, alpha", [(1.0, 1.0), (0.05, 0.0), (20.0, 3.0)])
def test_one_training_step_equals_the_transcription_in_float64(tau, alpha):
    torch.manual_seed(0)
    K, D = 10, 3
    q = vqvae.NSVQQuantizer(K, D, nsvq_tau=tau, nsvq_code_gradient=alpha).double().train()
    with torch.no_grad():
        q.codebook.normal_(0, 1)
    q.set_schedule(0.0, 0)
    z = torch.randn(2, D, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(z)
    z_q, losses, info = q(z)
    ((z_q * g).sum() + sum(losses.values())).backward()
    z2 = z.detach().clone().requires_grad_(True)
    cb = q.codebook.detach().clone().requires_grad_(True)
    out, loss, token = their_forward(z2, cb, tau, alpha=alpha)
    ((out * g).sum() + loss).backward()
    assert torch.equal(info["code_indices"].reshape(-1), token)
    torch.testing.assert_close(z_q, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(losses.values()), loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.codebook.grad, cb.grad, rtol=1e-9, atol=1e-11)


def test_the_weights_by_hand():
    """K = 4, w = 0.01 (w K = 0.04): with d = (0, ln 2, ln 4, 10) and tau = 1 the softmax is (8, 4, 2, ~0)/(14 + ..)
    -> the winner 1, the others 0.04 x softmax; a large w caps them at 1."""
    q = vqvae.NSVQQuantizer(4, 1).double()
    d = torch.tensor([[0.0, math.log(2), math.log(4), 10.0]], dtype=torch.float64)
    sm = torch.softmax(-d, 1)
    c = q.weights(d, torch.tensor([0]))
    torch.testing.assert_close(c, torch.cat([torch.ones(1, 1, dtype=torch.float64), 0.04 * sm[:, 1:]], 1))
    q.weight = 100.0
    assert q.weights(d, torch.tensor([0]))[0, :3].tolist() == [1.0, 1.0, 1.0]


def test_tau_halves_every_epoch_down_to_its_floor():
    q = vqvae.NSVQQuantizer(8, 2)
    q.steps_per_epoch = 10
    for step, tau in ((0, 1.0), (9, 1.0), (10, 0.5), (35, 0.125), (10 ** 5, 1e-8)):
        q.set_schedule(0.0, step)
        assert q.tau == pytest.approx(tau)


def test_evaluation_is_hard_vq_and_a_tiny_tau_leaves_only_the_winner():
    torch.manual_seed(1)
    q = vqvae.NSVQQuantizer(6, 2).double()
    with torch.no_grad():
        q.codebook.normal_(0, 1)
    z = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    q.eval()
    _, losses, info = q(z)
    x = vqvae._flatten_latents(z)
    e = q.codebook.detach()[info["code_indices"].reshape(-1)]
    torch.testing.assert_close(losses["codebook_loss"], F.mse_loss(x, e))
    q.train()
    q.tau = 1e-8
    _, losses, _ = q(z)
    torch.testing.assert_close(losses["codebook_loss"], F.mse_loss(x, e), rtol=1e-9, atol=1e-12)


def test_the_papers_values():
    cfg = vqvae.make_config({"quantizer": "nsvq"})
    assert (cfg.commitment_cost, cfg.codebook_cost, cfg.nsvq_weight, cfg.nsvq_tau, cfg.nsvq_tau_decay,
            cfg.nsvq_code_gradient) == (0.25, 1.0, 0.01, 1.0, 0.5, 1.0)
