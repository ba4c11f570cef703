"""The collapse toolkit: each remedy (codebook inits, dead-code restarts, cosine distance, the rotation
trick, loss warm-up, gradient clipping, two-stage training, CVQ-VAE's online clustered codebook, the affine
reparameterisation, the synchronized update, alternating optimisation) against its update equation by hand
and then raising code usage in a collapse-prone setting, and the diagnostics that show collapse."""
import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train as cli
import vqvae
from conftest import history, tiny_config
from vqvae import VQQuantizer, kmeans_codebook, rotation_trick, squared_distances


CODEBOOK_QUANTIZERS = ["vq_ema", "vq", "ba_vq"]


def latents(B=2, D=8, H=4, W=4, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, H, W, generator=g) * scale


def _grid(x):
    return x.t().reshape(1, x.shape[1], 1, x.shape[0])                 # (N, D) -> (B=1, D, H=1, W=N)


def _vq(K, D, **kw):
    torch.manual_seed(0)
    return vqvae.VQQuantizer(K, D, **kw)


# --------------------------------------------------------------------------- rotation trick


def test_rotation_trick_forward_is_the_hard_code_and_backward_rotates():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64)
    out = rotation_trick(z, q)
    torch.testing.assert_close(out, q)                                # forward: exactly the code
    up = torch.randn(5, 4, generator=g, dtype=torch.float64)
    (gz,) = torch.autograd.grad((out * up).sum(), z)
    for i in range(5):                                                # backward: (lambda R)^T g, R e = e' rotation
        e, c = z[i].detach(), q[i]
        u, v = e / e.norm(), c / c.norm()
        w = (u + v) / (u + v).norm()
        R = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        torch.testing.assert_close(R @ u, v)
        torch.testing.assert_close(R.T @ R, torch.eye(4, dtype=torch.float64))   # a rotation
        torch.testing.assert_close(gz[i], (c.norm() / e.norm()) * R.T @ up[i])
    assert not torch.allclose(gz, up)                                 # not the straight-through copy


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_rotation_estimator_in_quantizers(name):
    torch.manual_seed(0)
    q = vqvae.QUANTIZERS[name](16, 8, gradient_estimator="rotation").eval()
    z = latents().requires_grad_(True)
    z_q, _, info = q(z)
    hard = q.codebook.detach()[info["code_indices"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, hard, rtol=1e-5, atol=1e-6)      # forward: the hard code
    w = torch.randn_like(z)
    (g_rot,) = torch.autograd.grad((w * z_q).sum(), z)
    assert not torch.allclose(g_rot, w)                               # STE would give exactly w


def test_rotation_trick_falls_back_to_straight_through_for_a_zero_latent():
    z = torch.zeros(3, 4, requires_grad=True)
    q = torch.randn(3, 4)
    out = rotation_trick(z, q)
    torch.testing.assert_close(out, q)
    (g,) = torch.autograd.grad(out.sum(), z)
    torch.testing.assert_close(g, torch.ones(3, 4))                  # the straight-through copy, finite


# --------------------------------------------------------------------------- init


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, -5.0]])
    sizes = torch.tensor([50, 100, 150, 200])
    x = torch.cat([c + 0.1 * torch.randn(n, 3, generator=g) for c, n in zip(centers, sizes)])
    c, counts = kmeans_codebook(x, 4, iters=10, generator=torch.Generator().manual_seed(1))
    order = squared_distances(centers, c).argmin(1)                   # match found centres to true ones
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(c[order], centers, atol=0.05, rtol=0)
    assert counts[order].tolist() == sizes.float().tolist()


def test_an_empty_cluster_is_reseeded_at_the_farthest_point():
    """Centres p0, p0 (a duplicate: its cluster is empty) and (100, 100) (no point near it): both empty
    centres move onto the data points farthest from their own centres, so every cluster has points."""
    x = torch.tensor([[0.0, 0.0]] * 10 + [[1.0, 0.0]] * 10 + [[3.0, 0.0], [0.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 0.0], [100.0, 100.0]])
    new = vqvae._reseed_empty_clusters(x, c)
    assert new[0].tolist() == [0.0, 0.0]
    assert sorted(map(tuple, new[1:].tolist())) == [(0.0, 4.0), (3.0, 0.0)]   # the two farthest points
    assert (torch.bincount(squared_distances(x, new).argmin(1), minlength=3) > 0).all()


