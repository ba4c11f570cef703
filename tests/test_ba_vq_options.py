"""BA-VQ's regime diagnostics and its options beyond the original method (the relative, scale-free
temperature, the hard / annealed decoder input, the expected-distortion codebook term, the soft EMA
codebook): every option is off by default, changes behaviour when on, and the fused path equals the reference."""
import math

import pytest
import torch

import vqvae
from vqvae import BAQuantizer


OPTIONS = {"ba_temperature": "relative", "ba_decoder_input": "hard", "ba_codebook_loss": "expected",
           "ba_codebook_update": "ema", "ba_assignment": "hard"}


DIAGNOSTICS = ("mean_distance", "nearest_distance", "logit_gap", "assignment_entropy_bits", "assignment_max",
               "marginal_entropy_bits", "beta_effective")


def latents(B=2, D=6, H=3, W=4, scale=0.5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, H, W, generator=g) * scale).to(dtype)


def quantizer(K=10, D=6, seed=0, **kw):
    torch.manual_seed(seed)
    q = BAQuantizer(K, D, **kw)
    with torch.no_grad():                     # codes at the latents' scale, so assignments are not uniform
        q.codebook.copy_(torch.randn(K, D, generator=torch.Generator().manual_seed(seed + 7)) * 0.5)
        if q.ema_codes:
            q.ema_w.copy_(q.codebook)                  # EMA count 1, sum = the code
    return q


# --------------------------------------------------------------------------- diagnostics by hand


def _hand_example(**kw):
    """N = 2 latents z = 0, 1 and K = 2 codes e = 0, 3 in one dimension; one BA iteration from the
    uniform Q, beta = ln 2 / 3: d = [[0, 9], [1, 4]], P = softmax(-beta d) = [[8/9, 1/9], [2/3, 1/3]]."""
    q = BAQuantizer(2, 1, ba_iterations=1, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [3.0]]))
    q.beta.fill_(math.log(2.0) / 3.0)
    z = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)                # (B, D, H, W) -> rows z = 0, 1
    return q, z


def _h_bits(*p):
    return -sum(x * math.log2(x) for x in p)


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("training", [True, False])
def test_diagnostics_equal_hand_computed_values(impl, training):
    q, z = _hand_example(ba_impl=impl)
    q.train(training)
    _, losses, info = q(z)
    beta = math.log(2.0) / 3.0
    expect = {"mean_distance": (0 + 9 + 1 + 4) / 4, "nearest_distance": (0 + 1) / 2,
              "logit_gap": beta * ((9 - 0) + (4 - 1)) / 2,                 # = 2 ln 2
              "assignment_entropy_bits": (_h_bits(8 / 9, 1 / 9) + _h_bits(2 / 3, 1 / 3)) / 2,
              "assignment_max": (8 / 9 + 2 / 3) / 2,
              # training: H(Q) of the batch, Q = mean of P = (7/9, 2/9); eval: H(Q-bar), Q-bar still uniform
              "marginal_entropy_bits": _h_bits(7 / 9, 2 / 9) if training else 1.0,
              "beta_effective": beta}
    for k, v in expect.items():
        assert float(info[k]) == pytest.approx(v, rel=1e-5), k
    # the hard code of each row: code 0 for both (P = 8/9 and 2/3)
    assert info["code_indices"].flatten().tolist() == [0, 0]


