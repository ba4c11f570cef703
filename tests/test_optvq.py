"""OptVQ (Zhang et al. 2024) as the authors' code under their CIFAR-10 config: one training step equals a float64
transcription of their forward (zbr17/OptVQ, src/optvq/models/quantizer.py), Sinkhorn's plan on hand-computed cases,
the uniform marginal it forces, the two evaluation rules (batch-dependent Sinkhorn, per-latent nearest), and several
heads as several codes per position with the rate as the sum of the heads' entropies."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae


# --------------------------------------------------------------------------- a transcription of their forward

def their_forward(z, table, proj_w, proj_b, heads=4, epsilon=10.0, n_iters=5, beta=0.25):
    """VectorQuantizerSinkhorn.forward with loss_q_type l2, use_prob False, normalize_mode all, use_proj, one process,
    written in their order and orientation: (B, C, H, W) -> (B, HW, C) -> (B HW heads, d); cdist; z-score over the
    matrix and shift to min 0; sinkhorn on the (K, N) transpose with its 1e-8 guards; argmax; loss
    mean((x - sg xq)^2) + beta mean((xq - sg x)^2); x + sg(xq - x)."""
    B, C, H, W = z.shape
    x = z.permute(0, 2, 3, 1).reshape(B, H * W, C).reshape(B * H * W, C)
    d = C // heads
    x = x.view(-1, d)
    embed = F.linear(table, proj_w, proj_b)
    dist = torch.cdist(x, embed, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    with torch.no_grad():
        A = (dist - dist.mean()) / (dist.std() + 1e-6)
        A = A - A.min()
        Q = torch.exp(-A * epsilon).t()
        K_, N_ = Q.shape
        Q = Q / (Q.sum() + 1e-8)
        for _ in range(n_iters):
            Q = Q / (Q.sum(dim=1, keepdim=True) + 1e-8)
            Q = Q / K_
            Q = Q / (Q.sum(dim=0, keepdim=True) + 1e-8)
            Q = Q / N_
        Q = (Q * N_).t()
        idx = Q.argmax(dim=-1)
    xq = embed[idx]
    loss = torch.mean((x - xq.detach()) ** 2) + beta * torch.mean((xq - x.detach()) ** 2)
    out = (x + (xq - x).detach()).view(B, H * W, C).view(B, H, W, C).permute(0, 3, 1, 2)
    return out, loss, idx.view(B, H * W, heads).view(B, H, W, heads).permute(0, 3, 1, 2), Q


@pytest.mark.parametrize("heads", [4, 1])
def test_one_training_step_equals_their_forward_in_float64(heads):
    """Codes, decoder input, loss and every gradient (encoder, table, projection) of one training step equal the
    transcription's, in float64, for their 4 heads and for one."""
    torch.manual_seed(0)
    K, D = 64, 8
    q = vqvae.OptVQQuantizer(K, D, optvq_heads=heads).double().train()
    z = (torch.randn(3, D, 4, 4, dtype=torch.float64) * 0.7).requires_grad_(True)
    z_q, losses, info = q(z)
    (z_q.square().sum() + sum(losses.values())).backward()
    mine = [z.grad.clone(), q.table.grad.clone(), q.proj.weight.grad.clone(), q.proj.bias.grad.clone()]
    z2 = z.detach().clone().requires_grad_(True)
    t, w, b = (p.detach().clone().requires_grad_(True) for p in (q.table, q.proj.weight, q.proj.bias))
    out, loss, idx, _ = their_forward(z2, t, w, b, heads=heads)
    (out.square().sum() + loss).backward()
    assert torch.equal(info["code_indices"], idx if heads > 1 else idx[:, 0])
    torch.testing.assert_close(z_q, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(losses.values()), loss, rtol=1e-12, atol=1e-14)
    for a, b_ in zip(mine, [z2.grad, t.grad, w.grad, b.grad]):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
    # the transport moved codes: Sinkhorn's argmax is not the nearest code everywhere
    nearest = vqvae.squared_distances(q._sub_vectors(z.detach()), q.codes().detach()).argmin(1)   # (B H W heads,)
    rows = info["code_indices"].permute(0, 2, 3, 1) if heads > 1 else info["code_indices"]          # the same order
    assert not torch.equal(nearest, rows.reshape(-1))


# --------------------------------------------------------------------------- Sinkhorn by hand

def test_sinkhorn_on_a_symmetric_two_by_two_cost():
    """C = [[0, ln 3], [ln 3, 0]], eps = 1: the kernel [[1, 1/3], [1/3, 1]] is already balanced, so every iteration
    keeps it, and the plan (rows summing to 1) is [[3/4, 1/4], [1/4, 3/4]]."""
    c = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]], dtype=torch.float64)
    for iterations in (1, 5):
        P = vqvae.optvq_sinkhorn(c, 1.0, iterations)
        torch.testing.assert_close(P, torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)


