"""What every built-in quantizer shares, parametrized over them: output shapes and info, the eval output is a
codebook row, a complete state_dict, straight-through gradients, float32 assignments under autocast, an eval
forward that changes no state, and coefficients that each change behaviour."""
import pytest
import torch

import vqvae
from vqvae import squared_distances
from conftest import latents, make_model, make_quantizer


QUANTIZER_NAMES = list(vqvae.QUANTIZERS)


CODEBOOK_QUANTIZERS = ["vq_ema", "vq", "ba_vq"]          # the ones with a codebook (all but fsq)


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_interface_shapes(name, training):
    q = make_quantizer(name, K=16, D=8).train(training)
    z = latents(B=3, D=8, H=5, W=7)
    z_q, losses, info = q(z)
    assert z_q.shape == z.shape
    S = q.codes_per_position
    stages = (S,) if S > 1 else ()                                    # residual VQ, OptVQ: S indices per position
    assert info["code_indices"].shape == (3, *stages, 5, 7) and info["code_indices"].dtype == torch.long
    K = q.num_embeddings                                              # 16 (rvq: 16 per stage)
    assert info["code_counts"].shape == (K,) and int(info["code_counts"].sum()) == info["code_indices"].numel()
    assert 1.0 <= float(info["perplexity"]) <= K
    assert 0.0 < float(info["usage_rate"]) <= 1.0
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert set(losses) == set(vqvae.QUANTIZERS[name].loss_names)


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_eval_output_is_the_hard_code(name):
    """In eval mode z_q is exactly a codebook row at the reported index (BA: argmax of P)."""
    q = make_quantizer(name).eval()
    z = latents()
    z_q, _, info = q(z)
    codebook = q.codebook.detach()
    expected = codebook[info["code_indices"]].permute(0, 3, 1, 2)     # (B, D, H, W)
    torch.testing.assert_close(z_q, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_model_state_dict_is_complete(name):
    """Codebook state is in the state_dict, so a reloaded model quantizes identically."""
    m1 = make_model(name)
    m1.train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m1(x)  # one training step changes EMA buffers / nothing for BA
    m1.quantizer.set_schedule(0.5)
    torch.manual_seed(123)
    m2 = make_model(name)
    m2.load_state_dict(m1.state_dict())
    m1.eval(), m2.eval()
    with torch.no_grad():
        a, b = m1(x), m2(x)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[3]["code_indices"], b[3]["code_indices"])


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_eval_forward_leaves_state_dict_bit_identical(name):
    torch.manual_seed(0)
    model = make_model(name)
    model.train()
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    model(x)  # make EMA buffers non-trivial
    model.quantizer.set_schedule(0.4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x)
    model(x)  # with grad enabled too
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", QUANTIZER_NAMES)
def test_straight_through_gradient_reaches_encoder(name):
    """The reconstruction loss alone gives the encoder a gradient through the STE line."""
    torch.manual_seed(0)
    model = make_model(name).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    _, recon_loss, _, _ = model(x)
    recon_loss.backward()
    g = model.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_ste_copies_gradient_exactly():
    """d(sum(w * z_q))/dz = w: the straight-through line is an identity in the backward pass."""
    for name in CODEBOOK_QUANTIZERS:
        q = make_quantizer(name).train()
        z = latents().requires_grad_(True)
        w = torch.randn_like(z)
        z_q, _, _ = q(z)
        (w * z_q).sum().backward()
        torch.testing.assert_close(z.grad, w)


# --------------------------------------------------------------------------- float32 assignments under autocast


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_argmin_is_float32_under_autocast(name):
    """Near-tie codes: bf16 distances would pick wrong codes; the quantizer must not."""
    g = torch.Generator().manual_seed(0)
    D, K = 64, 32
    centres = torch.randn(K // 2, D, generator=g)
    base = torch.cat([centres, centres + 0.02 * torch.randn(K // 2, D, generator=g)])   # pairs of near codes
    q = make_quantizer(name, K=K, D=D).eval()
    if name == "ba_vq":
        q.beta.fill_(1e6)  # hard assignments: argmax P = argmin d
    with torch.no_grad():
        q.codebook.copy_(base)
    pick = torch.randint(0, K // 2, (512,), generator=g)
    z_flat = (base[pick] + base[pick + K // 2]) / 2 + 0.005 * torch.randn(512, D, generator=g)
    z_flat = z_flat.bfloat16().float()                  # representable in bf16: only the maths may differ
    z = z_flat.reshape(8, 8, 8, D).permute(0, 3, 1, 2)
    exact = squared_distances(z_flat, base).argmin(1)
    bf16 = squared_distances(z_flat.bfloat16(), base.bfloat16()).float().argmin(1)
    assert (bf16 != exact).any(), "test premise: bf16 distances must be wrong somewhere"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, info = q(z.bfloat16())
    assert torch.equal(info["code_indices"].flatten(), exact)


# --------------------------------------------------------------------------- every coefficient matters


@pytest.mark.parametrize("name,param,value,what", [
    ("vq_ema", "commitment_cost", 1.0, "commitment_loss"),
    ("vq_ema", "decay", 0.5, "codebook"),
    ("vq_ema", "epsilon", 1e-1, "codebook"),
    ("ba_vq", "commitment_cost", 1.0, "commitment_loss"),
    ("ba_vq", "entropy_cost", 0.5, "entropy_loss"),
    ("ba_vq", "codebook_cost", 3.0, "codebook_loss"),
    ("ba_vq", "ba_iterations", 1, "entropy_loss@end"),
    ("ba_vq", "beta_start", 2.0, "entropy_loss"),
    ("ba_vq", "beta_end", 20.0, "entropy_loss@end"),
])
def test_every_coefficient_changes_behaviour(name, param, value, what):
    def run(**kw):
        q = make_quantizer(name, **kw).train()
        if what.endswith("@end"):
            q.set_schedule(1.0)
        else:
            q.set_schedule(0.0)
        _, losses, _ = q(latents(scale=0.5))
        key = what.split("@")[0]
        return (q.codebook.detach().clone() if key == "codebook" else losses[key].detach())
    assert not torch.allclose(run(), run(**{param: value}))