@pytest.mark.parametrize("distinct,K", [(40, 16), (3, 5)])
def test_kmeans_gives_every_code_a_data_point_and_a_positive_count(distinct, K):
    """Latents with many exact duplicates (as ReLU outputs at initialisation are: many all-zero rows).
    With at least K distinct rows every cluster is non-empty; with fewer, coinciding centres share
    their points' count equally. Either way the counts sum to N and are all positive."""
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(distinct, 4, generator=g).relu()
    pts[0] = 0.0
    x = torch.cat([pts[0].expand(500, 4), pts[torch.randint(0, distinct, (300,), generator=g)]])
    c, counts = kmeans_codebook(x, K, iters=10, generator=torch.Generator().manual_seed(1))
    assert (counts > 0).all() and counts.sum() == pytest.approx(x.shape[0])
    assert squared_distances(c, x).min(1).values.max() < 1e-6 or distinct >= K   # few points: centres are points
    q = vqvae.VQEMAQuantizer(K, 4).train()
    q.load_codes(c, counts / 10)
    q(x.t().reshape(1, 4, 1, -1))
    # an empty cluster with count 0 would become exactly 0 here; a code at a zero data point is zero anyway
    assert torch.isfinite(q.codebook).all() and ((q.codebook.norm(dim=1) > 0) | (c.norm(dim=1) == 0)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_kmeans_init_uses_more_codes_than_uniform_init(name, tmp_path):
    """Structured data (fake images); initial usage = validation usage before any training."""
    usages = {}
    for init in ("uniform", "kmeans"):
        cfg = tiny_config(quantizer=name, init=init, codebook_size=32, out_dir=str(tmp_path))
        train_u8, val_u8 = vqvae.load_dataset(cfg)
        model = vqvae.build_model(cfg)
        if init == "kmeans":
            vqvae.init_from_data(model, train_u8, cfg)
        usages[init] = vqvae.validate(model, val_u8, 64)["usage_rate"]
    if name == "ba_vq":   # at beta_start = 0.1 the BA assignment still leans on Q, so fewer codes win
        assert usages["kmeans"] > 3 * usages["uniform"], usages
    else:
        assert usages["kmeans"] >= 0.5 and usages["kmeans"] > usages["uniform"] + 0.3, usages


def test_kmeans_init_sets_vq_ema_statistics_consistently():
    cfg = tiny_config(init="kmeans", codebook_size=16, kmeans_batches=2)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    vqvae.init_from_data(model, train_u8, cfg)
    q = model.quantizer
    torch.testing.assert_close(q.ema_w, q.ema_cluster_size[:, None] * q.codebook)   # count x code
    # counts are per batch: they sum to the number of latent vectors in one batch
    assert float(q.ema_cluster_size.sum()) == pytest.approx(cfg.batch_size * 8 * 8, rel=1e-5)
    # so the first EMA step moves the codes only a little (they are not reset toward 0)
    before = q.codebook.clone()
    model.train()(vqvae.to_float(train_u8[:64]))
    assert (q.codebook - before).norm() < 0.2 * before.norm()


@pytest.mark.parametrize("key,a,b", [("kmeans_iters", 0, 10), ("kmeans_batches", 1, 3)])
def test_kmeans_settings_change_the_initial_codebook(key, a, b):
    books = []
    for v in (a, b):
        cfg = tiny_config(init="kmeans", codebook_size=16, **{key: v})
        train_u8, _ = vqvae.load_dataset(cfg)
        model = vqvae.build_model(cfg)
        vqvae.init_from_data(model, train_u8, cfg)
        books.append(model.quantizer.codebook.clone())
    assert not torch.allclose(books[0], books[1])


def test_normal_init_is_standard_normal():
    torch.manual_seed(0)
    q = VQQuantizer(512, 64, init="normal")
    c = q.codebook.detach()
    assert abs(float(c.std()) - 1.0) < 0.02 and abs(float(c.mean())) < 0.02
    u = VQQuantizer(512, 64)
    assert float(u.codebook.detach().abs().max()) <= 1 / 512


def test_unit_sphere_init_has_norm_sqrt_d_and_removes_norm_driven_collapse():
    q = _vq(64, 16, init="unit_sphere")
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.full((64,), 4.0))
    assert (q.codebook @ q.codebook.t()).fill_diagonal_(0).abs().max() < 16.0      # 64 distinct directions
    # ReLU-like latents small next to the codes: with N(0, 1) codes (random norms) every latent goes to
    # the shortest code; with every code at the same norm the angle decides
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4096, 16, generator=g).abs() * 0.1).t().reshape(1, 16, 64, 64)
    used = {init: int((_vq(64, 16, init=init).eval()(z)[2]["code_counts"] > 0).sum()) for init in ("normal", "unit_sphere")}
    assert used["normal"] <= 4 and used["unit_sphere"] >= 30, used           # measured: 4 vs 38


@pytest.mark.parametrize("quantizer", ["vq_ema", "vq", "ba_vq"])
def test_data_init_codes_are_encoder_outputs_with_consistent_usage(quantizer):
    cfg = tiny_config(quantizer=quantizer, init="data", kmeans_batches=2)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    vqvae.init_from_data(model, train_u8, cfg)
    # the same draw of training images (seeded by cfg.seed) through the same encoder
    idx = torch.randperm(train_u8.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:2 * cfg.batch_size]
    with torch.no_grad():
        z = vqvae._flatten_latents(model.encoder(vqvae.to_float(train_u8[idx])))      # (n*64, D)
    q = model.quantizer
    codes = q._codes().detach()
    assert (codes[:, None, :] == z[None]).all(-1).any(1).all()                        # every code is a latent, exactly
    g = torch.Generator().manual_seed(cfg.seed)
    torch.randperm(train_u8.shape[0], generator=g)                                     # the image draw, then:
    pick = torch.randperm(z.shape[0], generator=g)[:cfg.codebook_size]                 # K latents at random
    torch.testing.assert_close(codes, F.normalize(z[pick], dim=1) if q.cosine else z[pick], rtol=0, atol=0)
    assert len({tuple(c.tolist()) for c in codes}) == cfg.codebook_size                # K different ones
    usage = q.usage_per_step()
    assert (usage > 0).all() and float(usage.sum()) == pytest.approx(z.shape[0] / 2)  # latents per batch
    if quantizer == "vq_ema":
        torch.testing.assert_close(q.ema_w, codes * usage[:, None])


