"""Wasserstein VQ (arXiv 2506.15078) as the authors' code with their scripts' values: one training step equals a
float64 transcription (VQ-Research/Wasserstein-VQ, code/VQVAE/model/wasserstein_quantizer.py), the W2 term is the
closed form between Gaussians and only the codebook gets its gradient, the queue is a FIFO written before the loss,
and the codebook trains in an optimizer group of its own."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae


def their_w2(feats, codebook):
    """calc_wasserstein_loss, in their order: s = max unbiased std of the features (+1e-8), both divided by it,
    unbiased covariances, S_z^1/2 by eigh with relu + 1e-8, non-finite entries zeroed, eigvals of S_z^1/2 S_c S_z^1/2,
    W = sqrt(|dmu|^2 + relu(tr S_z + tr S_c - 2 sum sqrt(relu(l) + 1e-8)) + 1e-10)."""
    z = feats.detach()
    std = z.std(dim=0).max().detach()
    z = z / (std + 1e-8)
    zc = z - z.mean(0, keepdim=True)
    z_cov = (zc.t() @ zc / (z.shape[0] - 1)).detach()
    c = codebook / (std + 1e-8)
    cc = c - c.mean(0, keepdim=True)
    c_cov = cc.t() @ cc / (c.shape[0] - 1)
    S1, Q1 = torch.linalg.eigh(z_cov)
    root = (Q1 @ torch.diag(torch.sqrt(F.relu(S1) + 1e-8)) @ Q1.T).detach()
    S2, _ = torch.linalg.eigh(root @ c_cov @ root)
    part_cov = F.relu(torch.trace(z_cov + c_cov) - 2.0 * torch.sqrt(F.relu(S2) + 1e-8).sum())
    return torch.sqrt((z.mean(0) - c.mean(0)).pow(2).sum() + part_cov + 1e-10)


def test_one_training_step_equals_theirs_in_float64():
    """Queue written first (the batch is part of the statistics), nearest code, loss 0.1 mse(sg e, z) + mse(e, sg z) +
    0.5 W(queue, codebook), straight-through: the output, the loss, the gradients of the latents and the codebook,
    and the queue after the step equal the transcription's."""
    torch.manual_seed(0)
    K, D, Q = 12, 3, 36
    q = vqvae.WassersteinVQQuantizer(K, D, wvq_queue=Q).double().train()
    with torch.no_grad():
        q.codebook.normal_(0, 0.5)
    queue0 = q.queue.clone()
    z = torch.randn(2, D, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(z)
    z_q, losses, info = q(z)
    assert set(losses) == {"commitment_loss", "codebook_loss", "wasserstein_loss"}
    ((z_q * g).sum() + sum(losses.values())).backward()
    z2 = z.detach().clone().requires_grad_(True)
    cb = q.codebook.detach().clone().requires_grad_(True)
    zf = z2.permute(0, 2, 3, 1).reshape(-1, D)
    queue = queue0.clone()
    queue[:18] = zf.detach()
    tok = (zf.pow(2).sum(1, keepdim=True) + cb.detach().pow(2).sum(1) - 2 * zf @ cb.detach().t()).argmin(1)
    zq = cb[tok]
    loss = 0.1 * F.mse_loss(zq.detach(), zf) + 1.0 * F.mse_loss(zq, zf.detach()) + 0.5 * their_w2(queue, cb)
    out = (zf + (zq - zf).detach()).reshape(2, 3, 3, D).permute(0, 3, 1, 2)
    ((out * g).sum() + loss).backward()
    assert torch.equal(info["code_indices"].reshape(-1), tok)
    torch.testing.assert_close(z_q, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(losses.values()), loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.codebook.grad, cb.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(q.queue, queue)
    assert int(q.queue_ptr) == 18


def test_the_w2_term_is_the_closed_form_and_only_the_codebook_gets_its_gradient():
    """W2^2 = |dmu|^2 + tr S_z + tr S_c - 2 tr (S_c^1/2 S_z S_c^1/2)^1/2 (the trace taken the other way round,
    through S_c's square root), in units of the features' largest std; the features get no gradient."""
    torch.manual_seed(1)
    feats = (torch.randn(400, 3, dtype=torch.float64) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, 0.3, 0.2]],
                                                                     dtype=torch.float64)).requires_grad_(True)
    codes = (torch.randn(50, 3, dtype=torch.float64) + 1.0).requires_grad_(True)
    w = vqvae.gaussian_w2(feats, codes)
    s = feats.detach().std(0).max() + 1e-8
    z, c = feats.detach() / s, codes.detach() / s
    cov = lambda x: (x - x.mean(0)).t() @ (x - x.mean(0)) / (x.shape[0] - 1)
    Sz, Sc = cov(z), cov(c)
    lam, V = torch.linalg.eigh(Sc)
    rc = V @ torch.diag(lam.clamp_min(0).sqrt()) @ V.t()
    cross = torch.linalg.eigvalsh(rc @ Sz @ rc).clamp_min(0).sqrt().sum()
    w2 = (z.mean(0) - c.mean(0)).pow(2).sum() + torch.trace(Sz) + torch.trace(Sc) - 2 * cross
    assert float(w.detach()) == pytest.approx(math.sqrt(float(w2)), rel=1e-6)
    w.backward()
    assert feats.grad is None and codes.grad.abs().sum() > 0
    same = vqvae.gaussian_w2(feats.detach(), feats.detach())               # the same points: W2 = 0 (guards aside)
    assert float(same) < 1e-3


def test_the_queue_wraps_and_evaluation_leaves_it():
    q = vqvae.WassersteinVQQuantizer(8, 2, wvq_queue=10).train()
    z = torch.randn(1, 2, 2, 3)                                            # 6 latents a step
    q(z)
    q(z)                                                                   # rows 6..9 then 0..1
    zf = vqvae._flatten_latents(z)
    torch.testing.assert_close(q.queue[6:], zf[:4])
    torch.testing.assert_close(q.queue[:2], zf[4:])
    assert int(q.queue_ptr) == 2
    before = q.queue.clone()
    q.eval()
    _, losses, _ = q(torch.randn(1, 2, 2, 3))
    assert torch.equal(q.queue, before) and float(losses["wasserstein_loss"].detach()) > 0


def test_their_values_and_the_codebooks_own_optimizer_group():
    cfg = vqvae.make_config({"quantizer": "wasserstein_vq", "lr": 1e-3})
    assert (cfg.commitment_cost, cfg.codebook_cost, cfg.wvq_gamma, cfg.wvq_queue, cfg.wvq_codebook_lr) == \
        (0.1, 1.0, 0.5, 65536, 0.02)
    model = vqvae.build_model(dataclasses_replace(cfg, latent_dim=4, hidden_dim=4, codebook_size=16, wvq_queue=64))
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    groups = {g.get("name", "model"): g for g in opt.param_groups}
    assert groups["wasserstein_vq_codebook"]["params"] == [model.quantizer.codebook]
    assert (groups["wasserstein_vq_codebook"]["lr"], groups["wasserstein_vq_codebook"]["weight_decay"]) == (0.02, 0.0)
    assert groups["model"]["lr"] == 1e-3 and len(groups["model"]["params"]) == len(list(model.parameters())) - 1
    std = float(model.quantizer.codebook.detach().std())
    assert 0.005 < std < 0.02                                               # N(0, 0.01^2)


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)
