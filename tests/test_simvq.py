"""SimVQ (Zhu et al. 2024): the codes are a learned linear map of a frozen random codebook, its forward,
losses and gradients by hand, and it keeps more codes in use than plain VQ in a collapse-prone setting."""
import math

import pytest
import torch

import vqvae
from conftest import tiny_config, usage_after_training as _usage_after_training


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


@pytest.mark.parametrize("D", [4, 64])
def test_simvq_frozen_codebook_is_drawn_from_n_0_1_over_d(D):
    """The frozen codebook C has i.i.d. N(0, 1/D) entries (SimVQ, Zhu et al. 2024; the authors' code draws it
    with std D^-1/2), so every code has norm ~1 whatever D. Over K x D = 2^18 entries the sample mean and
    variance lie within 6 standard errors of 0 and 1/D (variance: se = sqrt(2 / n) / D, 0.28% of 1/D), and
    the share of entries within one standard deviation is the Gaussian erf(1/sqrt 2) = 0.6827 (a uniform
    law of the same variance gives 0.577). N(0, 1) would miss the variance by a factor D; two D pin 1/D."""
    n = 2 ** 18
    torch.manual_seed(0)
    C = vqvae.SimVQQuantizer(n // D, D).frozen_codebook.double()
    assert C.shape == (n // D, D)
    var = 1.0 / D
    assert abs(float(C.var()) - var) < 6 * math.sqrt(2.0 / n) * var, (float(C.var()), var)
    assert abs(float(C.mean())) < 6 * math.sqrt(var / n)
    inside, p = float((C.abs() < math.sqrt(var)).double().mean()), math.erf(1 / math.sqrt(2))
    assert abs(inside - p) < 6 * math.sqrt(p * (1 - p) / n), (inside, p)


@pytest.mark.parametrize("param,value,key", [("commitment_cost", 1.0, "commitment_loss"),
                                             ("codebook_cost", 3.0, "codebook_loss")])
def test_simvq_coefficients_change_behaviour(param, value, key):
    def run(**kw):
        torch.manual_seed(0)
        return vqvae.SimVQQuantizer(16, 8, **kw).train()(torch.randn(2, 8, 4, 4) * 0.5)[1][key].detach()
    assert not torch.allclose(run(), run(**{param: value}))


@pytest.mark.slow
def test_simvq_uses_more_codes_than_plain_vq_in_a_collapse_prone_setting(float64):
    """Fake images, K=64: plain VQ with codes drawn N(0, 1), far from the encoder's small ReLU outputs,
    collapses to one code (only chosen codes get a gradient); SimVQ, whose codes all move with W, uses
    more (the literature's claim, at toy scale). In float64, so that the count is the same on any CPU:
    measured 1 vs 2 codes after 3 epochs (in float32 on one CPU: 1 vs 3, a count that rounding moves)."""
    vq, simvq = _usage_after_training("vq", init="normal"), _usage_after_training("simvq")
    assert vq == 1 / 64 and simvq >= 2 / 64, (vq, simvq)