# --------------------------------------------------------------------------- dead-code restarts


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_a_forced_dead_code_is_restarted_and_then_used(name):
    torch.manual_seed(0)
    q = vqvae.QUANTIZERS[name](8, 4, dead_code_threshold=0.5).train()
    if name == "ba_vq":
        q.beta.fill_(50.0)
    z = latents(B=2, D=4, H=4, W=4, scale=1.0)
    with torch.no_grad():
        q.codebook.data.copy_(torch.randn(8, 4) * 0.3)
        q.codebook.data[3] = 1e3                                      # code 3 is never the nearest
    usage = q.usage_per_step()
    q(z)
    usage.fill_(5.0)
    usage[3] = 0.0                                                    # and its usage says so
    assert int(q(z)[2]["code_counts"][3]) == 0
    dead = q.restart_dead_codes()
    assert dead.tolist() == [i == 3 for i in range(8)]
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (z_flat == q.codebook.detach()[3]).all(1).any()            # replaced by one of the batch latents
    assert float(q.usage_per_step()[3]) == 0.5                        # usage reset to the threshold
    if name == "vq_ema":
        torch.testing.assert_close(q.ema_w[3], 0.5 * q.codebook[3])   # EMA sum reset to match
    assert int(q(z)[2]["code_counts"][3]) > 0                         # and now it is used


@pytest.mark.slow
def test_dead_code_restarts_are_off_by_default_and_logged_when_on(tmp_path):
    off = tiny_config(out_dir=str(tmp_path), name="off", epochs=2)
    on = tiny_config(out_dir=str(tmp_path), name="on", epochs=2, dead_code_threshold=1.0, dead_code_every=2)
    vqvae.train(off)
    vqvae.train(on)
    h_off, h_on = history(off), history(on)
    assert all(h["train/dead_code_restarts"] == 0 for h in h_off)
    assert h_on[0]["train/dead_code_restarts"] > 0
    assert h_on[-1]["val/usage_rate"] > h_off[-1]["val/usage_rate"]


def test_restarted_codes_get_fresh_adam_moments(tmp_path):
    cfg = tiny_config(quantizer="vq", dead_code_threshold=1.0, dead_code_every=1, out_dir=str(tmp_path))
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = {}
    orig = model.quantizer.restart_dead_codes

    def spy(optimizer):
        dead = orig(optimizer)
        seen["dead"] = dead.clone()
        return dead
    model.quantizer.restart_dead_codes = spy
    vqvae.train_epoch(model, opt, train_u8[:64], cfg, torch.Generator().manual_seed(0), 0, 1)
    dead = seen["dead"]
    assert dead.any()
    st = opt.state[model.quantizer.codebook]
    assert (st["exp_avg"][dead] == 0).all() and (st["exp_avg_sq"][dead] == 0).all()
    assert (st["exp_avg_sq"][~dead] != 0).any()


def test_dead_code_every_sets_how_often_codes_are_checked():
    restarts = []
    for every in (1, 1000):
        cfg = tiny_config(dead_code_threshold=1.0, dead_code_every=every)
        train_u8, _ = vqvae.load_dataset(cfg)
        model = vqvae.build_model(cfg)
        opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
        m, _ = vqvae.train_epoch(model, opt, train_u8, cfg, torch.Generator().manual_seed(0), 0, 4)
        restarts.append(m["dead_code_restarts"])
    assert restarts[0] > 0 and restarts[1] == 0


