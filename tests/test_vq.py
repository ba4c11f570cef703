"""Plain VQ (van den Oord et al. 2017): the codebook learns only from its codebook term, and the losses and
the straight-through output use the hard code."""
import torch
import torch.nn.functional as F

from vqvae import VQQuantizer


def latents(B=2, D=8, H=4, W=4, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, H, W, generator=g) * scale


def test_vq_codebook_gradient_comes_only_from_the_codebook_term():
    torch.manual_seed(0)
    q = VQQuantizer(16, 8, commitment_cost=0.25, codebook_cost=1.0).train()
    z = latents().requires_grad_(True)
    z_q, losses, info = q(z)
    w = torch.randn_like(z)
    # reconstruction (through the estimator) + commitment: no codebook gradient at all
    g = torch.autograd.grad((w * z_q).sum() + losses["commitment_loss"], q.codebook, allow_unused=True)[0]
    assert g is None or torch.equal(g, torch.zeros_like(g))
    # codebook term: d/de_k of cost * mean((e - sg z)^2) = 2 cost / (N D) * sum_{x->k} (e_k - z_x)
    z_q, losses, info = q(z)
    g = torch.autograd.grad(losses["codebook_loss"], q.codebook)[0]
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    idx = info["code_indices"].flatten()
    expected = torch.zeros(16, 8).index_add_(0, idx, q.codebook.detach()[idx] - z_flat) * 2 / z_flat.numel()
    torch.testing.assert_close(g, expected)
    # and the codebook term sends nothing to the encoder
    gz = torch.autograd.grad(q(z)[1]["codebook_loss"], z, allow_unused=True)[0]
    assert gz is None or torch.equal(gz, torch.zeros_like(gz))


def test_vq_losses_use_the_hard_code_and_the_ste_ignores_requires_grad():
    torch.manual_seed(0)
    q = VQQuantizer(16, 8, commitment_cost=0.5, codebook_cost=2.0).train()
    z = latents()
    z_q_nograd, losses, info = q(z)                                   # z.requires_grad is False
    z_q_grad, _, _ = q(z.clone().requires_grad_(True))
    torch.testing.assert_close(z_q_nograd, z_q_grad)                  # same path either way
    e = q.codebook.detach()[info["code_indices"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q_nograd, e, rtol=0, atol=1e-6)
    mse = F.mse_loss(z, e)
    torch.testing.assert_close(losses["codebook_loss"], 2.0 * mse)
    torch.testing.assert_close(losses["commitment_loss"], 0.5 * mse)
