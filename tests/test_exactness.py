"""Small properties that a reviewer's mutations exposed (each test fails under its mutation):
the commitment gradient reaches the encoder, epoch losses are sample-weighted, restarts draw from
the current batch, and every training step uses the beta scheduled for it."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae
from conftest import tiny_config


def test_vq_ema_commitment_loss_sends_its_gradient_to_the_encoder():
    """d/dz [c * mean((z - sg[e])^2)] = 2 c (z - e) / numel: the commitment term trains the encoder."""
    torch.manual_seed(0)
    q = vqvae.VQEMAQuantizer(8, 4, commitment_cost=0.7, init="normal").train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    codes = q.codebook.clone()
    _, losses, info = q(z)
    losses["commitment_loss"].backward()
    e = codes[info["code_indices"]].permute(0, 3, 1, 2)                  # (B, D, H, W), pre-update codes
    torch.testing.assert_close(z.grad, 2 * 0.7 * (z.detach() - e) / z.numel())


def _spy_forward(model):
    """Record (batch size, recon_loss, loss terms, beta) of every training forward."""
    seen = []
    orig = model.forward

    def spy(x):
        out = orig(x)
        seen.append((x.shape[0], float(out[1].detach()), {k: float(v.detach()) for k, v in out[2].items()},
                     float(out[3]["beta"]) if "beta" in out[3] else None))
        return out
    model.forward = spy
    return seen


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_epoch_losses_are_sample_weighted_when_the_last_batch_is_short(quantizer):
    cfg = tiny_config(quantizer=quantizer, batch_size=64)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    seen = _spy_forward(model)
    m, _ = vqvae.train_epoch(model, opt, train_u8[:100], cfg, torch.Generator().manual_seed(0), 0, 2)
    assert [b for b, *_ in seen] == [64, 36]
    expect = sum(b * r for b, r, *_ in seen) / 100
    assert m["recon_loss"] == pytest.approx(expect, rel=1e-6)
    assert m["recon_loss"] != pytest.approx(sum(r for _, r, *_ in seen) / 2, rel=1e-4)
    for k in model.quantizer.loss_names:
        assert m[k] == pytest.approx(sum(b * t[k] for b, _, t, _ in seen) / 100, rel=1e-6)


def test_every_training_step_uses_the_beta_scheduled_for_it():
    """beta_t = cosine(beta_start -> beta_end) at t = step / (total_steps - 1), set before the step."""
    cfg = tiny_config(quantizer="ba_vq", batch_size=64, beta_start=0.5, beta_end=4.0)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    seen = _spy_forward(model)
    g, step = torch.Generator().manual_seed(0), 0
    for _ in range(2):                                                    # 2 epochs x 4 steps
        _, step = vqvae.train_epoch(model, opt, train_u8, cfg, g, step, 8)
    expect = [vqvae.cosine_schedule(0.5, 4.0, s / 7) for s in range(8)]
    assert [b for *_, b in seen] == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("quantizer", ["vq_ema", "vq", "ba_vq"])
def test_dead_code_restarts_draw_from_the_current_batch(quantizer):
    """With a threshold no code can reach, every code is restarted at steps 2 and 4 (every 2 steps):
    each restarted code is a latent of the batch of that very step, not of an earlier one."""
    cfg = tiny_config(quantizer=quantizer, batch_size=32, dead_code_threshold=1e9, dead_code_every=2)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    q = model.quantizer
    latents, codebooks = [], []
    orig = q.forward

    def spy(z):
        latents.append(F.normalize(z.detach(), dim=1) if q.cosine else z.detach())
        return orig(z)
    q.forward = spy
    orig_restart = q.restart_dead_codes

    def restart():
        dead = orig_restart()
        codebooks.append((len(latents) - 1, q.codebook.detach().clone(), dead.clone()))
        return dead
    q.restart_dead_codes = restart
    vqvae.train_epoch(model, opt, train_u8[:4 * 32], cfg, torch.Generator().manual_seed(0), 0, 4)
    assert [s for s, _, _ in codebooks] == [1, 3]
    for s, E, dead in codebooks:
        assert dead.all()
        rows = latents[s].permute(0, 2, 3, 1).reshape(-1, latents[s].shape[1])      # (B*H*W, D)
        def found_in(r):
            return (E.float()[:, None, :] == r[None, :, :]).all(-1).any(1)                # (K,) exact row match
        assert found_in(rows).all()                                     # every code is a latent of this batch
        prev = latents[s - 1].permute(0, 2, 3, 1).reshape(-1, rows.shape[1])
        assert not found_in(prev).any()