@pytest.mark.parametrize("quantizer", ["vq_ema", "vq", "ba_vq"])
def test_dead_code_restarts_draw_from_the_current_batch(quantizer):
    """With a threshold no code can reach, every code is restarted at steps 2 and 4 (every 2 steps):
    each restarted code is a latent of the batch of that very step, not of an earlier one."""
    cfg = tiny_config(quantizer=quantizer, batch_size=32, dead_code_threshold=1e9, dead_code_every=2)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    q = model.quantizer
    latents, codebooks = [], []
    orig = q.forward

    def spy(z):
        latents.append(F.normalize(z.detach(), dim=1) if q.cosine else z.detach())
        return orig(z)
    q.forward = spy
    orig_restart = q.restart_dead_codes

    def restart(optimizer):
        dead = orig_restart(optimizer)
        codebooks.append((len(latents) - 1, q.codebook.detach().clone(), dead.clone()))
        return dead
    q.restart_dead_codes = restart
    vqvae.train_epoch(model, opt, train_u8[:4 * 32], cfg, torch.Generator().manual_seed(0), 0, 4)
    assert [s for s, _, _ in codebooks] == [1, 3]
    for s, E, dead in codebooks:
        assert dead.all()
        rows = latents[s].permute(0, 2, 3, 1).reshape(-1, latents[s].shape[1])      # (B*H*W, D)
        def found_in(r):
            return (E.float()[:, None, :] == r[None, :, :]).all(-1).any(1)                # (K,) exact row match
        assert found_in(rows).all()                                     # every code is a latent of this batch
        prev = latents[s - 1].permute(0, 2, 3, 1).reshape(-1, rows.shape[1])
        assert not found_in(prev).any()


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("name", CODEBOOK_QUANTIZERS)
def test_cosine_distance_changes_assignments_and_normalises(name):
    """Codes (1, 0) and (10, 10). In L2 both (3, 1) and (3, 2.5) are nearest to (1, 0) (squared
    distances 5 vs 130 and 10.25 vs 105.25); in angle (3, 2.5) is 5.2 deg from (10, 10) and 39.8 deg
    from (1, 0), so cosine distance assigns it to code 1."""
    results = {}
    for cosine in (False, True):
        q = vqvae.QUANTIZERS[name](2, 2, cosine=cosine).eval()
        if name == "ba_vq":
            q.beta.fill_(1e3)
        with torch.no_grad():
            q.codebook.data.copy_(torch.tensor([[1.0, 0.0], [10.0, 10.0]]))
        z = torch.tensor([[3.0, 1.0], [3.0, 2.5]]).t().reshape(1, 2, 1, 2)    # (B=1, D=2, H=1, W=2)
        z_q, _, info = q(z)
        results[cosine] = info["code_indices"].flatten().tolist()
        if cosine:
            torch.testing.assert_close(z_q.norm(dim=1), torch.ones(1, 1, 2))   # unit-norm codes out
    assert results == {False: [0, 0], True: [0, 1]}


def test_cosine_vq_ema_keeps_unit_codes_after_updates():
    torch.manual_seed(0)
    q = vqvae.VQEMAQuantizer(8, 4, cosine=True).train()
    for s in range(3):
        q(latents(D=4, seed=s, scale=2.0))
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(8))


# --------------------------------------------------------------------------- warm-up and clipping


def _one_step(cfg, opt_cls=torch.optim.AdamW, lr=1e-3):
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = opt_cls(model.parameters(), lr=lr)
    m, _ = vqvae.train_epoch(model, opt, train_u8[:64], cfg, torch.Generator().manual_seed(0), 0, 10)
    return model, m


def test_vq_loss_warmup_starts_from_zero_weight():
    """At step 0 the warm-up weight is 0: the first update equals one without quantizer loss."""
    warm, m = _one_step(tiny_config(quantizer="vq", vq_loss_warmup_epochs=2))
    none, _ = _one_step(tiny_config(quantizer="vq", commitment_cost=0.0, codebook_cost=0.0))
    plain, _ = _one_step(tiny_config(quantizer="vq"))
    enc = lambda mdl: mdl.encoder.net[0].weight
    assert torch.equal(enc(warm), enc(none))
    assert not torch.equal(enc(warm), enc(plain))
    assert m["vq_loss_weight"] == 0.0


@pytest.mark.slow
def test_vq_loss_warmup_ramps_linearly_in_history(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), epochs=3, vq_loss_warmup_epochs=2.0)   # 4 steps per epoch
    vqvae.train(cfg)
    w = [h["train/vq_loss_weight"] for h in history(cfg)]                            # weight at the last step
    assert w == pytest.approx([3 / 8, 7 / 8, 1.0])


def test_grad_clip_bounds_the_update():
    """With SGD the update is lr * (clipped) gradient, so its norm is at most lr * C."""
    lr, C = 0.1, 1e-3
    cfg = tiny_config(grad_clip=C, batch_size=64)
    train_u8, _ = vqvae.load_dataset(cfg)
    for clip, bound in ((C, True), (0.0, False)):
        model = vqvae.build_model(vqvae.make_config({**vqvae.asdict(cfg), "grad_clip": clip}))
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        c = vqvae.make_config({**vqvae.asdict(cfg), "grad_clip": clip})
        m, _ = vqvae.train_epoch(model, opt, train_u8[:64], c, torch.Generator().manual_seed(0), 0, 1)
        delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
        if bound:
            assert float(delta) == pytest.approx(lr * C, rel=1e-3)
            assert m["grad_norm"] > C                                  # the logged norm is before clipping
        else:
            assert float(delta) > 10 * lr * C


# --------------------------------------------------------------------------- CVQ-VAE


def _cvq_by_hand(anchor="closest", **kw):
    """K=3, D=2, codes (0,0), (2,0), (0,5); latents (0.1,0), (1.9,0.1), (2.2,0.3), (0.2,0.1); their l2 distance."""
    kw.setdefault("cvq_distance", "l2")
    q = vqvae.VQQuantizer(3, 2, cvq=True, cvq_anchor=anchor, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]]))
        q.cvq_usage.copy_(torch.tensor([0.5, 0.5, 0.0]))
    return q, torch.tensor([[0.1, 0.0], [1.9, 0.1], [2.2, 0.3], [0.2, 0.1]])


