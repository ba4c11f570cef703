"""BA-VQ's fused fast path (vqvae_fused.py) is the reference (``blahut_arimoto`` + autograd, vqvae.py): the same
outputs, codes and gradients in float64 at every chunking, prior and loss; the column sums in linear or log space;
the float32 backward as accurate as autograd's at any beta, far codes included; its exp that flushes subnormals;
its memory (one kept (N, K) matrix) and the accumulators it reuses."""
import math

import pytest
import torch

import vqvae
import vqvae_fused
from vqvae import BAQuantizer, blahut_arimoto, squared_distances
from conftest import latent_grid, latents
from test_ba_vq_options import DIAGNOSTICS, quantizer, latents as option_latents




@pytest.mark.parametrize("codebook_cost,entropy_cost", [(1.0, 0.01), (0.0, 0.5), (2.0, 0.0)])
@pytest.mark.parametrize("chunk_rows", [0, 7])
@pytest.mark.parametrize("prior", ["batch", "ema"])
@pytest.mark.parametrize("cosine,beta", [(False, 3.0), (True, 0.7)])
def test_fused_ba_equals_autograd_reference(codebook_cost, entropy_cost, chunk_rows, prior, cosine, beta):
    """Training forward: outputs, indices, every loss and the gradients of z and the codebook are
    those of autograd through every BA iteration (float64, chunks of 7 rows exercise the chunk loop
    and remainder), starting from the uniform Q or from a non-uniform running marginal."""
    out = {}
    for impl in ("autograd", "fused"):
        torch.manual_seed(0)
        q = BAQuantizer(12, 5, codebook_cost=codebook_cost, entropy_cost=entropy_cost, ba_iterations=4,
                        ba_impl=impl, ba_chunk_rows=chunk_rows, cosine=cosine, ba_prior=prior).double().train()
        q.beta.fill_(beta)
        q.log_q_bar.copy_(torch.log_softmax(torch.randn(12, generator=torch.Generator().manual_seed(3)), 0))
        z = latents(B=2, D=5, H=3, W=5, scale=0.4).double().requires_grad_(True)
        z_q, losses, info = q(z)
        w = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        total = (w * z_q).sum() + sum(losses.values())
        total.backward()
        out[impl] = (z_q.detach(), {k: v.detach() for k, v in losses.items()}, info["code_indices"],
                     z.grad.clone(), q.codebook.grad.clone())
    (zq_a, L_a, i_a, gz_a, ge_a), (zq_f, L_f, i_f, gz_f, ge_f) = out["autograd"], out["fused"]
    torch.testing.assert_close(zq_f, zq_a)
    assert torch.equal(i_f, i_a)
    for k in L_a:
        torch.testing.assert_close(L_f[k], L_a[k])
    torch.testing.assert_close(gz_f, gz_a)
    torch.testing.assert_close(ge_f, ge_a)
    assert ge_a.abs().sum() > 0