@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_relative_temperature_divides_beta_by_the_mean_distance(impl):
    q, z = _hand_example(ba_impl=impl, ba_temperature="relative")
    _, _, info = q.train()(z)
    beta = math.log(2.0) / 3.0
    assert float(info["beta_effective"]) == pytest.approx(beta / 3.5)
    assert float(info["logit_gap"]) == pytest.approx(beta / 3.5 * 6.0)
    assert float(q.mean_distance) == pytest.approx(3.5)               # the first batch is copied


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("training", [True, False])
def test_expected_codebook_term_equals_hand_computed_value(impl, training):
    """sum_x sum_k P(k|x) d(x,k) / (N D) = ((1/9) 9 + (2/3) 1 + (1/3) 4) / 2 = 1.5 (codebook_cost 1)."""
    q, z = _hand_example(ba_impl=impl, ba_codebook_loss="expected")
    _, losses, _ = q.train(training)(z)
    assert float(losses["codebook_loss"].detach()) == pytest.approx(1.5, rel=1e-5)
    q2, _ = _hand_example(ba_impl=impl)                               # the mixture term: mse(z, P.E)
    _, mix, _ = q2.train(training)(z)
    pe = [1 / 9 * 3, 1 / 3 * 3]                                        # P.E per row
    assert float(mix["codebook_loss"].detach()) == pytest.approx(((0 - pe[0]) ** 2 + (1 - pe[1]) ** 2) / 2, rel=1e-5)


def test_expected_distortion_and_its_gradient_are_the_centroid_step():
    """From counts and sums the loss equals the direct double sum, and its gradient is
    2 (n_k e_k - m_k) / (N D): zero exactly at the soft centroids m_k / n_k."""
    g = torch.Generator().manual_seed(0)
    z, E = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    P = torch.softmax(torch.randn(9, 5, generator=g, dtype=torch.float64), 1)
    n, m = P.sum(0), P.t() @ z
    E.requires_grad_(True)
    loss = vqvae.expected_distortion(z, E, n, m)
    direct = (P * vqvae.squared_distances(z, E)).sum() / z.numel()
    torch.testing.assert_close(loss, direct)
    loss.backward()
    torch.testing.assert_close(E.grad, 2.0 * (n[:, None] * E - m) / z.numel())
    centroids = (m / n[:, None]).requires_grad_(True)
    vqvae.expected_distortion(z, centroids, n, m).backward()
    torch.testing.assert_close(centroids.grad, torch.zeros_like(centroids))


# --------------------------------------------------------------------------- the scale-free temperature


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("c", [8.0, 3.7])
def test_relative_temperature_assignments_are_invariant_to_the_latent_scale(impl, c):
    """Multiplying z and the codebook by c leaves P (hence the codes, Q and H(P)) unchanged with the
    relative temperature, in training and (after a step sets the running mean distance) in eval;
    with the absolute temperature they change."""
    def run(temperature, scale):
        q = quantizer(ba_impl=impl, ba_temperature=temperature, ba_iterations=3)
        with torch.no_grad():
            q.codebook.mul_(scale)
        q.set_schedule(0.5)
        z = latents() * scale
        _, _, tr = q.train()(z)
        _, _, ev = q.eval()(latents(seed=2) * scale)
        return tr, ev
    for temperature in ("relative", "absolute"):
        (tr1, ev1), (trc, evc) = run(temperature, 1.0), run(temperature, c)
        same = [torch.equal(a["code_indices"], b["code_indices"]) and
                math.isclose(float(a["assignment_entropy_bits"]), float(b["assignment_entropy_bits"]), rel_tol=1e-4)
                for a, b in ((tr1, trc), (ev1, evc))]
        if temperature == "relative":
            assert all(same)
            for a, b in ((tr1, trc), (ev1, evc)):
                assert float(b["mean_distance"]) == pytest.approx(c * c * float(a["mean_distance"]), rel=1e-4)
                for k in ("logit_gap", "marginal_entropy_bits", "assignment_max"):
                    assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-6), k
        else:
            assert not any(same)


def test_running_mean_distance_follows_its_ema_and_eval_uses_it():
    q = quantizer(ba_temperature="relative", marginal_decay=0.9).train()
    assert math.isnan(float(q.mean_distance))
    z1, z2 = latents(seed=1), latents(seed=2, scale=2.0)
    d1 = float(vqvae.mean_pair_distance(vqvae._flatten_latents(z1), q.codebook.detach()))
    q(z1)
    assert float(q.mean_distance) == pytest.approx(d1)
    d2 = float(vqvae.mean_pair_distance(vqvae._flatten_latents(z2), q.codebook.detach()))
    q(z2)
    assert float(q.mean_distance) == pytest.approx(0.9 * d1 + 0.1 * d2)
    _, _, info = q.eval()(latents(seed=3, scale=5.0))                 # eval: the running value, not the batch's
    assert float(info["beta_effective"]) == pytest.approx(float(q.beta) / (0.9 * d1 + 0.1 * d2))


