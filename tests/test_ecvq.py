"""ECVQ (Chou, Lookabaugh & Gray 1989) as the paper defines it: the rule argmin_k d + lam l(k) on a hand-computed
case, its code lengths (the floor of an unused code, a restarted code's), lam = 0 as VQ-EMA bit for bit, the
descent of the Lagrangian D + lam H in the paper's batch algorithm, and BA-VQ's evaluation rule as ECVQ's rule at
lam = 1/beta."""
import math

import pytest
import torch

import vqvae
from conftest import tiny_config


def ecvq(K=3, D=1, lam=0.1, **kw):
    return vqvae.ECVQQuantizer(K, D, ecvq_lambda=lam, **kw).double()


@pytest.mark.parametrize("lam, code", [(0.1, 0), (0.01, 1), (0.0, 1)])
def test_the_rule_by_hand(lam, code):
    """Codes 0, 1, 3 on a line, EMA counts 8, 1, 1 (eps 1e-5): lengths ln(10/8) = 0.2231, ln 10 = 2.3026 (twice).
    z = 0.6: distances 0.36, 0.16, 5.76. lam 0.1: 0.3823 vs 0.3903, code 0 (not the nearest); lam 0.01: 0.3622 vs
    0.1830, code 1; lam 0: the nearest, code 1."""
    q = ecvq(lam=lam).eval()
    q.codebook.copy_(torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64))
    q.ema_cluster_size.copy_(torch.tensor([8.0, 1.0, 1.0], dtype=torch.float64))
    eps = q.epsilon
    expected = torch.tensor([math.log((10 + 3 * eps) / (8 + eps)), math.log((10 + 3 * eps) / (1 + eps)),
                             math.log((10 + 3 * eps) / (1 + eps))], dtype=torch.float64)
    torch.testing.assert_close(q.lengths(), expected, rtol=1e-12, atol=0)
    assert expected[0] == pytest.approx(0.2231, abs=1e-4) and expected[1] == pytest.approx(2.3026, abs=1e-4)
    z = torch.full((1, 1, 1, 1), 0.6, dtype=torch.float64)
    z_q, _, info = q(z)
    assert int(info["code_indices"].flatten()) == code
    assert float(z_q) == [0.0, 1.0, 3.0][code]


def test_an_unused_codes_length_is_finite_and_no_counts_give_ln_k():
    """The floor: Q(k) = (N_k + eps) / (sum N + K eps) > 0, so l(k) = ln((sum N + K eps) / eps) for an unused code;
    before any step (counts 0) every code has ln K."""
    q = ecvq(K=4)
    torch.testing.assert_close(q.lengths(), torch.full((4,), math.log(4), dtype=torch.float64), rtol=1e-12, atol=0)
    q.ema_cluster_size.copy_(torch.tensor([5.0, 3.0, 0.0, 2.0], dtype=torch.float64))
    floor = math.log((10 + 4 * q.epsilon) / q.epsilon)
    assert math.isfinite(float(q.lengths()[2])) and float(q.lengths()[2]) == pytest.approx(floor, rel=1e-12)
    assert float(q.lengths().max()) == float(q.lengths()[2])
    q.epsilon = 1e-3                                   # the floor follows epsilon
    assert float(q.lengths()[2]) == pytest.approx(math.log((10 + 4e-3) / 1e-3), rel=1e-12)


def test_a_restarted_code_gets_the_length_of_the_threshold():
    """A dead code restarted at a batch vector gets EMA count T (dead_code_threshold), so Q(k) = (T + eps) /
    (sum N + K eps): it is charged as a code that was used T times per step, not as an unused one."""
    torch.manual_seed(0)
    q = vqvae.ECVQQuantizer(4, 2, ecvq_lambda=0.5, dead_code_threshold=1.5).train()
    q(torch.randn(2, 2, 3, 3))                                        # one step: the last batch to draw from
    q.ema_cluster_size.copy_(torch.tensor([9.0, 4.0, 0.2, 6.0]))
    dead = q.restart_dead_codes()
    assert dead.tolist() == [False, False, True, False]
    total = 9.0 + 4.0 + 1.5 + 6.0
    assert float(q.lengths()[2]) == pytest.approx(math.log((total + 4 * q.epsilon) / (1.5 + q.epsilon)), rel=1e-6)