def test_sinkhorn_forces_equal_use_where_the_nearest_code_would_not():
    """Latents 0, 0.1, 0.2, 0.3 and codes 0, 1 on a line: every latent's nearest code is 0, but the plan gives each
    code half the mass, so the two latents nearest to code 1 (0.2, 0.3) take it."""
    x = torch.tensor([[0.0], [0.1], [0.2], [0.3]], dtype=torch.float64)
    E = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    d = vqvae.squared_distances(x, E).sqrt()
    assert d.argmin(1).tolist() == [0, 0, 0, 0]
    P = vqvae.optvq_sinkhorn(vqvae.optvq_normalized_cost(d), 10.0, 50)
    torch.testing.assert_close(P.sum(1), torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(P.sum(0), torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert P.argmax(1).tolist() == [0, 0, 1, 1]


def test_the_cost_is_z_scored_over_the_matrix_and_shifted_to_zero():
    d = torch.rand(30, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5 + 2
    c = vqvae.optvq_normalized_cost(d)
    assert float(c.min()) == 0.0
    torch.testing.assert_close(c.std(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(c, (d - d.min()) / (d.std() + 1e-6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("setting", [{"optvq_epsilon": 1.0}, {"optvq_iterations": 1}])
def test_epsilon_and_iterations_change_the_codes(setting):
    torch.manual_seed(3)
    z = torch.randn(4, 8, 4, 4, dtype=torch.float64)
    codes = []
    for kw in ({}, setting):
        torch.manual_seed(0)
        q = vqvae.OptVQQuantizer(32, 8, optvq_heads=1, **kw).double().train()
        codes.append(q(z)[2]["code_indices"])
    assert not torch.equal(*codes)


# --------------------------------------------------------------------------- evaluation rules

def _eval_pair(rule):
    torch.manual_seed(0)
    q = vqvae.OptVQQuantizer(32, 8, optvq_heads=1, optvq_eval=rule).double().eval()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, 8, 4, 4, dtype=torch.float64, generator=g) * 0.5
    whole = q(z)[2]
    half = q(z[:4])[2]
    return q, z, whole, half


def test_sinkhorn_evaluation_codes_depend_on_the_batch_and_nearest_ones_do_not():
    """The authors' evaluation runs the transport over the evaluation batch: the same latents get other codes in a
    smaller batch. Nearest-code evaluation codes each latent on its own. Each reports the other rule's decoder
    input and the share of codes on which the two rules agree."""
    _, _, whole, half = _eval_pair("sinkhorn")
    assert not torch.equal(whole["code_indices"][:4], half["code_indices"])
    assert set(whole["other_decoder_inputs"]) == {"nearest"}
    q, z, whole, half = _eval_pair("nearest")
    assert torch.equal(whole["code_indices"][:4], half["code_indices"])
    assert set(whole["other_decoder_inputs"]) == {"sinkhorn"}
    nearest = vqvae.squared_distances(q._sub_vectors(z), q.codes()).argmin(1)
    assert torch.equal(whole["code_indices"].reshape(-1), nearest)
    sink = q.assign(q._sub_vectors(z), q.codes(), "sinkhorn")
    torch.testing.assert_close(float(whole["code_agreement"]), float((sink == nearest).double().mean()))
    assert float(whole["code_agreement"]) < 1.0


def test_validation_runs_sinkhorn_evaluation_at_the_training_batch_size():
    base = dict(quantizer="optvq", batch_size=48, latent_dim=8, optvq_heads=2)
    assert vqvae.default_val_batch_size(vqvae.make_config(base)) == 48
    assert vqvae.default_val_batch_size(vqvae.make_config({**base, "optvq_eval": "nearest"})) == 1024
    assert vqvae.OptVQQuantizer.batch_dependent(vqvae.make_config(base))


# --------------------------------------------------------------------------- heads, config

def test_several_heads_are_several_codes_per_position_and_the_rate_sums_their_entropies():
    """Two heads: code_indices (B, 2, H, W) from one shared codebook, decode_indices gives back the eval decoder
    input, the histogram keeps the heads apart, and code_entropy_bits is the sum of the heads' entropies, at least
    the entropy of the pair (combined_entropy_bits)."""
    torch.manual_seed(0)
    q = vqvae.OptVQQuantizer(16, 6, optvq_heads=2, optvq_eval="nearest").double().eval()
    z = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    z_q, _, info = q(z)
    assert info["code_indices"].shape == (5, 2, 3, 3)
    torch.testing.assert_close(q.decode_indices(info["code_indices"]), z_q)
    counts = info["code_counts"]
    assert counts.shape == (32,) and int(counts[:16].sum()) == int(counts[16:].sum()) == 45
    for h in range(2):
        assert torch.equal(counts[16 * h:16 * (h + 1)], torch.bincount(info["code_indices"][:, h].reshape(-1),
                                                                         minlength=16))
    m = q.histogram_metrics(counts, 5)
    h_sum = sum(float(vqvae.entropy_bits(counts[16 * h:16 * (h + 1)])) for h in range(2))
    assert m["code_entropy_bits"] == pytest.approx(h_sum) and m["bits_per_image"] == pytest.approx(h_sum * 9)
    joint = q.code_set_metrics(info["code_indices"])["combined_entropy_bits"]
    assert joint <= m["code_entropy_bits"] + 1e-9
    x, alphabet = q._rows_in_code_order(z), q.codes()                  # sub-vectors in code_indices' order
    assert torch.equal(info["code_indices"].reshape(-1), vqvae.squared_distances(x, alphabet).argmin(1))


def test_their_loss_weights_and_heads_that_must_divide_the_latent():
    cfg = vqvae.make_config({"quantizer": "optvq"})
    assert (cfg.commitment_cost, cfg.codebook_cost, cfg.optvq_heads, cfg.optvq_epsilon, cfg.optvq_iterations,
            cfg.optvq_eval) == (1.0, 0.25, 4, 10.0, 5, "sinkhorn")
    with pytest.raises(vqvae.BavqError, match="optvq_heads 3 must divide latent_dim 64"):
        vqvae.make_config({"quantizer": "optvq", "latent_dim": 64, "optvq_heads": 3}).validate()
    with pytest.raises(vqvae.BavqError, match="optvq"):
        vqvae.make_config({"quantizer": "optvq", "dead_code_threshold": 1.0}).validate()