def test_mean_pair_distance_equals_the_mean_of_the_distance_matrix():
    g = torch.Generator().manual_seed(0)
    z, E = torch.randn(13, 5, generator=g, dtype=torch.float64) + 3.0, torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vqvae.mean_pair_distance(z, E), vqvae.squared_distances(z, E).mean())


# --------------------------------------------------------------------------- the decoder input


@pytest.mark.parametrize("t,lam", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_decoder_input_soft_hard_and_annealed(t, lam):
    """Training decoder input: soft = P.E (the default), hard = the argmax-P code, anneal =
    (1 - lam) P.E + lam x hard code with lam on beta's cosine schedule; eval: always the hard code."""
    z = latents()
    out = {}
    for mode in ("soft", "hard", "anneal"):
        q = quantizer(ba_decoder_input=mode).train()
        q.set_schedule(t)
        z_q, _, info = q(z)
        out[mode] = (z_q.detach(), info)
        if mode == "anneal":
            assert q.extra_metrics()["hard_weight"] == pytest.approx(lam)
    E = quantizer().codebook.detach()
    hard = E[out["hard"][1]["code_indices"]].permute(0, 3, 1, 2)      # (B, D, H, W)
    q = quantizer().train()
    q.set_schedule(t)
    soft = q(z)[0].detach()                                            # the default is soft
    torch.testing.assert_close(out["soft"][0], soft)
    torch.testing.assert_close(out["hard"][0], hard)
    torch.testing.assert_close(out["anneal"][0], (1 - lam) * soft + lam * hard)
    assert not torch.allclose(soft, hard, atol=1e-3)
    for mode in ("hard", "anneal"):                                    # the commitment is to what the decoder sees
        q = quantizer(ba_decoder_input=mode, commitment_cost=0.3).train()
        q.set_schedule(t)
        z_q, losses, _ = q(z)
        torch.testing.assert_close(losses["commitment_loss"], 0.3 * ((z - out[mode][0]) ** 2).mean())
    for mode in ("soft", "hard", "anneal"):                            # eval is the hard code whatever the mode
        q = quantizer(ba_decoder_input=mode).eval()
        z_q, _, info = q(z)
        torch.testing.assert_close(z_q, E[info["code_indices"]].permute(0, 3, 1, 2))


def test_hard_decoder_input_passes_the_decoder_gradient_straight_through():
    q = quantizer(ba_decoder_input="hard").train()
    z = latents().requires_grad_(True)
    z_q, _, _ = q(z)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    (w * z_q).sum().backward()
    torch.testing.assert_close(z.grad, w)


# --------------------------------------------------------------------------- options: off by default, change behaviour


def test_options_are_off_by_default():
    cfg = vqvae.Config()
    assert (cfg.ba_temperature, cfg.ba_decoder_input, cfg.ba_codebook_loss, cfg.ba_codebook_update, cfg.ba_prior,
            cfg.ba_assignment) == ("absolute", "soft", "mixture", "gradient", "batch", "soft")
    q = vqvae.build_model(vqvae.make_config({"quantizer": "ba_vq", "codebook_size": 8, "latent_dim": 4,
                                             "hidden_dim": 4})).quantizer
    assert (q.ba_temperature, q.ba_decoder_input, q.ba_codebook_loss) == ("absolute", "soft", "mixture")
    assert "mean_distance" not in dict(q.named_buffers()) and q.codebook.requires_grad     # learned by gradient


@pytest.mark.parametrize("option", list(OPTIONS) + ["anneal"])
def test_each_option_changes_behaviour(option):
    """One training step from the same state: the decoder input, a loss or the codebook's gradient differ."""
    kw = {"ba_decoder_input": "anneal"} if option == "anneal" else {option: OPTIONS[option]}

    def step(**kw):
        q = quantizer(**kw).train()
        q.set_schedule(0.3)
        z = latents().requires_grad_(True)
        z_q, losses, _ = q(z)
        sum(losses.values()).backward()
        cb = q.codebook.grad.clone() if q.codebook.grad is not None else q.codebook.detach().clone()
        return z_q.detach(), torch.stack([v.detach() for v in losses.values()]), cb
    base, new = step(), step(**kw)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(base, new))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_unknown_option_values_are_refused(option):
    with pytest.raises(vqvae.BavqError, match=option):
        vqvae.make_config({"quantizer": "ba_vq", option: "bogus"}).validate()