def test_cvq_moves_each_code_to_its_closest_anchor_at_its_usage_rate():
    q, x = _cvq_by_hand(cvq_decay=0.99, cvq_gain=10.0, cvq_offset=1e-3)
    q.cvq_usage[2] = 3e-4                                                # a rarely used code
    E0 = q.codebook.detach().clone()
    z = _grid(x)
    _, losses, info = q.train()(z)
    assert info["code_indices"].flatten().tolist() == [0, 1, 1, 0]
    p = 0.99 * torch.tensor([0.5, 0.5, 3e-4]) + 0.01 * torch.tensor([0.5, 0.5, 0.0])  # usage EMA
    torch.testing.assert_close(q.cvq_usage, p)
    alpha = torch.exp(-p * 3 * 10 / (1 - 0.99) - 1e-3)                    # a_k, ~0 for used codes, ~1 for the unused
    # closest anchors: the latent nearest to each code: (0.1,0) for e0, (1.9,0.1) for e1, (0.2,0.1) for e2
    anchors = torch.tensor([[0.1, 0.0], [1.9, 0.1], [0.2, 0.1]])
    torch.testing.assert_close(q.codebook.detach(), E0 * (1 - alpha[:, None]) + anchors * alpha[:, None])
    assert float(alpha[2]) == pytest.approx(math.exp(-0.99 * 3e-4 * 3 * 10 / 0.01 - 1e-3))    # ~0.41
    # the step's gradient is the one of the codes the forward used (as without CVQ)
    losses["codebook_loss"].backward()
    ref = (2 / 8) * torch.stack([(E0[0] - x[[0, 3]]).sum(0), (E0[1] - x[[1, 2]]).sum(0), torch.zeros(2)])
    torch.testing.assert_close(q.codebook.grad, ref)


def test_cvq_cos_is_their_lookup_only_cosine():
    """CVQ-VAE's default distance: codes (1, 0) and (0, 10), the latent (1, 1.2). Its nearest code by squared
    distance is code 0 (1.44 against 77.4), its largest cosine code 1 (0.77 against 0.64): the lookup takes code 1,
    the decoder and the losses get the raw code (0, 10); l2 takes code 0."""
    for distance, code in (("cos", 1), ("l2", 0)):
        q = vqvae.VQQuantizer(2, 2, cvq=True, cvq_distance=distance).eval()
        with torch.no_grad():
            q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 10.0]]))
        z = torch.tensor([1.0, 1.2]).reshape(1, 2, 1, 1)
        z_q, losses, info = q(z)
        assert int(info["code_indices"]) == code
        e = q.codebook.detach()[code]
        torch.testing.assert_close(z_q.reshape(2), e)
        torch.testing.assert_close(losses["commitment_loss"], 0.25 * F.mse_loss(z.reshape(2), e))
    assert vqvae.Config().cvq_distance == "cos"
    with_cosine = vqvae.VQQuantizer(2, 2, cvq=True, cosine=True)
    assert not with_cosine.cvq_cos                      # --cosine normalises everything already


def test_cvq_random_and_probrandom_anchors_are_batch_latents_as_specified():
    for anchor in ("random", "probrandom"):
        q, x = _cvq_by_hand(anchor)
        torch.manual_seed(5)
        q.train()(_grid(x))
        e2 = q.codebook.detach()[2]                                      # unused code: ~ its anchor
        assert vqvae.squared_distances(e2[None], x).min() < 1e-4 * 25
    # probrandom: code k's anchor drawn with probability softmax over the batch of -d(x, k)
    q, x = _cvq_by_hand("probrandom")
    d = vqvae.squared_distances(x, q.codebook.detach())
    torch.manual_seed(7)
    logits = (-d).t().log_softmax(1)                                     # (K, N): per code, over the batch
    pick = (logits + vqvae.gumbel_noise(logits)).argmax(1)               # a draw from softmax (Gumbel-max)
    torch.manual_seed(7)
    q.train()(_grid(x))
    alpha = torch.exp(-q.cvq_usage * 3 * 10 / 0.01 - 1e-3)[:, None]
    E0 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    torch.testing.assert_close(q.codebook.detach(), E0 * (1 - alpha) + x[pick] * alpha)


def test_probrandom_anchors_follow_the_softmax_over_the_batch():
    """The Gumbel-max draw has the probabilities softmax(-d(x, k)) over the batch (2,000 draws)."""
    q, x = _cvq_by_hand("probrandom")
    d = vqvae.squared_distances(x, q.codebook.detach())
    logits = (-d).t().log_softmax(1)
    torch.manual_seed(0)
    picks = torch.stack([(logits + vqvae.gumbel_noise(logits)).argmax(1) for _ in range(2000)])   # (2000, K)
    freq = torch.stack([(picks[:, k, None] == torch.arange(4)).float().mean(0) for k in range(3)])
    torch.testing.assert_close(freq, logits.exp(), atol=0.035, rtol=0)


