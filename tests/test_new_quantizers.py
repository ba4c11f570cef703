"""The quantizers the field compares against, each against its paper's equations: SimVQ, SQ-VAE,
LFQ, residual VQ."""
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae
from conftest import tiny_config


def _simvq_by_hand():
    """K=3, D=2: C = [[1,0],[0,1],[1,1]], W = [[2,0],[0,1]], b = (0, 1) -> codes e = C W^T + b =
    [[2,1],[0,2],[2,2]]. Latents x1=(1.9,1.2) -> e0, x2=(0.2,1.8) -> e1, x3=(2.1,2.3) -> e2."""
    q = vqvae.SimVQQuantizer(3, 2, commitment_cost=0.25, codebook_cost=1.0)
    with torch.no_grad():
        q.frozen_codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        q.proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        q.proj.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[1.9, 1.2], [0.2, 1.8], [2.1, 2.3]])
    return q, x, torch.tensor([[2.0, 1.0], [0.0, 2.0], [2.0, 2.0]])


def test_simvq_forward_and_losses_by_hand():
    q, x, codes = _simvq_by_hand()
    torch.testing.assert_close(q.codes(), codes)
    z = x.t().reshape(1, 2, 1, 3).requires_grad_(True)                  # (B=1, D=2, H=1, W=3)
    z_q, losses, info = q.train()(z)
    assert info["code_indices"].flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(z_q.reshape(2, 3).t(), codes)
    sq = ((x - codes) ** 2).mean()                                      # (0.01+0.04 + 0.04+0.04 + 0.01+0.09)/6
    torch.testing.assert_close(losses["commitment_loss"], 0.25 * sq)
    torch.testing.assert_close(losses["codebook_loss"], sq)


def test_simvq_trains_only_the_linear_layer_and_the_encoder_gets_the_commitment_gradient():
    q, x, codes = _simvq_by_hand()
    z = x.t().reshape(1, 2, 1, 3).requires_grad_(True)
    _, losses, _ = q.train()(z)
    losses["codebook_loss"].backward(retain_graph=True)
    assert z.grad is None or torch.equal(z.grad, torch.zeros_like(z))   # sg[z]: nothing to the encoder
    # d/dW mean((e - x)^2) with e_k = W c_k + b: (2/6) sum_x (e - x) c^T, d/db = (2/6) sum_x (e - x)
    r = codes - x                                                        # (3, 2)
    C = q.frozen_codebook
    torch.testing.assert_close(q.proj.weight.grad, (2 / 6) * r.t() @ C)
    torch.testing.assert_close(q.proj.bias.grad, (2 / 6) * r.sum(0))
    assert not q.frozen_codebook.requires_grad and "frozen_codebook" in dict(q.named_buffers())
    q.proj.weight.grad = None
    losses["commitment_loss"].backward()
    torch.testing.assert_close(z.grad.reshape(2, 3).t(), 0.25 * 2 * (x - codes) / 6)
    assert q.proj.weight.grad is None or torch.equal(q.proj.weight.grad, torch.zeros(2, 2))


def test_simvq_codes_move_together_and_eval_changes_nothing():
    """One gradient step on W moves every code, also those no latent chose (unlike plain VQ)."""
    torch.manual_seed(0)
    q = vqvae.SimVQQuantizer(16, 8).train()
    z = torch.randn(2, 8, 2, 2)
    before = q.codes().detach().clone()
    _, losses, info = q(z)
    losses["codebook_loss"].backward()
    with torch.no_grad():
        for p in q.parameters():
            p -= 0.1 * p.grad
    moved = (q.codes().detach() - before).norm(dim=1) > 0
    assert moved.all() and (info["code_counts"] == 0).sum() > 5
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(z)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    with pytest.raises(vqvae.BavqError, match="frozen random matrix"):
        tiny_config(quantizer="simvq", dead_code_threshold=1.0)


@pytest.mark.parametrize("param,value,key", [("commitment_cost", 1.0, "commitment_loss"),
                                             ("codebook_cost", 3.0, "codebook_loss")])
def test_simvq_coefficients_change_behaviour(param, value, key):
    def run(**kw):
        torch.manual_seed(0)
        return vqvae.SimVQQuantizer(16, 8, **kw).train()(torch.randn(2, 8, 4, 4) * 0.5)[1][key].detach()
    assert not torch.allclose(run(), run(**{param: value}))


def _usage_after_training(quantizer, epochs=3, **kw):
    cfg = tiny_config(quantizer=quantizer, codebook_size=64, batch_size=32, lr=2e-3, **kw)
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    g, step = torch.Generator().manual_seed(0), 0
    for _ in range(epochs):
        _, step = vqvae.train_epoch(model, opt, train_u8, cfg, g, step, 8 * epochs)
    return vqvae.validate(model, val_u8, 64)["usage_rate"]


