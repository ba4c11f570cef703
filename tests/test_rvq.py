"""Residual VQ (Zeghidour et al. 2021, SoundStream): each stage quantizes the residual the previous ones
left, makes its own EMA update, and reports per-stage and combined code metrics."""
import math

import pytest
import torch

import vqvae
from conftest import latent_grid as _latent_grid, latents, tiny_config


def _rvq_by_hand(**kw):
    """S=2 stages of K=2 codes, D=2: stage 1 (1,0), (0,1); stage 2 (-0.1,0), (0,0.3)."""
    q = vqvae.ResidualVQQuantizer(2, 2, rvq_stages=2, commitment_cost=0.25, **kw)
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
    r1 = x - torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    stage1 = (r1 ** 2).mean()
    stage2 = ((r1 - torch.tensor([[-0.1, 0.0], [0.0, 0.3]])) ** 2).mean()
    torch.testing.assert_close(losses["commitment_loss"], 0.25 * (stage1 + stage2) / 2)   # encodec: the mean
    # encodec's residual r_1 = z - (z + sg[e_1 - z]) has zero gradient: only stage 1's term reaches z
    (gz,) = torch.autograd.grad(losses["commitment_loss"], z)
    torch.testing.assert_close(gz.reshape(2, 2).t(), 0.25 / 2 * 2 / 4 * r1)
    torch.testing.assert_close(q.decode_indices(info["code_indices"]), z_q.detach())


# ----------------------------------------------------------------- encodec's residual VQ, transcribed
# From facebookresearch/encodec, encodec/quantization/core_vq.py (EuclideanCodebook, VectorQuantization,
# ResidualVectorQuantization) and vq.py (the mean of the stages' losses), written out here for float64.


def _sample_vectors(x, num):
    n = x.shape[0]
    return x[torch.randperm(n)[:num]] if n >= num else x[torch.randint(0, n, (num,))]


def _encodec_kmeans(x, K, iters):
    means = _sample_vectors(x, K)
    bins = None
    for _ in range(iters):
        dists = -(x[:, None, :] - means[None, :, :]).pow(2).sum(-1)          # (N, K)
        buckets = dists.max(-1).indices
        bins = torch.bincount(buckets, minlength=K)
        zero = bins == 0
        new = torch.zeros_like(means).scatter_add_(0, buckets[:, None].expand(-1, x.shape[1]), x)
        new = new / bins.masked_fill(zero, 1)[:, None].to(x.dtype)
        means = torch.where(zero[:, None], means, new)
    return means, bins.to(x.dtype)


def _encodec_codebook(st, x, K, iters=50, decay=0.99, eps=1e-5, threshold=2.0, always_draw=True):
    """EuclideanCodebook.forward in training mode on x (N, D); st holds its buffers. Returns (code, dead).
    ``always_draw`` False: encodec's own expire_codes_, which returns before drawing when no code expired."""
    if not st:                                                            # init_embed_ (inited False)
        means, bins = _encodec_kmeans(x, K, iters)
        st.update(embed=means.clone(), embed_avg=means.clone(), cluster_size=bins.clone())
    embed = st["embed"]
    dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None])
    ind = dist.max(-1).indices
    quantize = embed[ind]
    onehot = torch.nn.functional.one_hot(ind, K).to(x.dtype)
    dead = st["cluster_size"] < threshold                               # expire_codes_
    if always_draw or bool(dead.any()):   # encodec: `if not torch.any(expired_codes): return`
        samples = _sample_vectors(x, K)
        st["embed"] = torch.where(dead[:, None], samples, st["embed"])
    st["cluster_size"] = st["cluster_size"] * decay + onehot.sum(0) * (1 - decay)
    st["embed_avg"] = st["embed_avg"] * decay + (x.t() @ onehot).t() * (1 - decay)
    n = st["cluster_size"].sum()
    smoothed = (st["cluster_size"] + eps) / (n + K * eps) * n
    st["embed"] = st["embed_avg"] / smoothed[:, None]
    return quantize, int(dead.sum())


