"""Specification of the collapse toolkit: the vq and fsq quantizers, the remedies (each must do
something) and the diagnostics."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vqvae
import vqvae_experiment
from conftest import tiny_config
from vqvae import FSQQuantizer, VQQuantizer, kmeans_codebook, rotation_trick, squared_distances

CODEBOOK_QUANTIZERS = ["vq_ema", "vq", "ba_vq"]


def latents(B=2, D=8, H=4, W=4, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, H, W, generator=g) * scale


def history(cfg):
    return [json.loads(l) for l in (Path(cfg.out_dir) / cfg.resolved_name() / "history.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- vq


def test_vq_codebook_gradient_comes_only_from_the_codebook_term():
    torch.manual_seed(0)
    q = VQQuantizer(16, 8, commitment_cost=0.25, codebook_cost=1.0).train()
    z = latents().requires_grad_(True)
    z_q, losses, info = q(z)
    w = torch.randn_like(z)
    # reconstruction (through the estimator) + commitment: no codebook gradient at all
    g = torch.autograd.grad((w * z_q).sum() + losses["commitment_loss"], q.codebook, allow_unused=True)[0]
    assert g is None or torch.equal(g, torch.zeros_like(g))
    # codebook term: d/de_k of cost * mean((e - sg z)^2) = 2 cost / (N D) * sum_{x->k} (e_k - z_x)
    z_q, losses, info = q(z)
    g = torch.autograd.grad(losses["codebook_loss"], q.codebook)[0]
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    idx = info["code_indices"].flatten()
    expected = torch.zeros(16, 8).index_add_(0, idx, q.codebook.detach()[idx] - z_flat) * 2 / z_flat.numel()
    torch.testing.assert_close(g, expected)
    # and the codebook term sends nothing to the encoder
    gz = torch.autograd.grad(q(z)[1]["codebook_loss"], z, allow_unused=True)[0]
    assert gz is None or torch.equal(gz, torch.zeros_like(gz))


def test_vq_losses_use_the_hard_code_and_the_ste_ignores_requires_grad():
    torch.manual_seed(0)
    q = VQQuantizer(16, 8, commitment_cost=0.5, codebook_cost=2.0).train()
    z = latents()
    z_q_nograd, losses, info = q(z)                                   # z.requires_grad is False
    z_q_grad, _, _ = q(z.clone().requires_grad_(True))
    torch.testing.assert_close(z_q_nograd, z_q_grad)                  # same path either way
    e = q.codebook.detach()[info["code_indices"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q_nograd, e, rtol=0, atol=1e-6)
    mse = F.mse_loss(z, e)
    torch.testing.assert_close(losses["codebook_loss"], 2.0 * mse)
    torch.testing.assert_close(losses["commitment_loss"], 0.5 * mse)


# --------------------------------------------------------------------------- fsq


@pytest.mark.parametrize("levels", [[8, 8, 8], [8, 5, 5, 5], [3, 4], [2]])
def test_fsq_indices_and_codes_round_trip_exactly(levels):
    K = math.prod(levels)
    q = FSQQuantizer(K, 8, fsq_levels=levels)
    idx = torch.arange(K)
    codes = q.indices_to_codes(idx)                                   # (K, d)
    assert codes.shape == (K, len(levels))
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert torch.equal(q.indices_to_codes(q.codes_to_indices(codes)), codes)
    assert len({tuple(c) for c in codes.tolist()}) == K               # K distinct grid points
    for i, L in enumerate(levels):                                    # each channel takes exactly L values
        assert codes[:, i].unique().numel() == L


def test_fsq_forward_is_on_the_grid_and_reports_its_indices():
    torch.manual_seed(0)
    q = FSQQuantizer(40, 8, fsq_levels=[2, 4, 5])
    z = latents(scale=3.0).requires_grad_(True)
    z_q, losses, info = q(z)
    assert losses == {}
    assert info["code_indices"].max() < 40 and info["code_counts"].sum() == 2 * 4 * 4
    # the decoder input is proj_out of exactly the grid codes of the reported indices
    codes = q.indices_to_codes(info["code_indices"].flatten())
    expected = q.proj_out(codes).reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected)
    # the bound keeps every channel strictly inside its L levels
    h = q.bound(q.proj_in(z.detach().permute(0, 2, 3, 1).reshape(-1, 8)) * 100)
    assert (h.round() >= -(q.levels // 2)).all() and (h.round() <= (q.levels - 1) // 2).all()
    z_q.sum().backward()
    assert z.grad.abs().sum() > 0                                     # STE through the rounding


def test_fsq_config_must_match_codebook_size():
    with pytest.raises(vqvae.BavqError, match="give 512 codes but codebook_size is 256"):
        vqvae.make_config({"quantizer": "fsq", "codebook_size": 256, "fsq_levels": [8, 8, 8]}).validate()
    with pytest.raises(vqvae.BavqError, match="not to fsq"):
        vqvae.make_config({"quantizer": "fsq", "init": "kmeans"}).validate()
    vqvae.make_config({"quantizer": "fsq", "codebook_size": 1000, "fsq_levels": [8, 5, 5, 5]}).validate()


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


def test_normal_init_is_standard_normal():
    torch.manual_seed(0)
    q = VQQuantizer(512, 64, init="normal")
    c = q.codebook.detach()
    assert abs(float(c.std()) - 1.0) < 0.02 and abs(float(c.mean())) < 0.02
    u = VQQuantizer(512, 64)
    assert float(u.codebook.detach().abs().max()) <= 1 / 512


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

    def spy():
        dead = orig()
        seen["dead"] = dead.clone()
        return dead
    model.quantizer.restart_dead_codes = spy
    vqvae.train_epoch(model, opt, train_u8[:64], cfg, torch.Generator().manual_seed(0), 0, 1)
    dead = seen["dead"]
    assert dead.any()
    st = opt.state[model.quantizer.codebook]
    assert (st["exp_avg"][dead] == 0).all() and (st["exp_avg_sq"][dead] == 0).all()
    assert (st["exp_avg_sq"][~dead] != 0).any()


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


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(out_dir=str(tmp_path), epochs=3, checkpoint_every=1, progress_every=2)
    calls = {"n": 0}
    orig = vqvae.VQEMAQuantizer.forward

    def poisoned(self, z):
        z_q, losses, info = orig(self, z)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:                                        # global step 5 = epoch 2, batch 2
                losses["commitment_loss"] = losses["commitment_loss"] * float("inf")
        return z_q, losses, info
    monkeypatch.setattr(vqvae.VQEMAQuantizer, "forward", poisoned)
    with pytest.raises(vqvae.NonFiniteError) as e:
        vqvae.train(cfg)
    msg = str(e.value)
    assert "commitment_loss" in msg and "epoch 2, step 5" in msg and "checkpoint_epoch1.pt" in msg
    run = Path(cfg.out_dir) / cfg.resolved_name()
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_epoch1.pt"]
    assert not (run / "final_metrics.json").exists() and not (run / "final_model.pt").exists()
    ck = vqvae.load_checkpoint(run / "checkpoint_epoch1.pt")
    assert all(torch.isfinite(v).all() for v in ck["model_state_dict"].values() if v.is_floating_point())
    assert len(history(cfg)) == 1


def test_rotation_trick_falls_back_to_straight_through_for_a_zero_latent():
    z = torch.zeros(3, 4, requires_grad=True)
    q = torch.randn(3, 4)
    out = rotation_trick(z, q)
    torch.testing.assert_close(out, q)
    (g,) = torch.autograd.grad(out.sum(), z)
    torch.testing.assert_close(g, torch.ones(3, 4))                  # the straight-through copy, finite


@pytest.mark.parametrize("key", ["beta_end", "lr", "vq_loss_warmup_epochs", "grad_clip"])
def test_non_finite_config_values_are_errors(key):
    with pytest.raises(vqvae.BavqError, match=f"{key} must be a finite number"):
        vqvae.make_config({key: float("inf")}).validate()


def test_skipped_fp16_steps_do_not_poison_the_gradient_norm():
    """A GradScaler skips steps whose gradients overflow; they are counted, not averaged in."""
    cfg = tiny_config()
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    rt = vqvae.Runtime(torch.device("cpu"), None, torch.amp.GradScaler("cpu"))
    calls = {"n": 0}

    def overflow_first(g):
        calls["n"] += 1
        return g * float("inf") if calls["n"] == 1 else g
    model.decoder.net[-1].weight.register_hook(overflow_first)
    m, _ = vqvae.train_epoch(model, opt, train_u8[:192], cfg, torch.Generator().manual_seed(0), 0, 3, rt=rt)
    assert m["skipped_steps"] == 1
    assert math.isfinite(m["grad_norm"]) and 0 < m["grad_norm"] < 1e3 and m["grad_norm_max"] < 1e3


def test_a_stop_request_after_a_non_finite_step_saves_no_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(out_dir=str(tmp_path), epochs=2, checkpoint_every=1, progress_every=100)
    orig = vqvae.VQEMAQuantizer.forward
    calls = {"n": 0}

    def poisoned(self, z):
        z_q, losses, info = orig(self, z)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:
                losses["commitment_loss"] = losses["commitment_loss"] * float("nan")
        return z_q, losses, info
    monkeypatch.setattr(vqvae.VQEMAQuantizer, "forward", poisoned)
    monkeypatch.setattr(vqvae_experiment._StopFlag, "__call__", lambda self: calls["n"] >= 6)   # Ctrl-C right after it
    with pytest.raises(vqvae.NonFiniteError, match="step 5"):
        vqvae.train(cfg)
    run = Path(cfg.out_dir) / cfg.resolved_name()
    assert not (run / "checkpoint_interrupted.pt").exists()


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