@pytest.mark.slow
def test_simvq_uses_more_codes_than_plain_vq_in_a_collapse_prone_setting():
    """Fake images, K=64: plain VQ with codes drawn N(0, 1), far from the encoder's small ReLU outputs,
    collapses to one code (only chosen codes get a gradient); SimVQ, whose codes all move with W, uses
    several (measured: 1 vs 3 codes after 3 epochs; the literature's claim, at toy scale)."""
    vq, simvq = _usage_after_training("vq", init="normal"), _usage_after_training("simvq")
    assert vq == 1 / 64 and simvq >= 3 / 64, (vq, simvq)



# --------------------------------------------------------------------------- SQ-VAE (Takida et al. 2022)


def _sq_by_hand(**kw):
    """K=3, D=2, s = 0 so sigma^2 = 1 + e^0 = 2; codes b = (0,0), (2,0), (0,2); two latents."""
    q = vqvae.SQVAEQuantizer(3, 2, sq_log_var_init=0.0, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[0.5, 0.0], [0.2, 1.5]])
    return q, x


def _latent_grid(x):
    return x.t().reshape(1, x.shape[1], 1, x.shape[0])                 # (N, D) -> (B=1, D, H=1, W=N)


def _sq_posterior(x, codes, var):
    """P(k|z) = exp(-||z - b_k||^2 / 2 sigma^2) / sum_j ..., written out in float64 with math."""
    rows = []
    for z in x.tolist():
        w = [math.exp(-sum((a - b) ** 2 for a, b in zip(z, c)) / (2 * var)) for c in codes.tolist()]
        rows.append([v / sum(w) for v in w])
    return torch.tensor(rows, dtype=torch.float64)


