"""The training loop (train_epoch inside train): training lowers the loss and is reproducible, every step is
weighted by its samples and gets the schedule value meant for it, every code index of the epoch is counted,
a non-finite loss stops the run cleanly, and a short run on real CIFAR-10 beats the untrained model."""
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import vqvae
import vqvae_experiment
from conftest import SHARED_DATA, history, record_code_indices, tiny_config


@pytest.mark.slow
def test_train_is_reproducible_and_seed_matters(tiny_cfg):
    a = vqvae.train(tiny_cfg(name="a", quantizer="ba_vq", epochs=2))
    b = vqvae.train(tiny_cfg(name="b", quantizer="ba_vq", epochs=2))
    c = vqvae.train(tiny_cfg(name="c", quantizer="ba_vq", epochs=2, seed=1))
    assert a == b
    assert a["loss"] != c["loss"]


def test_training_lowers_the_loss(tiny_cfg):
    cfg = tiny_cfg(name="long", epochs=4, train_subset=512, lr=2e-3)
    vqvae.train(cfg)
    hist = [json.loads(l) for l in (vqvae.Path(cfg.out_dir) / "long" / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["train/recon_loss"] < hist[0]["train/recon_loss"]
    assert hist[-1]["val/psnr"] > hist[0]["val/psnr"]


def test_train_epoch_accumulates_code_statistics(tiny_cfg):
    """Train perplexity/usage come from every code index of the epoch (bincount on the device)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = vqvae.build_model(cfg)
    images = vqvae._fake_images(100, seed=0)
    seen = record_code_indices(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m, step = vqvae.train_epoch(model, opt, images, cfg, torch.Generator().manual_seed(0), 0, 4)
    assert step == 2 and len(seen) == 2          # 100 images, batch 64 -> 2 steps, last one partial
    allidx = torch.cat([idx.flatten() for idx in seen])
    assert allidx.numel() == 100 * 64
    assert m["perplexity"] == pytest.approx(vqvae.compute_perplexity(allidx, cfg.codebook_size), rel=1e-5)
    assert m["usage_rate"] == pytest.approx(vqvae.compute_usage_rate(allidx, cfg.codebook_size))


def _spy_forward(model):
    """Record (batch size, recon_loss, loss terms, beta) of every training forward."""
    seen = []
    orig = model.forward

    def spy(x):
        out = orig(x)
        seen.append((x.shape[0], float(out[1].detach()), {k: float(v.detach()) for k, v in out[2].items()},
                     float(out[3]["beta"]) if "beta" in out[3] else None))
        return out
    model.forward = spy
    return seen


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_epoch_losses_are_sample_weighted_when_the_last_batch_is_short(quantizer):
    cfg = tiny_config(quantizer=quantizer, batch_size=64)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    seen = _spy_forward(model)
    m, _ = vqvae.train_epoch(model, opt, train_u8[:100], cfg, torch.Generator().manual_seed(0), 0, 2)
    assert [b for b, *_ in seen] == [64, 36]
    expect = sum(b * r for b, r, *_ in seen) / 100
    assert m["recon_loss"] == pytest.approx(expect, rel=1e-6)
    assert m["recon_loss"] != pytest.approx(sum(r for _, r, *_ in seen) / 2, rel=1e-4)
    for k in model.quantizer.loss_names:
        assert m[k] == pytest.approx(sum(b * t[k] for b, _, t, _ in seen) / 100, rel=1e-6)


def test_every_training_step_uses_the_beta_scheduled_for_it():
    """beta_t = cosine(beta_start -> beta_end) at t = step / (total_steps - 1), set before the step."""
    cfg = tiny_config(quantizer="ba_vq", batch_size=64, beta_start=0.5, beta_end=4.0)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    seen = _spy_forward(model)
    g, step = torch.Generator().manual_seed(0), 0
    for _ in range(2):                                                    # 2 epochs x 4 steps
        _, step = vqvae.train_epoch(model, opt, train_u8, cfg, g, step, 8)
    expect = [vqvae.cosine_schedule(0.5, 4.0, s / 7) for s in range(8)]
    assert [b for *_, b in seen] == pytest.approx(expect, rel=1e-6)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass
    assert vqvae._ProgressBar(3, "x", True).bar is None                # pytest's stderr is not a terminal
    monkeypatch.setattr(vqvae.sys, "stderr", Tty())
    bar = vqvae._ProgressBar(3, "x", True)
    assert bar.bar is not None
    bar.close()
    assert vqvae._ProgressBar(3, "x", False).bar is None


# --------------------------------------------------------------------------- non-finite losses


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


# --------------------------------------------------------------------------- loss explosions (not NaN)


def first_explosion(losses, factor, window, resets=()):
    """The rule LossGuard implements, in plain Python: the first step t whose loss exceeds factor x
    the minimum of the previous `window` losses since the last reset (-1: none)."""
    seen = []
    for t, L in enumerate(losses):
        if t in resets:
            seen = []
        if seen and L > factor * min(seen[-window:]):
            return t
        seen.append(L)
    return -1


def guard_on(losses, factor, window, resets=()):
    g = vqvae.LossGuard(factor, window, torch.device("cpu"))
    for t, L in enumerate(losses):
        if t in resets:
            g.reset()
        g.add(t, torch.tensor(L))
    return int(g.tripped)


@pytest.mark.parametrize("losses,factor,window,resets,expected", [
    ([1.0] * 5 + [50.0] + [1.0] * 3 + [150.0], 100, 4, (), 9),       # 150 > 100 x 1; the 50 spike is allowed
    ([0.01, 1, 1, 1, 1, 50.0], 100, 4, (), -1),                        # 0.01 has left the 4-step window
    ([0.01, 1, 1, 1, 1, 50.0], 100, 5, (), 5),                         # ... but not a 5-step one
    ([0.01, 50.0], 100, 4, (1,), -1),                                  # a reset (new phase) empties the window
    ([3.0, 900.0, 1e9], 1000, 10, (), 2),                              # exactly 300x trips at 1000 only later
    ([64.0, 30.0, 8.0, 2.0, 1.0, 0.5], 100, 10, (), -1),               # a falling loss never trips
])
def test_loss_guard_on_hand_made_sequences(losses, factor, window, resets, expected):
    assert first_explosion(losses, factor, window, resets) == expected
    assert guard_on(losses, factor, window, resets) == expected


def test_loss_guard_equals_the_rule_on_random_sequences():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 60
        logs = torch.randn(n, generator=g, dtype=torch.float64).cumsum(0) * 0.7   # a random walk in log-loss
        losses = [float(v) for v in logs.exp()]
        factor, window = [(10, 5), (30, 20), (100, 3)][trial % 3]
        resets = (int(torch.randint(1, n, (1,), generator=g)),)
        assert guard_on(losses, factor, window, resets) == first_explosion(losses, factor, window, resets), trial


def test_loss_guard_watches_the_reconstruction_not_the_quantizer_terms(monkeypatch):
    """BA-VQ's own terms range over four orders of magnitude in a normal reduced run (docs/running.md):
    a quantizer term 1e4 times larger from one step on does not trip the guard; the same jump of the
    reconstruction loss does."""
    cfg = tiny_config(explode_window=3, progress_every=1)
    train_u8, _ = vqvae.load_dataset(cfg)
    orig = vqvae.VQEMAQuantizer.forward
    calls = {"n": 0}

    def louder(self, z):
        z_q, losses, info = orig(self, z)
        calls["n"] += self.training
        if calls["n"] >= 3:
            losses = {k: v * 1e4 for k, v in losses.items()}
        return z_q, losses, info
    monkeypatch.setattr(vqvae.VQEMAQuantizer, "forward", louder)
    torch.manual_seed(0)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    m, _ = vqvae.train_epoch(model, opt, train_u8, cfg, torch.Generator().manual_seed(0), 0, 4)
    assert m["recon_jump_max"] < 2
    g = vqvae.LossGuard(100, 3, torch.device("cpu"))
    for t, L in enumerate([0.1, 0.1, 0.1e4]):
        g.add(t, torch.tensor(L))
    assert int(g.tripped) == 2


def _blow_up_at_epoch(monkeypatch, epoch: int, lr: float):
    """From the first step of ``epoch`` the optimizer's learning rate is ``lr``: the run explodes by its
    own dynamics (finite losses ~1e4 x the recent minimum at 0.1, measured on tiny_config)."""
    orig = vqvae_experiment.train_epoch

    def train_epoch(model, optimizer, *a, desc="", **k):
        if desc.startswith(f"epoch {epoch}/"):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return orig(model, optimizer, *a, desc=desc, **k)
    monkeypatch.setattr(vqvae_experiment, "train_epoch", train_epoch)


def test_a_run_made_to_explode_stops_within_its_window_and_resumes_from_its_last_checkpoint(tmp_path, monkeypatch,
                                                                                               capsys):
    cfg = tiny_config(out_dir=str(tmp_path), epochs=3, checkpoint_every=1, progress_every=100, explode_window=3)
    losses, steps = [], []
    orig_add = vqvae.LossGuard.add

    def spy(self, step, recon_loss):
        steps.append(step)
        losses.append(float(recon_loss.detach()))
        return orig_add(self, step, recon_loss)
    monkeypatch.setattr(vqvae.LossGuard, "add", spy)
    _blow_up_at_epoch(monkeypatch, 2, 0.1)
    with pytest.raises(vqvae.NonFiniteError) as e:
        vqvae.train(cfg)
    msg = str(e.value)
    tripped = first_explosion(losses, cfg.explode_factor, cfg.explode_window)
    assert tripped >= 4                                              # epoch 2 (4 steps per epoch)
    assert all(math.isfinite(L) for L in losses)                     # it exploded; it did not become NaN
    assert f"loss exploded in epoch 2, step {tripped}" in msg and "checkpoint_epoch1.pt" in msg
    assert "--lr" in msg and "--explode_factor" in msg
    assert steps[-1] - tripped < cfg.explode_window                 # checked every min(progress_every, window)
    run = Path(cfg.out_dir) / cfg.resolved_name()
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_epoch1.pt"]
    assert not (run / "final_metrics.json").exists() and not (run / "final_model.pt").exists()
    assert len(history(cfg)) == 1
    monkeypatch.undo()                                               # resume as the message says: lower lr
    capsys.readouterr()
    final = vqvae.train(vqvae.resume_config(run / "checkpoint_epoch1.pt", {"lr": 1e-4}))
    assert final["epoch"] == 3 and len(history(cfg)) == 3
    assert "lr 0.0003 -> 0.0001 from here on" in capsys.readouterr().out
    assert "lr: 0.0001" in (run / "config.yaml").read_text()
    ck = vqvae.load_checkpoint(run / "checkpoint_epoch3.pt")
    assert [g["lr"] for g in ck["optimizer_state_dict"]["param_groups"]] == [1e-4] * len(
        ck["optimizer_state_dict"]["param_groups"])                     # the optimizer really trained at the new lr
    vqvae.load_run(run, "checkpoint_epoch1.pt")          # its own checkpoint from before the new lr (same run id)
    other = tiny_config(out_dir=str(tmp_path), name="other", epochs=1, checkpoint_every=1, lr=1e-4)
    vqvae.train(other)                                   # ... but not another run's with the same settings
    with pytest.raises(vqvae.BavqError, match="does not belong"):
        vqvae.load_run(run, tmp_path / "other" / "checkpoint_epoch1.pt")


def test_the_same_run_without_the_guard_goes_on_to_the_end(tmp_path, monkeypatch):
    cfg = tiny_config(out_dir=str(tmp_path), epochs=3, checkpoint_every=1, explode_factor=0)
    _blow_up_at_epoch(monkeypatch, 2, 0.1)
    final = vqvae.train(cfg)
    assert final["epoch"] == 3


@pytest.mark.parametrize("quantizer", sorted(vqvae.QUANTIZERS))
def test_default_training_does_not_trip_the_guard(quantizer):
    """Every quantizer's default loss stays far below the default factor x its window minimum over
    three epochs of the tiny setting (the measured jumps on real data are in docs/running.md)."""
    cfg = tiny_config(quantizer=quantizer, lr=1e-3)
    train_u8, _ = vqvae.load_dataset(cfg)
    torch.manual_seed(0)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    guard, step, gen = vqvae.LossGuard(cfg.explode_factor, cfg.explode_window, torch.device("cpu")), 0, torch.Generator()
    for _ in range(3):
        m, step = vqvae.train_epoch(model, opt, train_u8, cfg, gen, step, 12, guard=guard)
    assert 0 < m["recon_jump_max"] < cfg.explode_factor / 10


# --------------------------------------------------------------------------- real CIFAR-10


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    if not SHARED_DATA.is_file():
        pytest.skip(f"{SHARED_DATA} not present")
    root = tmp_path_factory.mktemp("cifar")
    # only the first 400 training / 100 test images of each class: extracting all 60,000 files
    # takes ~20 s and the test uses 2,000 / 500 of them
    def wanted(m):
        parts = m.name.split("/")
        if len(parts) != 3 or not parts[2].endswith(".jpg"):
            return False
        return int(parts[2][:-4]) < (400 if parts[0] == "train" else 100)
    with tarfile.open(SHARED_DATA) as t:
        members = [m for m in t.getmembers() if m.isfile() and wanted(m)]
        if sys.version_info >= (3, 12):
            t.extractall(root, members=members, filter="data")
        else:
            t.extractall(root, members=members)
    return root


# BA-VQ with the original code's beta range (0.1 -> 5) barely learns in 80 steps: codes start within
# +-1/K, so beta * (d(x,j) - d(x,k)) << 1, P(k|x) is nearly uniform and the decoder sees almost
# the same P.E for every input (measured: +0.6 dB). A steeper beta range shows the pipeline learns.
@pytest.mark.slow
@pytest.mark.parametrize("quantizer,extra,margin_db", [
    ("vq_ema", {}, 3.0),
    ("ba_vq", {"beta_start": 1.0, "beta_end": 50.0}, 1.0),
])
def test_real_cifar10_short_run_beats_untrained_model(cifar_folder, tmp_path, quantizer, extra, margin_db):
    cfg = tiny_config(dataset="folder", data_dir=str(cifar_folder), train_subset=2000, val_subset=500,
                      hidden_dim=32, latent_dim=32, codebook_size=64, batch_size=50, epochs=2, lr=2e-3,
                      num_workers=0, quantizer=quantizer, out_dir=str(tmp_path), name="real", checkpoint_every=0,
                      **extra)
    _, val_u8 = vqvae.load_dataset(cfg)
    untrained = vqvae.validate(vqvae.build_model(cfg), val_u8, batch_size=100)
    final = vqvae.train(cfg)
    print(f"{quantizer}: untrained PSNR {untrained['psnr']:.2f} dB -> trained {final['psnr']:.2f} dB, "
          f"perplexity {final['perplexity']:.1f}, usage {final['usage_rate']:.2f}")
    assert final["psnr"] > untrained["psnr"] + margin_db
    jumps = [r["train/recon_jump_max"] for r in history(cfg)]              # the explosion guard (on) never near
    assert max(jumps) < cfg.explode_factor / 10, jumps