@pytest.mark.parametrize("param,value", [("cvq_decay", 0.5), ("cvq_gain", 0.001), ("cvq_offset", 2.0)])
def test_cvq_coefficients_change_the_update(param, value):
    def run(**kw):
        q, x = _cvq_by_hand(**kw)
        q.cvq_usage[2] = 3e-4                        # a rarely used code: a_2 = exp(-0.89 - 1e-3) with the defaults
        q.train()(_grid(x))
        return q.codebook.detach()
    assert not torch.allclose(run(), run(**{param: value}))


def test_cvq_with_ba_vq_trains_and_keeps_the_gradient_of_the_forward_codes():
    torch.manual_seed(0)
    q = vqvae.BAQuantizer(8, 4, cvq=True, init="normal").train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    E0 = q.codebook.detach().clone()
    _, losses, _ = q(z)
    sum(losses.values()).backward()                                     # no in-place error
    g_cvq = q.codebook.grad.clone()
    torch.manual_seed(0)
    ref = vqvae.BAQuantizer(8, 4, init="normal").train()
    _, losses, _ = ref(z)
    ref.codebook.grad = None
    sum(losses.values()).backward()
    torch.testing.assert_close(g_cvq, ref.codebook.grad)
    assert not torch.equal(q.codebook.detach(), E0)


# --------------------------------------------------------------------------- affine reparameterisation, synchronized update, alternating optimisation


def test_affine_ema_statistics_and_codes_by_hand():
    q = _vq(2, 2, affine_reparam="ema", affine_momentum=0.25)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))        # mean (1, 2), var (1, 1)
    x = torch.tensor([[1.0, 10.0], [3.0, 14.0], [5.0, 12.0]])          # mean (3, 12), var (8/3, 8/3)
    q.train()(_grid(x))                                                  # first call: the statistics copied
    torch.testing.assert_close(q.affine_z_mean, torch.tensor([3.0, 12.0]))
    torch.testing.assert_close(q.affine_z_var, torch.full((2,), 8 / 3))
    torch.testing.assert_close(q.affine_e_mean, torch.tensor([1.0, 2.0]))
    scale = math.sqrt((8 / 3) / (1 + 1e-8))
    codes = torch.tensor([[0.0, 1.0], [2.0, 3.0]]) * scale + (torch.tensor([3.0, 12.0]) - scale * torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(q._codes().detach(), codes)
    z_q, _, info = q.eval()(_grid(x))
    assert info["code_indices"].flatten().tolist() == vqvae.squared_distances(x, codes).argmin(1).tolist()
    torch.testing.assert_close(z_q.reshape(2, 3).t(), codes[info["code_indices"].flatten()])
    q.train()(_grid(x + 4.0))                                            # then: m new + (1 - m) running
    torch.testing.assert_close(q.affine_z_mean, 0.25 * torch.tensor([7.0, 16.0]) + 0.75 * torch.tensor([3.0, 12.0]))


def test_affine_learned_codes_and_their_gradient():
    q = _vq(2, 2, affine_reparam="learned", affine_lr=2.0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        q.affine_s.copy_(torch.tensor([0.5, 0.0]))
        q.affine_b.copy_(torch.tensor([0.0, -0.25]))
    torch.testing.assert_close(q._codes().detach(), torch.tensor([[2.0, -0.5], [0.0, 0.5]]))   # (1 + 2s) e + 2b
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    _, losses, _ = q.train()(_grid(x))
    losses["codebook_loss"].backward()
    r = torch.tensor([[0.0, -0.5], [0.0, -0.5]])                          # code - latent
    torch.testing.assert_close(q.affine_b.grad, 2.0 * (2 / 4) * r.sum(0))
    torch.testing.assert_close(q.affine_s.grad, 2.0 * (2 / 4) * (r * torch.tensor([[1.0, 0.0], [0.0, 1.0]])).sum(0))


def test_restarts_and_data_inits_write_raw_codes_through_the_inverse_affine_map():
    q = _vq(4, 2, affine_reparam="learned", dead_code_threshold=0.5)
    with torch.no_grad():
        q.affine_s.fill_(1.0)
        q.affine_b.fill_(0.5)
    target = torch.randn(4, 2)
    q.load_codes(target, torch.ones(4))
    torch.testing.assert_close(q._codes().detach(), target)


def test_the_inverse_affine_map_holds_for_negative_scales():
    q = _vq(4, 2, affine_reparam="learned")
    with torch.no_grad():
        q.affine_s.fill_(-1.5)                                           # scale = 1 + 1.0 * (-1.5) = -0.5
        q.affine_b.fill_(0.25)
    target = torch.randn(4, 2)
    q.load_codes(target, torch.ones(4))
    torch.testing.assert_close(q._codes().detach(), target)


def test_sync_nu_sends_nu_times_the_decoder_gradient_to_the_code():
    q = _vq(2, 2, sync_nu=2.0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[0.9, 0.1], [0.8, 0.0], [0.1, 1.2]])
    z = _grid(x).requires_grad_(True)
    z_q, _, _ = q.train()(z)
    torch.testing.assert_close(z_q.reshape(2, 3).t(), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))  # unchanged
    w = torch.randn_like(z_q)
    (w * z_q).sum().backward()
    torch.testing.assert_close(z.grad, w)                                # the straight-through copy as before
    wf = w.reshape(2, 3).t()
    torch.testing.assert_close(q.codebook.grad, 2.0 * torch.stack([wf[0] + wf[1], wf[2]]))


