"""DiVeQ (Vali, Baeckstroem & Solin, ICLR 2026) as the authors' code with its class defaults: a training forward and
its gradients equal a float64 transcription of theirs given the same noise, the gradients are the analytic ones,
evaluation gives the nearest code, there is no loss, and the replacement of unused codes follows their rule (usage
counted once per forward, copies of used codes drawn by usage)."""
import pytest
import torch

import vqvae


def their_forward(z, codebook, noise, sigma):
    """DIVEQ.forward (AaltoML/DiVeQ, vqvae_compression/diveq.py): nearest code by the expanded squared distance,
    direction = c - z, random_vectors = N(0, sigma) + direction, normalised with clamp_min(1e-12), magnitude |c - z|
    not detached, z_q = z + magnitude * sg(normalised)."""
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
    idx = d.argmin(1)
    c = codebook[idx]
    rv = sigma * noise + (c - z)
    u = rv / torch.linalg.norm(rv, dim=1, keepdim=True).clamp_min(1e-12)
    return z + torch.linalg.norm(c - z, dim=1, keepdim=True) * u.detach(), idx


@pytest.mark.parametrize("sigma", [1e-3, 0.3])
def test_a_training_forward_equals_theirs_in_float64(sigma):
    """With the same Gaussian draw (the global RNG, seeded alike), the decoder input, the codes and the gradients of
    the latents and the codebook equal the transcription's."""
    torch.manual_seed(0)
    K, D = 16, 5
    q = vqvae.DiVeQQuantizer(K, D, diveq_sigma=sigma).double().train()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(K, D, dtype=torch.float64))
    z = torch.randn(2, D, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, D, 3, 3, dtype=torch.float64)
    torch.manual_seed(7)
    z_q, losses, info = q(z)
    (z_q * g).sum().backward()
    assert losses == {}                                                # no commitment, codebook or entropy term
    z2 = z.detach().clone().requires_grad_(True)
    cb = q.codebook.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    noise = torch.randn(18, D, dtype=torch.float64)
    out, idx = their_forward(vqvae._flatten_latents(z2), cb, noise, sigma)
    (vqvae._unflatten_latents(out, z.shape) * g).sum().backward()
    assert torch.equal(info["code_indices"].reshape(-1), idx)
    torch.testing.assert_close(z_q, vqvae._unflatten_latents(out, z.shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.codebook.grad, cb.grad, rtol=1e-10, atol=1e-12)


def test_without_noise_the_gradients_split_the_decoders_along_the_error():
    """sigma = 0: the latent gets g - (g.e) e and its code (g.e) e, e the unit error c - z; the two sum to g."""
    torch.manual_seed(1)
    q = vqvae.DiVeQQuantizer(4, 3, diveq_sigma=0.0).double().train()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(4, 3, dtype=torch.float64))
    z = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    z_q, _, info = q(z)
    (z_q * g).sum().backward()
    k = int(info["code_indices"])
    e = q.codebook.detach()[k] - z.detach().reshape(3)
    e = e / e.norm()
    gv = g.reshape(3)
    torch.testing.assert_close(z.grad.reshape(3), gv - (gv @ e) * e)
    torch.testing.assert_close(q.codebook.grad[k], (gv @ e) * e)
    torch.testing.assert_close(z_q.detach().reshape(3), q.codebook.detach()[k])     # no noise: the code itself


def test_evaluation_gives_the_nearest_code_and_changes_nothing():
    torch.manual_seed(2)
    q = vqvae.DiVeQQuantizer(8, 4).eval()
    z = torch.randn(2, 4, 3, 3)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z_q, _, info = q(z)
    nearest = vqvae.squared_distances(vqvae._flatten_latents(z), q.codebook.detach()).argmin(1)
    assert torch.equal(info["code_indices"].reshape(-1), nearest)
    torch.testing.assert_close(vqvae._flatten_latents(z_q), q.codebook.detach()[nearest])
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())


def test_usage_counts_each_code_once_per_forward_and_unused_codes_become_copies_of_used_ones():
    """Two forwards in which code 0 takes every latent: its usage is 2 (forwards), not 2 x latents. At the second
    forward (every 2) with threshold 0.6, codes used in under 1.2 forwards are replaced: here codes 1-3, each by a
    copy of code 0 (the only used one) plus perturbation x noise, and the counts restart."""
    q = vqvae.DiVeQQuantizer(4, 2, diveq_replace_every=2, diveq_discard_threshold=0.6, diveq_perturbation=0.5).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [6.0, 6.0], [-7.0, 7.0]]))
    z = torch.zeros(1, 2, 2, 2)
    q(z)
    assert q.usage.tolist() == [1.0, 0.0, 0.0, 0.0] and int(q.forwards) == 1
    torch.manual_seed(3)
    q(z)                                                               # the second forward replaces
    torch.manual_seed(3)
    torch.randn(4, 2)                                                  # the forward's own noise comes first
    draws = torch.multinomial(torch.tensor([2.0, 0.0, 0.0, 0.0]), 3, replacement=True)
    noise = torch.randn(3, 2)
    assert draws.tolist() == [0, 0, 0]
    torch.testing.assert_close(q.codebook.detach()[1:], 0.5 * noise)
    assert q.usage.tolist() == [0.0] * 4 and int(q.forwards) == 2
    mask = q.replace_unused()                                          # no used code: nothing to copy, counts reset
    assert not mask.any()


def test_their_defaults_and_no_remedies():
    cfg = vqvae.make_config({"quantizer": "diveq"})
    assert (cfg.diveq_sigma, cfg.diveq_replace_every, cfg.diveq_discard_threshold, cfg.diveq_perturbation) == \
        (1e-3, 100, 0.01, 1e-9)
    q = vqvae.DiVeQQuantizer(64, 3)
    assert float(q.codebook.detach().min()) >= 0 and float(q.codebook.detach().max()) < 1 / 64   # U[0, 1/K)
    with pytest.raises(vqvae.BavqError, match="diveq"):
        vqvae.make_config({"quantizer": "diveq", "dead_code_threshold": 1.0}).validate()