# --------------------------------------------------------------------------- diagnostics reach the history


def test_training_epochs_and_validation_report_the_diagnostics(tmp_path):
    from conftest import tiny_config
    import json
    cfg = tiny_config(quantizer="ba_vq", out_dir=str(tmp_path), epochs=2, checkpoint_every=0)
    vqvae.train(cfg)
    rows = [json.loads(l) for l in (tmp_path / cfg.resolved_name() / "history.jsonl").read_text().splitlines()]
    for row in rows:
        for k in DIAGNOSTICS:
            assert math.isfinite(row[f"train/{k}"]) and math.isfinite(row[f"val/{k}"]), k
        assert row["train/assignment_max"] <= 1.0 and row["train/logit_gap"] >= 0
    # the epoch's mean beta_effective lies between the schedule's ends
    assert cfg.beta_start < rows[0]["train/beta_effective"] < rows[1]["train/beta_effective"] < cfg.beta_end


# --------------------------------------------------------------------------- the soft EMA codebook


@pytest.mark.parametrize("smoothing", ["overwrite", "copy"])
@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_soft_ema_update_equals_its_definition(impl, smoothing):
    """One training step: the output uses the codes before the step; then N = decay N0 + (1 - decay) n,
    m = decay m0 + (1 - decay) P^T z, e = m / N~ (N Laplace-smoothed), with P the reference BA's final
    assignments (N0 = 1, m0 = the initial codes); --ema_smoothing as for VQ-EMA: overwrite (the default)
    stores N~ as the EMA counts, copy keeps N. The codebook is a buffer, not a parameter."""
    q = quantizer(ba_codebook_update="ema", ba_impl=impl, decay=0.8, epsilon=0.1, ba_iterations=3,
                  **({} if smoothing == "overwrite" else {"ema_smoothing": smoothing})).train()
    assert "codebook" not in dict(q.named_parameters())
    q.set_schedule(0.7)
    E0 = q.codebook.clone()
    z = latents()
    z_flat = vqvae._flatten_latents(z)
    log_p, _ = vqvae.blahut_arimoto(vqvae.squared_distances(z_flat, E0), float(q.beta), 3)
    P = log_p.exp()
    z_q, losses, _ = q(z)
    torch.testing.assert_close(z_q, (P @ E0).reshape(2, 3, 4, 6).permute(0, 3, 1, 2))   # soft, old codes
    N = 0.8 * torch.ones(10) + 0.2 * P.sum(0)
    m = 0.8 * E0 + 0.2 * P.t() @ z_flat
    smoothed = (N + 0.1) / (N.sum() + 10 * 0.1) * N.sum()
    torch.testing.assert_close(q.codebook, m / smoothed[:, None])
    torch.testing.assert_close(q.ema_cluster_size, smoothed if smoothing == "overwrite" else N)
    assert float(losses["codebook_loss"]) == 0.0                       # no codebook term: nothing to learn by gradient