def test_sq_vae_eval_is_the_nearest_code_and_its_elbo_terms_by_hand():
    q, x = _sq_by_hand()
    q.image_values_per_position = 48
    z_q, losses, info = q.eval()(_latent_grid(x))
    assert info["code_indices"].flatten().tolist() == [0, 2]                   # nearest codes
    torch.testing.assert_close(z_q.reshape(2, 2).t(), torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    P = _sq_posterior(x, q.codebook.detach(), var=2.0)
    # per image: sum over positions; divided by D_x = positions x 48 -> mean over positions / 48
    kld_d = (P * P.log()).sum(1).mean() / 48
    kld_c = torch.tensor([0.25, 0.04 + 0.25]).double().div(2 * 2.0).mean() / 48    # ||z - b||^2 / (2 sigma^2)
    torch.testing.assert_close(losses["kld_discrete"].double(), kld_d)
    torch.testing.assert_close(losses["kld_continuous"].double(), kld_c)
    assert float(q.variance().detach()) == pytest.approx(2.0)


def test_sq_vae_training_is_the_gumbel_softmax_relaxation_with_the_scheduled_temperature():
    q, x = _sq_by_hand(sq_temperature_init=0.5, sq_temperature_decay=0.1, sq_temperature_min=0.0)
    q.train().set_schedule(0.0, step=9)                                  # the 10th step: tau = 0.5 e^-1
    assert float(q.temperature) == pytest.approx(0.5 * math.exp(-1.0))
    torch.manual_seed(3)
    g = -(-torch.rand(2, 3).log()).log()                                 # the Gumbel noise it will draw
    torch.manual_seed(3)
    z_q, losses, info = q(_latent_grid(x))
    P = _sq_posterior(x, q.codebook.detach(), var=2.0)
    y = ((P.log() + g.double()) / (0.5 * math.exp(-1.0))).softmax(1)   # (N, K)
    torch.testing.assert_close(z_q.reshape(2, 2).t().double(), y @ q.codebook.detach().double())
    assert info["code_indices"].flatten().tolist() == y.argmax(1).tolist()   # the sampled code
    kld_c = ((x.double() - y @ q.codebook.detach().double()) ** 2).sum(1).div(4.0).mean() / 48
    torch.testing.assert_close(losses["kld_continuous"].double(), kld_c)
    q.set_schedule(0.0, step=10 ** 6)
    assert float(q.temperature) == pytest.approx(0.5 * math.exp(-0.1 * (10 ** 6 + 1)), abs=0)
    q2 = vqvae.SQVAEQuantizer(3, 2, sq_temperature_init=1.0, sq_temperature_decay=1e-5, sq_temperature_min=0.3)
    q2.set_schedule(1.0, step=10 ** 6)
    assert float(q2.temperature) == pytest.approx(0.3)                 # the floor


def test_sq_vae_gradient_is_the_exact_derivative_of_the_relaxation_not_straight_through():
    """Fixed noise: autograd's gradient of the training output with respect to z, the codes and s
    equals finite differences (so no straight-through copy: the relaxation is differentiated)."""
    q, x = _sq_by_hand()
    q = q.double().train()
    q.set_schedule(0.0, step=0)
    z = _latent_grid(x).double().requires_grad_(True)

    def f(z, codebook, log_var):
        with torch.no_grad():
            q.codebook.copy_(codebook)
            q.log_var.copy_(log_var)
        torch.manual_seed(0)
        return q(z)
    def out(z, codebook, log_var):
        # functional form: the same maths with the parameters as inputs (so gradcheck can vary them)
        torch.manual_seed(0)
        zf = z.permute(0, 2, 3, 1).reshape(-1, 2)
        var = 1 + log_var.exp()
        log_p = (-torch.cdist(zf, codebook).pow(2) / (2 * var)).log_softmax(1)
        g = -(-torch.rand_like(log_p).log()).log()
        y = ((log_p + g) / q.temperature).softmax(1)
        return y @ codebook
    cb = q.codebook.detach().clone().requires_grad_(True)
    lv = q.log_var.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(out, (z, cb, lv))
    # the quantizer's own backward equals the functional form's
    z_q, losses, _ = f(z, cb.detach(), lv.detach())
    w = torch.randn_like(z_q)
    gz, gc, gs = torch.autograd.grad((w * z_q).sum(), (z, q.codebook, q.log_var), retain_graph=True)
    ref = torch.autograd.grad((w.permute(0, 2, 3, 1).reshape(-1, 2) * out(z, cb, lv)).sum(), (z, cb, lv))
    for a, b in zip((gz, gc, gs), ref):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(gz, w)                                    # not a straight-through copy
    gs_loss = torch.autograd.grad(sum(losses.values()), q.log_var)[0]
    assert gs_loss.abs() > 0                                            # sigma^2 is learned by the ELBO


def test_sq_vae_ar_elbo_reconstruction_term_and_validation_loss():
    q = vqvae.SQVAEQuantizer(4, 2)
    r = torch.tensor(0.25)
    torch.testing.assert_close(q.reconstruction_objective(r), 0.5 * torch.log(r))
    assert vqvae.SQVAEQuantizer(4, 2, sq_arelbo=False).reconstruction_objective(r) is r
    cfg = tiny_config(quantizer="sq_vae")
    model = vqvae.build_model(cfg)
    _, val_u8 = vqvae.load_dataset(cfg)
    m = vqvae.validate(model, val_u8, 1024)                             # one batch
    assert m["loss"] == pytest.approx(0.5 * math.log(m["recon_loss"]) + m["kld_discrete"] + m["kld_continuous"],
                                      rel=1e-5)
    assert m["sq_variance"] == pytest.approx(21.0, rel=1e-5)             # 1 + exp(log 20)


@pytest.mark.parametrize("param,value", [("sq_log_var_init", 1.0), ("sq_temperature_init", 0.2),
                                         ("sq_temperature_decay", 0.5), ("sq_temperature_min", 1.5)])
def test_sq_vae_coefficients_change_behaviour(param, value):
    def run(**kw):
        torch.manual_seed(0)
        q = vqvae.SQVAEQuantizer(16, 8, **kw).train()
        q.set_schedule(0.5, step=5)
        torch.manual_seed(1)
        z_q, losses, _ = q(torch.randn(2, 8, 4, 4))
        return torch.cat([z_q.flatten(), losses["kld_continuous"].reshape(1)]).detach()
    assert not torch.allclose(run(), run(**{param: value}))


def test_sq_vae_config_checks():
    with pytest.raises(vqvae.BavqError, match="sq_temperature_init must be > 0"):
        tiny_config(quantizer="sq_vae", sq_temperature_init=0.0)
    with pytest.raises(vqvae.BavqError, match="stochastic quantization is its own remedy"):
        tiny_config(quantizer="sq_vae", init="kmeans")


# --------------------------------------------------------------------------- LFQ (Yu et al. 2023)


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
        vqvae.LFQQuantizer(48, 8)
    def run(**kw):
        torch.manual_seed(0)
        q = vqvae.LFQQuantizer(16, 8, **kw).train()
        _, losses, _ = q(torch.randn(2, 8, 4, 4))
        return torch.stack(list(losses.values())).detach()
    for param, value in [("commitment_cost", 1.0), ("lfq_entropy_cost", 0.5), ("lfq_diversity_gamma", 2.0),
                         ("lfq_inv_temperature", 3.0)]:
        assert not torch.allclose(run(), run(**{param: value})), param


# --------------------------------------------------------------------------- residual VQ (SoundStream)


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


# --------------------------------------------------------------------------- collapse regression


@pytest.mark.slow
def test_sq_vae_uses_more_codes_than_plain_vq_in_a_collapse_prone_setting():
    """The same collapse-prone toy setting as above (5 epochs): SQ-VAE's stochastic quantization keeps
    codes alive where plain VQ ends with one (measured: 1 vs 4 codes)."""
    vq, sq = _usage_after_training("vq", epochs=5, init="normal"), _usage_after_training("sq_vae", epochs=5)
    assert vq == 1 / 64 and sq >= 3 / 64, (vq, sq)