def test_fused_ba_entropy_gradient_matches_finite_differences():
    """d H(Q_T) / d z through all iterations, checked against central differences."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.5
    E = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5

    def H(zz):
        _, lq, _ = vqvae_fused.ba_soft_quantize(zz, E, 2.0, 3, 4)
        return -(lq.exp() * lq).sum()
    zz = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(H(zz), zz)
    num = torch.zeros_like(z)
    for i in range(6):
        for j in range(3):
            zp, zm = z.clone(), z.clone()
            zp[i, j] += 1e-6
            zm[i, j] -= 1e-6
            num[i, j] = (H(zp) - H(zm)) / 2e-6
    torch.testing.assert_close(gz, num, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_normal_is_exp_with_exact_zeros_where_exp_would_be_subnormal(dtype):
    """exp_normal and its in-place form: exp(L) where exp(L) >= e x the smallest normal float, exactly 0 below
    (an entry at that floor instead of 0 makes every product with it subnormal: a matmul 90x slower on the CPU),
    -inf gives 0; the in-place form overwrites its argument and equals the other."""
    tiny = torch.finfo(dtype).tiny
    floor = math.log(tiny) + 1.0
    L = torch.tensor([0.0, -1.0, floor + 0.5, floor - 0.5, math.log(tiny) - 5.0, -1e4, -math.inf], dtype=dtype)
    want = torch.cat([L[:3].double().exp().to(dtype), torch.zeros(4, dtype=dtype)])   # L as stored in dtype
    out = vqvae_fused.exp_normal(L)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0.0)
    assert (out[3:] == 0).all() and (out[:3] >= math.e * tiny).all()
    L2 = L.clone()
    assert torch.equal(vqvae_fused.exp_normal_(L2), out) and torch.equal(L2, out)
    buf = torch.empty_like(L)
    assert torch.equal(vqvae_fused.exp_normal_to(L, buf), out) and torch.equal(buf, out)


@pytest.mark.parametrize("linear_sums", [True, False])
@pytest.mark.parametrize("log_q0", [False, True])
def test_fused_ba_column_sums_in_linear_or_log_space_equal_the_reference(linear_sums, log_q0):
    """The fused forward's two forms of sum_x P_t(k|x) (linear with the log-space fallback: the CPU path;
    log space: the GPU and compiled path) give the autograd reference's z_q, log Q, codes, diagnostics,
    centroid sums and gradients (float64, chunks of 7 rows), from the uniform Q or a given Q_0."""
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(30, 4, generator=g, dtype=torch.float64)
    E0 = torch.randn(9, 4, generator=g, dtype=torch.float64)
    q0 = torch.log_softmax(torch.randn(9, generator=g, dtype=torch.float64), 0) if log_q0 else None
    w = torch.randn(30, 4, generator=g, dtype=torch.float64)
    z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    zq, lq, idx, diag, sums = vqvae_fused.ba_soft_quantize(z, E, 1.5, 4, 7, log_q0=q0, full=True, centroid_sums=True,
                                                     linear_sums=linear_sums)
    ((w * zq).sum() - (lq.exp() * lq).sum()).backward()
    zr, Er = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    d = squared_distances(zr, Er)
    _, lq_r = blahut_arimoto(d, 1.5, 4, q0)                                       # entropy: z and E
    log_p, _ = blahut_arimoto(squared_distances(zr.detach(), Er), 1.5, 4, q0)    # z_q: E only (sg[z])
    p = log_p.exp()
    ((w * (p @ Er)).sum() - (lq_r.exp() * lq_r).sum()).backward()
    torch.testing.assert_close(zq, (p @ Er).detach())
    torch.testing.assert_close(lq, lq_r.detach())
    assert torch.equal(idx, log_p.argmax(1))
    torch.testing.assert_close(diag, torch.cat([vqvae_fused.distance_sums(d.detach()), vqvae.assignment_sums(log_p)]))
    torch.testing.assert_close(sums, p.t() @ z0)
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(E.grad, Er.grad)


@pytest.mark.parametrize("linear_sums", [True, False])
def test_fused_ba_backward_is_finite_and_exact_in_float32_with_far_codes(linear_sums):
    """A code thousands of units away (its Q underflows far below float32's range in linear space) at
    a large beta: the float32 fused log Q and gradients are finite and equal the float64 autograd ones,
    with the forward's column sums in linear space (the far code's column is recomputed in log space)
    or in log space throughout."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64)
    E = torch.randn(6, 4, generator=g, dtype=torch.float64)
    E[0] += 60.0                                                      # d ~ 3600: beta d ~ 1.8e5
    w = torch.randn(40, 4, generator=g, dtype=torch.float64)
    grads = {}
    for name, dtype in (("fused32", torch.float32), ("autograd64", torch.float64)):
        zz, EE = z.to(dtype).clone().requires_grad_(True), E.to(dtype).clone().requires_grad_(True)
        if name == "fused32":
            zq, lq, _ = vqvae_fused.ba_soft_quantize(zz, EE, 50.0, 4, 16, linear_sums=linear_sums)
        else:
            _, lq = blahut_arimoto(squared_distances(zz, EE), 50.0, 4)                  # entropy: z and E
            log_p, _ = blahut_arimoto(squared_distances(zz.detach(), EE), 50.0, 4)     # z_q: E only (sg[z])
            zq = log_p.exp() @ EE
        assert lq[0] < -1000                                          # the far code's mass: e^(-thousands)
        ((w.to(dtype) * zq).sum() - (lq.exp() * lq).sum()).backward()
        grads[name] = (zz.grad.double(), EE.grad.double(), lq.detach().double())
    for a, b in zip(grads["fused32"], grads["autograd64"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("linear_sums", [True, False])
def test_fused_ba_gradient_of_a_far_codes_log_q_equals_autograd(linear_sums):
    """A loss that weights log Q_T of every code, a far one included (d ~ 3600, beta 50: its Q is e^(-1.8e5), every
    P(k|x) of it far below float range's reach): d log Q_far / dz and dE are not small (moving the code toward the
    data raises its log Q), and the fused backward gets them from W_t = P_t / (N Q_t) in its shifted columns
    (``_column_shift``), in float64 as autograd does, and in chunks of 7 rows."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(30, 4, generator=g, dtype=torch.float64)
    E0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    E0[0] += 30.0
    c = torch.randn(6, generator=g, dtype=torch.float64)
    w = torch.randn(30, 4, generator=g, dtype=torch.float64)
    z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    zq, lq, _ = vqvae_fused.ba_soft_quantize(z, E, 50.0, 4, 7, linear_sums=linear_sums)
    assert lq[0] < -1000
    ((w * zq).sum() + (c * lq).sum()).backward()
    zr, Er = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
    _, lq_r = blahut_arimoto(squared_distances(zr, Er), 50.0, 4)
    log_p, _ = blahut_arimoto(squared_distances(zr.detach(), Er), 50.0, 4)
    ((w * (log_p.exp() @ Er)).sum() + (c * lq_r).sum()).backward()
    assert Er.grad[0].abs().max() > 1.0                               # the far code's log Q pulls it
    torch.testing.assert_close(z.grad, zr.grad)
    torch.testing.assert_close(E.grad, Er.grad)


def _sharp_beta_gradients(seed: int, beta: float, loss: str, impl: str, dtype: torch.dtype):
    """Gradients (z, codebook) of BA-VQ's training forward (N = 64 latents of 8 dims, K = 16 codes of which three
    lie far from every latent, 5 iterations, fixed absolute beta) under its default losses plus a decoder term
    (``default``) or under the entropy term alone (``entropy``). Latents and codes lie on a grid of 1/8, so that
    squared distances and beta x distances are exact in float32 as in float64: the float32 paths and the float64
    reference start from the same logits, and only the BA iterations and their backward round."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 8, generator=g, dtype=torch.float64)
    E = torch.randn(16, 8, generator=g, dtype=torch.float64)
    E[:3] += 6.0 * torch.randn(3, 8, generator=g, dtype=torch.float64).sign()        # three far codes
    z, E = (z * 8).round() / 8, (E * 8).round() / 8
    w = torch.randn(64, 8, generator=g, dtype=torch.float64)
    costs = dict(commitment_cost=0.25, entropy_cost=0.01, codebook_cost=1.0) if loss == "default" else \
        dict(commitment_cost=0.0, entropy_cost=1.0, codebook_cost=0.0)
    q = BAQuantizer(16, 8, ba_iterations=5, ba_impl=impl, **costs).to(dtype).train()
    q.beta.fill_(beta)
    with torch.no_grad():
        q.codebook.copy_(E)
    zz = latent_grid(z.to(dtype)).requires_grad_(True)
    z_q, losses, _ = q(zz)
    total = sum(losses.values()) + ((latent_grid(w.to(dtype)) * z_q).mean() if loss == "default" else 0.0)
    total.backward()
    return zz.grad.double(), q.codebook.grad.double()


@pytest.mark.parametrize("beta", [0.5, 20.0, 200.0, 2000.0])
@pytest.mark.parametrize("loss", ["default", "entropy"])
def test_fused_float32_gradients_are_as_accurate_as_autograd_at_any_beta(beta, loss):
    """The fused backward in float32 is as accurate as autograd's in float32, against a float64 reference, from a
    soft (beta 0.5) to a hard (beta 2000, logit gaps of thousands) assignment, with three far codes: summed over
    8 draws, its max-abs error of dz and of dE is at most 4x autograd's plus 1e-5 of the reference's max-abs plus
    1e-30. Summing over draws is what keeps the bound machine-independent: both errors are float32 rounding,
    and on one draw either may land well below its typical size (seen: a 6x ratio either way). The 1e-30: the
    fused pass flushes entries of P below e x float32's smallest normal (3.2e-38) to 0 for speed, which loses
    gradients of 1e-36 and below (beta 2000, where every larger term cancels exactly; autograd keeps them as
    subnormals), 22 orders below Adam's epsilon. Before the fix (W_t rebuilt by subtracting large log values,
    its columns assumed to sum to 1, P_t as W_t N Q_t) the fused error at beta 200 was 10-60x autograd's."""
    err = {"fused": torch.zeros(2), "autograd": torch.zeros(2)}
    scale = torch.zeros(2)
    for seed in range(8):
        ref = _sharp_beta_gradients(seed, beta, loss, "autograd", torch.float64)
        scale += torch.tensor([r.abs().max().item() for r in ref])
        for impl in err:
            got = _sharp_beta_gradients(seed, beta, loss, impl, torch.float32)
            err[impl] += torch.tensor([(a - r).abs().max().item() for a, r in zip(got, ref)])
    bound = 4 * err["autograd"] + 1e-5 * scale + 1e-30
    assert (err["fused"] <= bound).all(), (err, scale)
    assert scale[1] > 0


@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_fused_ba_keeps_one_n_by_k_matrix_for_the_backward(impl):
    """What BA-VQ's training forward saves for the backward (the memory that limits K at a batch):
    the fused path one (N, K) matrix plus (N, D) and (K,) tensors; autograd at least one per iteration."""
    B, D, H, W, K, T = 4, 4, 16, 16, 256, 5
    N = B * H * W
    q = BAQuantizer(K, D, ba_iterations=T, ba_impl=impl).train()
    z = latents(B=B, D=D, H=H, W=W, scale=0.4).requires_grad_(True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(z)
    saved, nk = sum(storages.values()), N * K * 4
    if impl == "fused":
        assert nk <= saved <= nk + 16 * N * D * 4 + 4 * (T + 1) * K * 4
    else:
        assert saved >= T * nk


def test_the_kept_backward_accumulators_carry_nothing_from_one_step_to_the_next():
    """BA-VQ's fused backward keeps its two (N, K) accumulators between steps on the CPU (``BAWorkspace``):
    a second backward on other latents, through the same workspace, gives the gradients of a fresh one, and
    a batch of another size gets tensors of its own size; a copy of the model starts with none."""
    import copy
    g = torch.Generator().manual_seed(4)
    E0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ws = vqvae_fused.BAWorkspace()

    def grads(z0, workspace):
        z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
        zq, lq, _ = vqvae_fused.ba_soft_quantize(z, E, 2.0, 3, 4, workspace=workspace)
        ((zq * z0.flip(0)).sum() - (lq.exp() * lq).sum()).backward()
        return z.grad, E.grad
    for n in (12, 12, 9):
        z0 = torch.randn(n, 3, generator=g, dtype=torch.float64)
        for a, b in zip(grads(z0, ws), grads(z0, None)):
            assert torch.equal(a, b)
        assert ws._kept["dA"].shape == (n, 7) and ws._kept["dA_b"].shape == (n, 7)
    q = BAQuantizer(8, 3).train()
    q(latents(B=1, D=3, H=2, W=2, scale=0.4).requires_grad_(True))[1]["entropy_loss"].backward()
    assert q._ba_workspace._kept and not copy.deepcopy(q)._ba_workspace._kept
    q.eval()                                                     # validation does not hold them
    assert not q._ba_workspace._kept


# --------------------------------------------------------------------------- with BA-VQ's options


@pytest.mark.parametrize("temperature", ["absolute", "relative"])
@pytest.mark.parametrize("cb_loss", ["mixture", "expected"])
@pytest.mark.parametrize("decoder_input", ["soft", "anneal"])
@pytest.mark.parametrize("chunk_rows", [0, 7])
def test_fused_equals_autograd_with_the_options(temperature, cb_loss, decoder_input, chunk_rows):
    """Float64: outputs, codes, losses, diagnostics and the gradients of z and the codebook agree."""
    out = {}
    for impl in ("autograd", "fused"):
        q = quantizer(K=12, D=5, ba_impl=impl, ba_iterations=4, ba_chunk_rows=chunk_rows, ba_temperature=temperature,
                      ba_codebook_loss=cb_loss, ba_decoder_input=decoder_input, entropy_cost=0.3).double().train()
        q.set_schedule(0.4)
        z = option_latents(D=5, H=3, W=5, dtype=torch.float64).requires_grad_(True)
        z_q, losses, info = q(z)
        w = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ((w * z_q).sum() + sum(losses.values())).backward()
        out[impl] = (z_q.detach(), losses, info, z.grad.clone(), q.codebook.grad.clone())
    (zq_a, L_a, i_a, gz_a, ge_a), (zq_f, L_f, i_f, gz_f, ge_f) = out["autograd"], out["fused"]
    torch.testing.assert_close(zq_f, zq_a)
    assert torch.equal(i_f["code_indices"], i_a["code_indices"])
    for k in L_a:
        torch.testing.assert_close(L_f[k].detach(), L_a[k].detach())
    for k in DIAGNOSTICS:
        torch.testing.assert_close(i_f[k].double(), i_a[k].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz_f, gz_a)
    torch.testing.assert_close(ge_f, ge_a)
