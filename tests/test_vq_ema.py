"""VQ-EMA (van den Oord et al. 2017, App. A.1): the codebook as exponential moving averages of the latents
assigned to each code, one step by hand and against the original code's update, its start state, and its
commitment gradient."""
import pytest
import torch

import vqvae
from vqvae import VQEMAQuantizer
from conftest import latents, make_quantizer


def test_vq_ema_codebook_is_not_a_parameter():
    q = make_quantizer("vq_ema")
    assert list(q.parameters()) == []
    assert {"codebook", "ema_cluster_size", "ema_w"} <= set(q.state_dict())


def test_vq_ema_train_forward_changes_buffers():
    q = make_quantizer("vq_ema").train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(latents())
    assert all(not torch.equal(before[k], v) for k, v in q.state_dict().items())


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


# --------------------------------------------------------------------------- the EMA update by hand


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


# --------------------------------------------------------------------------- unused codes and the start state


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