def _encodec_rvq(states, x, K, weight=1.0, always_draw=True, decay=0.99):
    """ResidualVectorQuantization.forward (training) with VectorQuantization's straight-through and
    commitment loss per stage; the loss is the mean over stages (ResidualVectorQuantizer)."""
    residual, out, losses, dead = x, torch.zeros_like(x), [], []
    for st in states:
        code, n_dead = _encodec_codebook(st, residual.detach(), K, always_draw=always_draw, decay=decay)
        quantize = residual + (code - residual).detach()
        losses.append(weight * torch.nn.functional.mse_loss(quantize.detach(), residual))
        residual = residual - quantize
        out = out + quantize
        dead.append(n_dead)
    return out, torch.stack(losses).mean(), dead


def test_rvq_default_is_encodecs_residual_vq_on_float64_steps():
    """Two training steps (k-means init on the first), S=3 stages of K=16 codes, D=4, N=32 positions:
    our default RVQ and the transcription of encodec agree on z_q, the loss, the gradient reaching z
    and every stage's codebook, EMA counts and EMA sums, to float64 rounding."""
    S, K, D = 3, 16, 4
    q = vqvae.ResidualVQQuantizer(K, D, rvq_stages=S).double().train()
    states = [{} for _ in range(S)]
    for step in range(2):
        z = latents(B=2, D=D, H=4, W=4, scale=1.0, seed=10 + step).double()
        w = torch.randn(z.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        torch.manual_seed(step)
        zz = z.clone().requires_grad_(True)
        z_q, losses, _ = q(zz)
        (g_ours,) = torch.autograd.grad((w * z_q).sum() + losses["commitment_loss"], zz)
        torch.manual_seed(step)
        x = z.permute(0, 2, 3, 1).reshape(-1, D).clone().requires_grad_(True)        # (N, D)
        out, loss, dead = _encodec_rvq(states, x, K)
        (g_ref,) = torch.autograd.grad((w.permute(0, 2, 3, 1).reshape(-1, D) * out).sum() + loss, x)
        assert all(n > 0 for n in dead), dead                           # the draw encodec makes happened
        torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, D), out.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(losses["commitment_loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_ours.permute(0, 2, 3, 1).reshape(-1, D), g_ref, rtol=1e-12, atol=1e-12)
        for stage, st in zip(q.stages, states):
            torch.testing.assert_close(stage.codebook, st["embed"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(stage.ema_cluster_size, st["cluster_size"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(stage.ema_w, st["embed_avg"], rtol=1e-12, atol=1e-12)


def test_rvq_on_expiry_draws_as_encodec_over_steps_with_and_without_expiries():
    """--rvq_expiry_draw on_expiry follows encodec's random stream: 12 steps of S = 3 stages, K = 4, decay 0.8, on
    steps where some stages have expired codes and others none; every codebook, EMA count and output equals the
    transcription of encodec (which draws only when a code expired). The default (always) gives other codebooks from
    stage 2 on, the documented difference."""
    S, K, D = 3, 4, 2

    def run(mode, always_draw):
        q = vqvae.ResidualVQQuantizer(K, D, rvq_stages=S, decay=0.8, rvq_expiry_draw=mode).double().train()
        states, no_draw, draw = [{} for _ in range(S)], 0, 0
        for step in range(12):
            z = latents(B=1, D=D, H=4, W=4, scale=1.0 + step % 3, seed=30 + step).double()
            torch.manual_seed(100 + step)
            z_q, _, _ = q(z)
            torch.manual_seed(100 + step)
            x = z.permute(0, 2, 3, 1).reshape(-1, D)
            out, _, dead = _encodec_rvq(states, x, K, always_draw=always_draw, decay=0.8)
            no_draw += sum(n == 0 for n in dead)
            draw += sum(n > 0 for n in dead)
            yield q, states, z_q, out
        assert no_draw > 0 and draw > 0, (no_draw, draw)              # both kinds of stage-steps happened

    for q, states, z_q, out in run("on_expiry", always_draw=False):
        torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, D), out, rtol=1e-12, atol=1e-12)
        for stage, st in zip(q.stages, states):
            torch.testing.assert_close(stage.codebook, st["embed"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(stage.ema_cluster_size, st["cluster_size"], rtol=1e-12, atol=1e-12)
    *_, (q_always, _, _, _) = run("always", always_draw=True)
    *_, (_, encodec_states, _, _) = run("on_expiry", always_draw=False)
    assert not all(torch.allclose(a.codebook, st["embed"]) for a, st in zip(q_always.stages[1:], encodec_states[1:]))


@pytest.mark.parametrize("mode", ["encodec", "fixed"])
def test_rvq_first_step_after_kmeans_by_hand(mode):
    """encodec: k-means leaves the EMA sums at the centroids c (counts n), so the first update gives
    e = (0.99 c + 0.01 s) / N~ with N = 0.99 n + 0.01 m (m, s: this batch's counts and sums): each code
    divided by about its count (lucidrains/vector-quantize-pytorch #66). fixed: sums start at n c."""
    z = latents(B=4, D=4, H=4, W=4, scale=1.0, seed=3)
    x = z.permute(0, 2, 3, 1).reshape(-1, 4)                                   # (N, D)
    q = vqvae.ResidualVQQuantizer(8, 4, rvq_stages=1, rvq_codebook=mode, rvq_dead_code_threshold=0).train()
    torch.manual_seed(0)
    q(z)
    torch.manual_seed(0)
    c, n = vqvae.encodec_kmeans(x, 8, 50)
    assign = vqvae.squared_distances(x, c).argmin(1)
    m = torch.bincount(assign, minlength=8).float()
    s = torch.zeros(8, 4).index_add_(0, assign, x)
    N = 0.99 * n + 0.01 * m
    sums = 0.99 * (c if mode == "encodec" else c * n[:, None]) + 0.01 * s
    smoothed = (N + 1e-5) / (N.sum() + 8e-5) * N.sum()
    torch.testing.assert_close(q.stages[0].ema_cluster_size, N)
    torch.testing.assert_close(q.stages[0].codebook, sums / smoothed[:, None])
    shrink = float(q.stages[0].codebook.norm() / c.norm())
    assert (shrink < 0.8) if mode == "encodec" else (0.9 < shrink < 1.2), shrink


def test_rvq_encodec_dead_code_replacement_leaves_no_trace_and_fixed_keeps_it():
    """encodec replaces dead codes in the codebook, then the same step's EMA update rewrites every code
    (encodec issue #61): the step equals one without replacement. fixed restarts the code's EMA from
    the new vector, so it stays."""
    z = latents(B=2, D=4, H=4, W=4, scale=1.0, seed=4)

    def one_step(mode, threshold):
        torch.manual_seed(1)
        q = vqvae.ResidualVQQuantizer(8, 4, rvq_stages=1, rvq_kmeans_iters=0, rvq_codebook=mode,
                                      rvq_dead_code_threshold=threshold, ema_init_count=1.0).train()
        with torch.no_grad():
            q.stages[0].ema_cluster_size.copy_(torch.tensor([5.0, 5, 5, 5, 0.5, 0.5, 5, 5]))   # codes 4, 5 dead
        torch.manual_seed(2)
        idx = q(z)[2]["code_indices"].flatten()
        return q.stages[0], idx
    plain, idx = one_step("encodec", 0.0)
    for name in ("codebook", "ema_cluster_size", "ema_w"):
        assert torch.equal(getattr(one_step("encodec", 2.0)[0], name), getattr(plain, name)), name
    fixed, _ = one_step("fixed", 2.0)
    moved = (fixed.codebook - plain.codebook).norm(dim=1)
    assert (moved[[4, 5]] > 1e-3).all() and torch.allclose(moved[[0, 1, 2, 3, 6, 7]], torch.zeros(6), atol=1e-6)
    # a replaced code k restarts from a batch vector v: count 0.99 T + 0.01 m_k, sum 0.99 T v + 0.01 s_k
    torch.manual_seed(2)
    batch = z.permute(0, 2, 3, 1).reshape(-1, 4)                               # (N, D)
    v = batch[torch.randperm(batch.shape[0])[:8]]
    m = torch.bincount(idx, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, idx, batch)
    torch.testing.assert_close(fixed.ema_cluster_size[[4, 5]], 0.99 * 2.0 + 0.01 * m[[4, 5]])
    torch.testing.assert_close(fixed.ema_w[[4, 5]], 0.99 * 2.0 * v[[4, 5]] + 0.01 * sums[[4, 5]])


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
    q, x = _rvq_by_hand(rvq_kmeans_iters=0, rvq_dead_code_threshold=0)
    ref = vqvae.VQEMAQuantizer(2, 2, ema_smoothing="copy")
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
    with pytest.raises(vqvae.BavqError, match="cosine do"):
        tiny_config(quantizer="rvq", cosine=True)
