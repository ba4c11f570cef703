"""Residual VQ (Zeghidour et al. 2021, SoundStream): each stage quantizes the residual the previous ones
left, makes its own EMA update, and reports per-stage and combined code metrics."""
import math

import pytest
import torch

import vqvae
from conftest import latent_grid as _latent_grid, latents, tiny_config


def _rvq_by_hand():
    """S=2 stages of K=2 codes, D=2: stage 1 (1,0), (0,1); stage 2 (-0.1,0), (0,0.3)."""
    q = vqvae.ResidualVQQuantizer(2, 2, rvq_stages=2, commitment_cost=0.25)
    with torch.no_grad():
        q.stages[0].codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        q.stages[1].codebook.copy_(torch.tensor([[-0.1, 0.0], [0.0, 0.3]]))
    return q, torch.tensor([[0.9, 0.1], [0.1, 1.3]])


def test_rvq_quantizes_the_successive_residuals_by_hand():
    q, x = _rvq_by_hand()
    z = _latent_grid(x).requires_grad_(True)
    z_q, losses, info = q.eval()(z)
    # x1 = (0.9, 0.1): stage 1 -> (1, 0), residual (-0.1, 0.1) -> stage 2 (-0.1, 0) (d 0.01 vs 0.05)
    # x2 = (0.1, 1.3): stage 1 -> (0, 1), residual (0.1, 0.3)  -> stage 2 (0, 0.3)  (d 0.13 vs 0.01)
    assert info["code_indices"].shape == (1, 2, 1, 2)
    assert info["code_indices"][0, :, 0].tolist() == [[0, 1], [0, 1]]
    torch.testing.assert_close(z_q.reshape(2, 2).t(), torch.tensor([[0.9, 0.0], [0.0, 1.3]]))
    assert info["code_counts"].tolist() == [1, 1, 1, 1]                 # stage 1: codes 0, 1; stage 2: 2, 3
    stage1 = ((x - torch.tensor([[1.0, 0.0], [0.0, 1.0]])) ** 2).mean()
    stage2 = ((torch.tensor([[-0.1, 0.1], [0.1, 0.3]]) - torch.tensor([[-0.1, 0.0], [0.0, 0.3]])) ** 2).mean()
    torch.testing.assert_close(losses["commitment_loss"], 0.25 * (stage1 + stage2))
    # both stages' commitment terms reach the encoder (residuals depend on z with gradient one)
    (gz,) = torch.autograd.grad(losses["commitment_loss"], z)
    r1 = x - torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r2 = r1 - torch.tensor([[-0.1, 0.0], [0.0, 0.3]])
    torch.testing.assert_close(gz.reshape(2, 2).t(), 0.25 * 2 / 4 * (r1 + r2))
    torch.testing.assert_close(q.decode_indices(info["code_indices"]), z_q.detach())


@pytest.mark.parametrize("S", [1, 2, 4])
def test_rvq_straight_through_passes_the_decoder_gradient_once_whatever_the_stages(S):
    """One straight-through line for the sum, z_q = z + sg[sum_s q_s - z] (SoundStream's residual VQ as
    VQ-VAE's estimator): the decoder's gradient reaches the encoder exactly once, d sum(w * z_q) / dz = w
    (float64, training mode, the decoder-side term alone: no commitment loss). A straight-through line per
    stage (z_q = sum_s (z + sg[q_s - z])) has the same forward value but passes S times the gradient."""
    torch.manual_seed(0)
    q = vqvae.ResidualVQQuantizer(8, 4, rvq_stages=S).double().train()
    with torch.no_grad():
        for stage in q.stages:                                           # codes at the latents' scale
            stage.codebook.normal_().mul_(0.5)
    z = latents(B=2, D=4, H=3, W=3, scale=1.0).double().requires_grad_(True)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z_q, _, info = q(z)
    assert z_q.dtype == torch.float64 and info["code_indices"].shape == (2, S, 3, 3)
    assert not torch.allclose(z_q, z)                                    # z_q is the codes' sum, not z
    (gz,) = torch.autograd.grad((w * z_q).sum(), z)
    assert torch.equal(gz, w)


def test_rvq_each_stage_makes_its_ema_update_on_the_residual_it_sees():
    q, x = _rvq_by_hand()
    ref = vqvae.VQEMAQuantizer(2, 2)
    ref.load_state_dict(q.stages[1].state_dict())                       # stage 2 as it starts
    q.train()(_latent_grid(x))
    r1 = x - torch.tensor([[1.0, 0.0], [0.0, 1.0]])                     # what stage 2 sees
    ref.train()(_latent_grid(r1))
    for name in ("codebook", "ema_w", "ema_cluster_size"):
        torch.testing.assert_close(getattr(q.stages[1], name), getattr(ref, name))
    assert not torch.equal(q.stages[1].codebook, torch.tensor([[-0.1, 0.0], [0.0, 0.3]]))


def test_rvq_per_stage_and_combined_code_metrics():
    q = vqvae.ResidualVQQuantizer(4, 2, rvq_stages=2)
    counts = torch.tensor([4, 0, 0, 0, 1, 1, 1, 1])                     # stage 1: one code; stage 2: all four
    m = q.histogram_metrics(counts, n_images=1)
    assert m["stage1_perplexity"] == pytest.approx(1.0) and m["stage1_usage_rate"] == 0.25
    assert m["stage2_perplexity"] == pytest.approx(4.0) and m["stage2_usage_rate"] == 1.0
    assert m["code_entropy_bits"] == pytest.approx(2.0) and m["bits_per_image"] == pytest.approx(8.0)   # 4 positions
    # tuples (k1, k2): (0,1), (0,1), (1,0), (1,1) -> 3 distinct, histogram 2, 1, 1
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 1]]).reshape(4, 2, 1, 1)    # (N, S, H, W)
    c = q.code_set_metrics(idx)
    H = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert c["combined_codes"] == 3
    assert c["combined_perplexity"] == pytest.approx(math.exp(H))
    assert c["combined_entropy_bits"] == pytest.approx(H / math.log(2))


def test_rvq_stages_change_behaviour_and_more_stages_quantize_finer():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 4, 4)
    errors = []
    for S in (1, 2, 4):
        torch.manual_seed(1)
        q = vqvae.ResidualVQQuantizer(64, 8, rvq_stages=S).eval()
        with torch.no_grad():
            for stage in q.stages:                                       # codes at the latents' scale
                stage.codebook.normal_().mul_(0.5)
        z_q, _, info = q(z)
        assert info["code_indices"].shape == (2, S, 4, 4)
        errors.append(float((z - z_q).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2], errors
    with pytest.raises(vqvae.BavqError, match="not wired"):
        tiny_config(quantizer="rvq", dead_code_threshold=1.0)