@pytest.mark.parametrize("smoothing", ["overwrite", "copy"])
def test_soft_ema_with_sharp_assignments_is_vq_ema(smoothing):
    """beta -> infinity makes P one-hot at the nearest code: three steps of the soft EMA equal VQ-EMA
    with the same start state (EMA counts 1, sums = the codes) and the same --ema_smoothing, so the
    flagship comparison with --ba_codebook_update ema differs in the assignment alone."""
    ba = quantizer(ba_codebook_update="ema", ba_iterations=2, ema_smoothing=smoothing).train()
    ema = vqvae.VQEMAQuantizer(10, 6, ema_init_count=1.0, ema_smoothing=smoothing).train()
    with torch.no_grad():
        ema.codebook.copy_(ba.codebook)
        ema.ema_w.copy_(ba.codebook)
    for step in range(3):
        ba.beta.fill_(1e6)
        z = latents(seed=10 + step)
        _, _, i_ba = ba(z)
        _, _, i_ema = ema(z)
        assert torch.equal(i_ba["code_indices"], i_ema["code_indices"])
        torch.testing.assert_close(ba.codebook, ema.codebook)


def test_soft_ema_restart_and_data_init_set_count_and_sum():
    q = quantizer(ba_codebook_update="ema", dead_code_threshold=0.5).train()
    codes = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    counts = torch.arange(10.0)
    q.load_codes(codes, counts)
    torch.testing.assert_close(q.ema_w, codes * counts[:, None])
    torch.testing.assert_close(q.ema_cluster_size, counts)
    q(latents())
    dead = q.restart_dead_codes()
    assert dead.any()
    torch.testing.assert_close(q.ema_cluster_size[dead], torch.full((int(dead.sum()),), 0.5))
    torch.testing.assert_close(q.ema_w[dead], 0.5 * q.codebook[dead])


@pytest.mark.parametrize("remedy", [{"cvq": True}, {"affine_reparam": "ema"}])
def test_soft_ema_refuses_gradient_codebook_remedies(remedy):
    with pytest.raises(vqvae.BavqError, match="ba_codebook_update"):
        vqvae.make_config({"quantizer": "ba_vq", "ba_codebook_update": "ema", **remedy}).validate()


# --------------------------------------------------------------------------- the gap ladder's options


def test_hard_ba_iterations_by_hand():
    """Codes 0, 1, 3 on a line; latents 0.1, 0.2, 0.3, 0.6, 2.1; beta = 2, uniform start. Iteration 1 (uniform Q):
    the nearest codes 0, 0, 0, 1, 2, so Q = (3/5, 1/5, 1/5). Iteration 2: for 0.6, ln 0.6 - 2 (0.36) = -1.231 beats
    ln 0.2 - 2 (0.16) = -1.929, so it joins code 0; 2.1 stays with code 2 (ln 0.2 - 1.62 = -3.23 vs -4.03).
    Q = (4/5, 0, 1/5): code 1 is dropped (log Q = -inf) and iteration 3 changes nothing."""
    E = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    x = torch.tensor([[0.1], [0.2], [0.3], [0.6], [2.1]], dtype=torch.float64)
    d = vqvae.squared_distances(x, E)
    idx1, log_q1 = vqvae.blahut_arimoto_hard(d, 2.0, 1)
    assert idx1.tolist() == [0, 0, 0, 1, 2]
    torch.testing.assert_close(log_q1.exp(), torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64))
    for iterations in (2, 3):
        idx, log_q = vqvae.blahut_arimoto_hard(d, 2.0, iterations)
        assert idx.tolist() == [0, 0, 0, 0, 2]
        torch.testing.assert_close(log_q.exp(), torch.tensor([0.8, 0.0, 0.2], dtype=torch.float64))
        assert log_q[1] == -math.inf