def test_alternating_step_is_sgd_with_momentum_on_the_codebook_loss_before_the_step():
    q = _vq(2, 2, alternate_lr=0.5, alternate_momentum=0.9)
    E0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        q.codebook.copy_(E0)
    x = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    z_q, losses, _ = q.train()(_grid(x))
    g1 = (2 / 4) * (E0 - x)                                               # d mse(sg[z], e) / d e
    E1 = E0 - 0.5 * g1
    torch.testing.assert_close(q.codebook.detach(), E1)
    torch.testing.assert_close(losses["codebook_loss"], ((E1 - x) ** 2).mean())   # the losses use the new codes
    assert not losses["codebook_loss"].requires_grad                      # ... and only its own step trains them
    q(_grid(x))
    g2 = (2 / 4) * (E1 - x)
    torch.testing.assert_close(q.codebook.detach(), E1 - 0.5 * (0.9 * g1 + g2))


@pytest.mark.parametrize("keep", [False, True])
def test_alternating_has_no_commitment_term_as_vqtorch_unless_kept(keep):
    """vqtorch's in-place alternation requires beta = 1, whose commitment weight (1 - beta) is 0: the
    encoder gets only the decoder's gradient. alternate_commitment keeps commitment_cost * mse(z, sg[e])."""
    q = _vq(2, 2, alternate_lr=0.5, commitment_cost=0.25, alternate_commitment=keep)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    z = _grid(x).requires_grad_(True)
    _, losses, _ = q.train()(z)
    E1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) - 0.5 * (2 / 4) * (torch.tensor([[1.0, 0.0], [0.0, 1.0]]) - x)
    expected = 0.25 * ((x - E1) ** 2).mean() if keep else torch.tensor(0.0)
    torch.testing.assert_close(losses["commitment_loss"], expected)
    if keep:
        (g,) = torch.autograd.grad(losses["commitment_loss"], z)
        torch.testing.assert_close(g.reshape(2, 2).t(), 0.25 * 2 / 4 * (x - E1))
    else:
        assert not losses["commitment_loss"].requires_grad


def test_affine_and_alternating_state_is_in_the_state_dict_and_eval_changes_nothing():
    torch.manual_seed(0)
    m1 = vqvae.VQVAE("vq", codebook_size=16, latent_dim=8, hidden_dim=8, affine_reparam="ema", cvq=True,
                     alternate_lr=0.1)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m1.train()(x)
    keys = set(m1.state_dict())
    assert {"quantizer.affine_z_mean", "quantizer.affine_started", "quantizer.cvq_usage",
            "quantizer.alternate_buf_codebook"} <= keys
    state = {k: v.clone() for k, v in m1.state_dict().items()}
    m1.eval()(x)
    assert all(torch.equal(v, m1.state_dict()[k]) for k, v in state.items())
    torch.manual_seed(1)
    m2 = vqvae.VQVAE("vq", codebook_size=16, latent_dim=8, hidden_dim=8, affine_reparam="ema", cvq=True,
                     alternate_lr=0.1)
    m2.load_state_dict(m1.state_dict())
    with torch.no_grad():
        assert torch.equal(m1.eval()(x)[0], m2.eval()(x)[0])


@pytest.mark.parametrize("overrides,match", [
    (dict(quantizer="vq_ema", cvq=True), "not on vq_ema"),
    (dict(quantizer="vq_ema", affine_reparam="ema"), "not on vq_ema"),
    (dict(quantizer="ba_vq", sync_nu=1.0), "not to ba_vq"),
    (dict(quantizer="fsq", cvq=True), "not to fsq"),
    (dict(quantizer="vq", affine_reparam="ema", cosine=True), "do not combine"),
    (dict(quantizer="vq", pretrain_epochs=1, epochs=2), "needs --init kmeans or --init data"),
    (dict(quantizer="vq", init="data", pretrain_epochs=2, epochs=2), "must be fewer than epochs"),
])
def test_remedies_refused_where_they_do_not_apply(overrides, match):
    with pytest.raises(vqvae.BavqError, match=match):
        tiny_config(**overrides)


# --------------------------------------------------------------------------- two-stage training