def _steps(cfg, n=4):
    torch.manual_seed(0)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    metrics, _ = vqvae.train_epoch(model, opt, train_u8[:n * cfg.batch_size], cfg, torch.Generator().manual_seed(0),
                                   0, n)
    return model, metrics


def test_lambda_zero_is_vq_ema_bit_for_bit():
    """Same seed, same data: after 4 training steps every weight and buffer and every metric is identical."""
    a, ma = _steps(tiny_config(quantizer="vq_ema"))
    b, mb = _steps(tiny_config(quantizer="ecvq", ecvq_lambda=0.0))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(mb) - set(ma) == {"ecvq_marginal_entropy_nats"}       # ECVQ also logs H(Q)
    for k in ma:
        assert (torch.equal(ma[k], mb[k]) if isinstance(ma[k], torch.Tensor) else ma[k] == mb[k]), k
    c, mc = _steps(tiny_config(quantizer="ecvq", ecvq_lambda=2.0))      # lam matters
    assert not torch.equal(c.state_dict()["quantizer.codebook"], sa["quantizer.codebook"])


def _mixture(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]], dtype=torch.float64)
    return centres[torch.randint(0, 4, (n,), generator=g)] + 0.6 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 4.0])
def test_the_batch_algorithms_lagrangian_never_increases(lam):
    """Chou et al.'s descent property: J = D + lam H after each pass of ecvq_batch is non-increasing (float64;
    each step minimises J over one variable with the others fixed)."""
    x = _mixture()
    g = torch.Generator().manual_seed(1)
    codes = x[torch.randperm(x.shape[0], generator=g)[:12]].clone()
    J = vqvae.ecvq_batch(x, codes, lam, 25)["lagrangian"]
    assert all(b <= a * (1 + 1e-12) + 1e-15 for a, b in zip(J, J[1:])), J
    assert J[-1] < J[0]


def test_a_larger_lambda_buys_fewer_bits_with_more_distortion():
    x = _mixture()
    codes = x[:16].clone()
    out = {lam: vqvae.ecvq_batch(x, codes, lam, 30) for lam in (0.0, 4.0)}

    def rate_and_distortion(o):
        p = torch.bincount(o["indices"], minlength=16).double() / x.shape[0]
        p = p[p > 0]
        return float(-(p * p.log()).sum()), float((x - o["codes"][o["indices"]]).pow(2).sum(1).mean())
    (h0, d0), (h4, d4) = rate_and_distortion(out[0.0]), rate_and_distortion(out[4.0])
    assert h4 < h0 - 0.5 and d4 > d0


@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0])
def test_ba_vqs_evaluation_rule_is_ecvqs_rule_at_lambda_one_over_beta(beta):
    """With absolute temperature, a fixed beta and the same marginal Q (BA-VQ's Q-bar, ECVQ's from its counts),
    argmax_k [ln Q(k) - beta d] = argmin_k [d + (1/beta) (-ln Q(k))]: the same code for every latent (float64)."""
    K, D = 16, 4
    g = torch.Generator().manual_seed(int(beta * 10))
    E = torch.randn(K, D, generator=g, dtype=torch.float64)
    z = torch.randn(2, D, 5, 5, generator=g, dtype=torch.float64)
    log_q = (torch.randn(K, generator=g, dtype=torch.float64) * 2).log_softmax(0)
    ba = vqvae.BAQuantizer(K, D, ba_temperature="absolute").double().eval()
    ba.codebook.data.copy_(E)
    ba.log_q_bar.copy_(log_q)
    ba.beta.fill_(beta)
    ec = vqvae.ECVQQuantizer(K, D, ecvq_lambda=1.0 / beta).double().eval()
    ec.codebook.copy_(E)
    total = 1000.0                                   # counts with (N_k + eps) / (sum N + K eps) = Q(k) exactly
    ec.ema_cluster_size.copy_(log_q.exp() * total - ec.epsilon)
    torch.testing.assert_close(ec.lengths(), -log_q, rtol=1e-10, atol=1e-12)
    a = ba(z)[2]["code_indices"]
    b = ec(z)[2]["code_indices"]
    assert torch.equal(a, b)
    assert not torch.equal(b, vqvae.squared_distances(z.permute(0, 2, 3, 1).reshape(-1, D), E).argmin(1).reshape(2, 5, 5))