def test_hard_ba_is_the_soft_iteration_at_the_argmax_of_each_row():
    """--ba_assignment hard in a training step: the codes are the hard iteration's, the decoder input is the chosen
    code, the marginal entropy that of the batch histogram, and the diagnostics say P is one-hot."""
    q = quantizer(ba_assignment="hard", ba_iterations=3).train()
    q.beta.fill_(4.0)
    z = latents()
    E0 = q.codebook.detach().clone()
    idx, log_q = vqvae.blahut_arimoto_hard(vqvae.squared_distances(vqvae._flatten_latents(z), E0), 4.0, 3)
    z_q, losses, info = q(z)
    assert torch.equal(info["code_indices"].flatten(), idx)
    torch.testing.assert_close(z_q, E0[idx].reshape(2, 3, 4, 6).permute(0, 3, 1, 2))
    p = log_q.exp()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    torch.testing.assert_close(float(info["entropy"]), float(h))
    assert float(info["assignment_max"]) == 1.0 and float(info["assignment_entropy_bits"]) == 0.0
    q.eval()
    out = q(z)[2]                                   # evaluation: one-hot P from Q-bar, I(X;K) = H(Q-bar)
    h_bar = -(q.log_q_bar.double().exp() * q.log_q_bar.double()).sum() / math.log(2.0)
    torch.testing.assert_close(float(out["mutual_information_bits"]), float(h_bar), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_hard_ba_with_the_running_prior_and_one_iteration_is_ecvq(steps):
    """The ladder's second rung is its first in BA-VQ's code: --ba_assignment hard --ba_prior ema --ba_iterations 1,
    absolute beta, --ba_codebook_update ema_hard, from the same state as ECVQ at lam = 1/beta (Q-bar = ECVQ's Q, the
    same EMA counts and sums), gives the same codes, codebook and commitment loss in a training step. They part
    afterwards only in how the marginal moves: ECVQ's from its EMA counts, BA-VQ's Q-bar as its own EMA."""
    K, D, beta = 12, 3, 2.0
    g = torch.Generator().manual_seed(5)
    E = torch.randn(K, D, generator=g, dtype=torch.float64)
    counts = torch.rand(K, generator=g, dtype=torch.float64) * 20
    ba = BAQuantizer(K, D, ba_assignment="hard", ba_prior="ema", ba_iterations=1, ba_codebook_update="ema_hard",
                     beta_start=beta, beta_end=beta, decay=0.9).double().train()
    ec = vqvae.ECVQQuantizer(K, D, ecvq_lambda=1.0 / beta, decay=0.9).double().train()
    for q in (ba, ec):
        q.codebook.copy_(E)
        q.ema_cluster_size.copy_(counts)
        q.ema_w.copy_(E * counts[:, None])
    ba.log_q_bar.copy_(-ec.lengths())
    for step in range(steps):
        z = torch.randn(4, D, 3, 3, generator=g, dtype=torch.float64)
        a, b = ba(z), ec(z)
        if step == 0:
            assert torch.equal(a[2]["code_indices"], b[2]["code_indices"])
            torch.testing.assert_close(ba.codebook, ec.codebook, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a[1]["commitment_loss"], b[1]["commitment_loss"], rtol=1e-12, atol=0)
            assert not torch.equal(a[2]["code_indices"],             # the rate term chose some other code
                                   vqvae.squared_distances(vqvae._flatten_latents(z), E).argmin(1).reshape(4, 3, 3))
    if steps > 1:                                                      # the marginals have moved apart by now
        assert not torch.allclose(ba.log_q_bar, -ec.lengths(), rtol=1e-6, atol=1e-6)


def test_ema_hard_moves_the_codes_as_vq_ema_moves_the_argmax_codes():
    """--ba_codebook_update ema_hard with soft P: the codebook takes VQ-EMA's update (decay, Laplace smoothing) with
    the argmax-P codes' counts and sums, where ema takes P's soft counts and sums."""
    q = quantizer(ba_codebook_update="ema_hard", decay=0.8, epsilon=0.1, ba_iterations=3).train()
    q.set_schedule(0.5)
    E0 = q.codebook.clone()
    z = latents()
    z_flat = vqvae._flatten_latents(z)
    log_p, _ = vqvae.blahut_arimoto(vqvae.squared_distances(z_flat, E0), float(q.beta), 3)
    idx = log_p.argmax(1)
    assert log_p.exp().max(1).values.min() < 0.9                      # P is soft here
    q(z)
    n = torch.bincount(idx, minlength=10).float()
    N = 0.8 * torch.ones(10) + 0.2 * n
    m = 0.8 * E0 + 0.2 * torch.zeros(10, 6).index_add_(0, idx, z_flat)
    smoothed = (N + 0.1) / (N.sum() + 10 * 0.1) * N.sum()
    torch.testing.assert_close(q.codebook, m / smoothed[:, None])