@pytest.mark.slow
def test_pretraining_bypasses_the_quantizer_then_initialises_it_from_the_trained_encoder(tiny_cfg, monkeypatch):
    calls = []
    real = vqvae.init_from_data

    def spy(model, images, cfg):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        real(model, images, cfg)
        calls[-1]["codes_after"] = model.quantizer.codebook.clone()
    monkeypatch.setattr(vqvae, "init_from_data", spy)
    cfg = tiny_cfg(name="two", quantizer="vq_ema", init="data", pretrain_epochs=1, epochs=2, lr=2e-3)
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "two"
    history = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["pretrain", "quantized"]
    ck1 = vqvae.load_checkpoint(run / "checkpoint_epoch1.pt")["model_state_dict"]
    fresh = vqvae.build_model(cfg).state_dict()
    for k in ("quantizer.codebook", "quantizer.ema_w", "quantizer.ema_cluster_size"):
        assert torch.equal(ck1[k], fresh[k]), k                          # stage 1 left the quantizer alone
    # stage 1 validation: the decoder of the encoder's output itself
    model = vqvae.build_model(cfg)
    model.load_state_dict(ck1)
    _, val_u8 = vqvae.load_dataset(cfg)
    model.eval()
    with torch.no_grad():
        x = vqvae.to_float(val_u8)
        psnr = vqvae.psnr_per_image(x, model.decoder(model.encoder(x))).mean()
    assert history[0]["val/psnr"] == pytest.approx(float(psnr), rel=1e-5)
    # the switch: once, from the model as stage 1 left it
    assert len(calls) == 1 and all(torch.equal(calls[0][k], ck1[k]) for k in ck1)
    real(model, vqvae.load_dataset(cfg)[0], cfg)
    torch.testing.assert_close(calls[0]["codes_after"], model.quantizer.codebook)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(quantizer="vq", init="data", pretrain_epochs=1),
                                       dict(quantizer="vq", cvq=True, affine_reparam="ema", alternate_lr=0.1,
                                            sync_nu=1.0, cvq_anchor="probrandom"),
                                       dict(quantizer="ba_vq", cvq=True, affine_reparam="learned")])
def test_resume_is_bit_identical_across_the_phase_switch_and_with_the_remedies(tiny_cfg, overrides):
    cfg = tiny_cfg(name="cut", epochs=3, **overrides)
    ref = vqvae.train(cfg)                                   # the uninterrupted result, then cut back to epoch 1
    run = Path(cfg.out_dir) / "cut"
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (run / p).unlink()
    assert vqvae.train(cli.config_from_args(["--resume", str(run)])) == ref


# --------------------------------------------------------------------------- collapse-prone setting


_USAGE = {}


def _usage(tmp_path, **kw) -> int:
    """Codes in use after a short run in a collapse-prone toy setting (fake images, K=64, vq). Runs are
    deterministic, so the baseline that several remedies are set against runs once per session (cached)."""
    key = tuple(sorted(kw.items()))
    if key not in _USAGE:
        _USAGE[key] = _usage_run(tmp_path, **kw)
    return _USAGE[key]


def _usage_run(tmp_path, **kw) -> int:
    base = dict(quantizer="vq", codebook_size=64, batch_size=32, lr=2e-3, epochs=3, checkpoint_every=0,
                out_dir=str(tmp_path), name="r" + str(abs(hash(tuple(sorted(kw.items()))))))
    base.update(kw)
    with contextlib.redirect_stdout(io.StringIO()):
        final = vqvae.train(tiny_config(**base))
    return round(final["usage_rate"] * 64)


@pytest.mark.slow
@pytest.mark.parametrize("remedy,without", [
    (dict(init="data"), dict()),
    (dict(init="data", pretrain_epochs=2, epochs=5), dict(init="data", epochs=5)),
    (dict(init="normal", cvq=True), dict(init="normal")),
    (dict(affine_reparam="ema"), dict()),
    (dict(affine_reparam="learned"), dict()),
    (dict(sync_nu=2.0), dict()),
    (dict(alternate_lr=1.0, alternate_commitment=True), dict()),
])
def test_each_remedy_raises_usage_over_the_same_run_without_it(tmp_path, remedy, without):
    """Measured (CPU, torch 2.14): data 26 vs 17 codes, pretraining 59 vs 9, CVQ 41 vs 1 (normal init),
    affine ema 46 and learned 39 vs 17, sync nu=2 28 vs 17, alternating lr 1 with the commitment term kept
    25 vs 17 (as vqtorch, without it: 4, so vqtorch's form is not claimed to raise usage here)."""
    with_it, without_it = _usage(tmp_path, **remedy), _usage(tmp_path, **without)
    assert with_it > without_it, (with_it, without_it)


# --------------------------------------------------------------------------- diagnostics


def test_diagnostics_are_logged_every_epoch(tmp_path, capsys):
    cfg = tiny_config(out_dir=str(tmp_path), epochs=2)
    vqvae.train(cfg)
    for h in history(cfg):
        for k in ("train/perplexity", "val/perplexity", "train/usage_rate", "val/usage_rate",
                  "val/dead_codes", "train/grad_norm", "train/grad_norm_max"):
            assert k in h and math.isfinite(h[k])
        assert h["val/dead_codes"] == round(cfg.codebook_size * (1 - h["val/usage_rate"]))
        assert h["train/grad_norm"] > 0
    out = capsys.readouterr().out
    assert "Dead:" in out and "(train" in out and "Grad:" in out
