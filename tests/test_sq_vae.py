"""SQ-VAE (Takida et al. 2022): the Gaussian posterior over codes, the Gumbel-softmax relaxation with its
temperature schedule, the ELBO terms by hand and their exact gradients, and it keeps more codes in use than
plain VQ in a collapse-prone setting."""
import math

import pytest
import torch

import vqvae
from conftest import latent_grid as _latent_grid, tiny_config, usage_after_training as _usage_after_training


def _sq_by_hand(**kw):
    """K=3, D=2, s = 0 so sigma^2 = 1 + e^0 = 2; codes b = (0,0), (2,0), (0,2); two latents."""
    q = vqvae.SQVAEQuantizer(3, 2, sq_log_var_init=0.0, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[0.5, 0.0], [0.2, 1.5]])
    return q, x


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


@pytest.mark.parametrize("tau", [1.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sq_vae_training_kld_discrete_is_of_the_posterior_not_of_the_relaxed_sample(tau, seed):
    """In training the discrete KL term is sum_k P log P of the posterior P(k|z) = softmax(-d / 2 sigma^2)
    (the docstring's formula; sony/sqvae computes it from these assignment probabilities), not of the
    Gumbel-softmax sample y that the decoder receives: whatever the noise and the temperature it equals
    the float64 value by hand, and so does its gradient with respect to z (it reaches z through P only)."""
    q, x = _sq_by_hand(sq_temperature_init=tau, sq_temperature_decay=0.0)
    q = q.double().train()
    q.image_values_per_position = 48
    q.set_schedule(0.0, step=0)                                          # tau, no decay
    P = _sq_posterior(x, q.codebook.detach(), var=2.0)                   # (N, K), float64 by hand
    # d = (0.25, 2.25, 4.25), (2.29, 5.49, 0.29); P = softmax(-d / 4)
    torch.testing.assert_close(P, torch.tensor([[0.5065, 0.3072, 0.1863], [0.3228, 0.1450, 0.5322]],
                                               dtype=torch.float64), atol=1e-4, rtol=0)
    expected = (P * P.log()).sum(1).mean() / 48                          # (-1.0202 - 0.9807) / 2 / 48
    z = _latent_grid(x).double().requires_grad_(True)
    torch.manual_seed(seed)
    _, losses, _ = q(z)
    torch.testing.assert_close(losses["kld_discrete"], expected, rtol=1e-12, atol=0)
    (gz,) = torch.autograd.grad(losses["kld_discrete"], z)

    def kld(zf):                                                         # the same formula, rows (N, D)
        log_p = (-((zf[:, None, :] - q.codebook.detach()) ** 2).sum(2) / 4.0).log_softmax(1)
        return (log_p.exp() * log_p).sum(1).mean() / 48
    xf = x.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(kld(xf), xf)
    torch.testing.assert_close(gz.reshape(2, 2).t(), ref, rtol=1e-10, atol=1e-14)


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


# --------------------------------------------------------------------------- collapse regression


@pytest.mark.slow
def test_sq_vae_uses_more_codes_than_plain_vq_in_a_collapse_prone_setting(float64):
    """The same collapse-prone toy setting as SimVQ's (test_simvq.py; 3 epochs, float64): SQ-VAE's stochastic
    quantization keeps codes alive where plain VQ ends with one (measured: 1 vs 5 codes; after 5 epochs 1 vs 6,
    1 vs 4 in float32)."""
    vq, sq = _usage_after_training("vq", init="normal"), _usage_after_training("sq_vae")
    assert vq == 1 / 64 and sq >= 3 / 64, (vq, sq)
