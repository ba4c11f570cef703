"""What a run leaves on disk and how it continues: every output file, checkpoints written atomically and kept,
replaced or refused by the rules, resume bit-identical after a checkpoint, a stop request or Ctrl-C, pictures,
and W&B."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train as cli
import vqvae
import vqvae_experiment
from conftest import ROOT, TINY, cli_in_process, final_of, one_paragraph as _one_paragraph, snapshot, tiny_config


# --------------------------------------------------------------------------- outputs


FINAL_KEYS = {"loss", "recon_loss", "perplexity", "usage_rate", "psnr", "dead_codes"}


BA_FINAL_KEYS = {"entropy_loss", "beta", "codebook_loss", "psnr_soft"}


HISTORY_KEYS = {"epoch", "train/loss", "train/recon_loss", "train/perplexity", "train/grad_norm",
                "train/grad_norm_max", "train/dead_code_restarts", "train/dead_codes", "train/usage_rate",
                "val/loss", "val/recon_loss", "val/psnr", "val/perplexity", "val/usage_rate", "val/dead_codes"}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One train.py process that trains every quantizer for 2 epochs (a grid over --quantizer), so the CLI
    is started once, not once per quantizer: (the finished process, {quantizer: its run directory})."""
    tmp = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--quantizer", *vqvae.QUANTIZERS, "--dataset", "fake",
         "--train_subset", "64", "--val_subset", "32", "--hidden_dim", "8", "--latent_dim", "8",
         "--codebook_size", "16", "--batch_size", "32", "--epochs", "2", "--checkpoint_every", "1",
         "--name", "run", "--out_dir", str(tmp / "exp"), "--no_wandb", "--no_progress", "--device", "cpu",
         "--fsq_levels", "4", "4"],                     # FSQ's 16 codes; the other quantizers have no levels
        cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
    return r, {q: tmp / "exp" / f"run_{q}_k16_s0" for q in vqvae.QUANTIZERS}


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_cli_one_epoch_writes_every_output(cli_runs, quantizer):
    r, runs = cli_runs
    assert r.returncode == 0, r.stderr
    assert "Epoch 2/2" in r.stdout and "PSNR" in r.stdout and "Perplexity" in r.stdout and "Usage" in r.stdout
    run = runs[quantizer]
    assert {p.name for p in run.iterdir()} >= {"final_model.pt", "final_metrics.json", "history.jsonl",
                                                "config.yaml", "checkpoint_epoch1.pt", "checkpoint_epoch2.pt"}
    final = json.loads((run / "final_metrics.json").read_text())
    expected = FINAL_KEYS | set(vqvae.QUANTIZERS[quantizer].loss_names) | (BA_FINAL_KEYS if quantizer == "ba_vq" else set())
    assert expected <= set(final)
    assert all(np.isfinite(final[k]) for k in expected)
    assert 1.0 <= final["perplexity"] <= len(final["val_code_counts"]) and 0 < final["usage_rate"] <= 1   # K (rvq: S K)
    if quantizer == "ba_vq":
        assert final["beta"] == pytest.approx(5.0)        # the schedule ends at beta_end
    lines = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert all(HISTORY_KEYS <= set(l) for l in lines)
    assert all({f"{s}/{k}" for s in ("train", "val") for k in vqvae.QUANTIZERS[quantizer].loss_names} <= set(l) for l in lines)
    if quantizer == "ba_vq":
        assert all({"train/entropy_loss", "val/entropy_loss", "val/beta"} <= set(l) for l in lines)
    assert lines[-1]["val/psnr"] == pytest.approx(final["psnr"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["quantizer"] == quantizer and cfg["codebook_size"] == 16 and cfg["epochs"] == 2
    ck = torch.load(run / "checkpoint_epoch1.pt", weights_only=False)
    assert {"model_state_dict", "optimizer_state_dict", "epoch", "val_metrics", "config"} <= set(ck)
    assert ck["epoch"] == 1 and ck["config"]["quantizer"] == quantizer
    model = vqvae.VQVAE.from_config(vqvae.make_config(cfg))
    model.load_state_dict(torch.load(run / "final_model.pt", weights_only=True))   # loads strictly


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tiny_cfg):
    cfg = tiny_cfg(name="keep")
    first = vqvae.train(cfg)
    run = vqvae.Path(cfg.out_dir) / "keep"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(vqvae.BavqError, match="--overwrite"):
        vqvae.train(tiny_cfg(name="keep", lr=1e-2))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    again = vqvae.train(tiny_cfg(name="keep", overwrite=True))
    assert again == first


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_latest_n_and_config_yaml_says_where_it_ran(tmp_path, capsys):
    cfg = tiny_config(out_dir=str(tmp_path), name="k", epochs=4, checkpoint_every=1, keep_checkpoints=2)
    vqvae.train(cfg)
    run = tmp_path / "k"
    assert sorted(p.name for p in run.glob("checkpoint_epoch*.pt")) == ["checkpoint_epoch3.pt", "checkpoint_epoch4.pt"]
    head = (run / "config.yaml").read_text().splitlines()[:2]
    assert head[1].startswith("# device used: cpu (cpu); torch ") and "bavq code: git " in head[1]
    assert vqvae.load_run(run)[1].keep_checkpoints == 2                # comments do not disturb reading it back
    out = capsys.readouterr().out
    assert "Epoch 4/4 (" in out and " s) | Train Loss" in out          # per-epoch time on the epoch line


@pytest.mark.slow
def test_stale_temporaries_are_removed_and_overwrite_removes_old_wandb_runs(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="r", checkpoint_every=1)
    vqvae.train(cfg)
    run = tmp_path / "r"
    (run / ".checkpoint_epoch1.pt.tmp4242").write_bytes(b"half a checkpoint")
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    vqvae.train(vqvae.resume_config(run, {"epochs": 2, "overwrite": True}))
    assert not (run / ".checkpoint_epoch1.pt.tmp4242").exists() and (run / "wandb").is_dir()
    (run / ".final_model.pt.tmp99").write_bytes(b"x")
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="r", overwrite=True))
    assert not (run / "wandb").exists() and not (run / ".final_model.pt.tmp99").exists()


@pytest.mark.slow
def test_pictures_are_written_at_checkpoints_and_end(tiny_cfg):
    cfg = tiny_cfg(name="pics", recon_images=6, checkpoint_every=1)
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "pics"
    recon = Image.open(run / "recon.png")
    assert recon.size[0] >= 6 * 96 and recon.size[1] >= 2 * 96      # 6 images, 3x enlarged, two labelled rows
    # the top row is the validation images themselves, the bottom row the model's reconstructions
    val = vqvae.load_dataset(cfg)[1]
    model, _ = vqvae.load_run(run)
    x, x_recon = vqvae.recon_rows(model, val, 6)
    idx = vqvae.evenly_spaced(val.shape[0], 6)
    assert torch.equal(x, vqvae.to_float(val[idx]))
    torch.testing.assert_close(x_recon, model(x)[0])
    usage = Image.open(run / "usage.png")
    assert usage.size[0] > 300 and usage.format == "PNG"


# --------------------------------------------------------------------------- resume


def history_of(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


def strip_times(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_resume_from_an_epoch_checkpoint_is_bit_identical(tiny_cfg, quantizer):
    small = dict(train_subset=128, val_subset=32, epochs=3)                    # 2 steps per epoch
    cfg = tiny_cfg(name="cut", quantizer=quantizer, **small)
    ref = vqvae.train(cfg)                                       # the uninterrupted run's results
    run = Path(cfg.out_dir) / "cut"
    ref_hist = strip_times(history_of(run))
    a = torch.load(run / "final_model.pt", weights_only=True)
    # as if the process had died after writing checkpoint_epoch1.pt
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (run / p).unlink()
    resumed = vqvae.train(cli.config_from_args(["--resume", str(run)]))
    assert resumed == ref                                        # bit-identical, every key
    assert strip_times(history_of(run)) == ref_hist              # history rebuilt, not duplicated
    b = torch.load(run / "final_model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stop_mid_epoch_then_resume_is_bit_identical(tiny_cfg, monkeypatch):
    """A stop request inside epoch 2 saves checkpoint_interrupted.pt with the position inside the
    epoch; resuming finishes with exactly the uninterrupted result (BA-VQ: beta schedule included)."""
    ref = vqvae.train(tiny_cfg(name="ref", quantizer="ba_vq", epochs=3))
    calls = {"n": 0}

    def stop_after_6(self):
        calls["n"] += 1
        return calls["n"] > 6                                   # 4 batches per epoch: stops in epoch 2
    monkeypatch.setattr(vqvae_experiment._StopFlag, "__call__", stop_after_6)
    cfg = tiny_cfg(name="cut", quantizer="ba_vq", epochs=3)
    with pytest.raises(vqvae.TrainingInterrupted, match="--resume"):
        vqvae.train(cfg)
    run = Path(cfg.out_dir) / "cut"
    ck = vqvae.load_checkpoint(run / "checkpoint_interrupted.pt")
    assert ck["epoch"] == 1 and ck["partial_epoch"]["batch"] == 2 and ck["step"] == 6
    assert not (run / "final_metrics.json").exists()
    monkeypatch.undo()
    assert vqvae.latest_checkpoint(run).name == "checkpoint_interrupted.pt"
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append((Path(a[0]).name, kw.get("mmap"))) or real_load(*a, **kw))
    resumed = vqvae.train(vqvae.resume_config(run))                # the run directory, as the CLI's --resume RUN
    monkeypatch.undo()
    assert resumed == ref
    assert not (run / "checkpoint_interrupted.pt").exists()     # superseded and removed at the end
    # the checkpoint is read once; finding the latest one and the config only peek (its tensors memory-mapped)
    assert [r for r in reads if not r[1]] == [("checkpoint_interrupted.pt", False)], reads


def test_an_epoch_checkpoint_after_a_resume_supersedes_the_interrupted_one(tiny_cfg, monkeypatch):
    """Interrupted in epoch 2, resumed, then stopped by a divergence in epoch 3: the run resumes from its
    latest checkpoint (epoch 2) as the message says, with no stale checkpoint_interrupted.pt in the way."""
    calls = {"n": 0}
    monkeypatch.setattr(vqvae_experiment._StopFlag, "__call__", lambda self: calls.__setitem__("n", calls["n"] + 1)
                        or calls["n"] > 6)
    cfg = tiny_cfg(name="cut", epochs=3)
    with pytest.raises(vqvae.TrainingInterrupted):
        vqvae.train(cfg)
    monkeypatch.undo()
    run = Path(cfg.out_dir) / "cut"
    orig = vqvae.VQEMAQuantizer.forward
    seen = {"n": 0}

    def poisoned(self, z):
        z_q, losses, info = orig(self, z)
        seen["n"] += self.training
        if seen["n"] == 4:              # the resumed run: 2 batches finish epoch 2, this is epoch 3, batch 2
            losses["commitment_loss"] = losses["commitment_loss"] * float("nan")
        return z_q, losses, info
    monkeypatch.setattr(vqvae.VQEMAQuantizer, "forward", poisoned)
    with pytest.raises(vqvae.NonFiniteError, match="checkpoint_epoch2.pt"):
        vqvae.train(vqvae.resume_config(run))
    monkeypatch.undo()
    assert not (run / "checkpoint_interrupted.pt").exists()
    assert vqvae.train(vqvae.resume_config(run))["epoch"] == 3          # no --overwrite needed


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_and_prints_resume_command(tmp_path, capsys):
    """Real SIGINT to the CLI: exit 130, checkpoint saved, and the printed command resumes to the
    same final metrics as an uninterrupted run."""
    common = ["--dataset", "fake", "--train_subset", "1024", "--val_subset", "64", "--hidden_dim", "8",
              "--latent_dim", "8", "--codebook_size", "16", "--batch_size", "32", "--epochs", "2",
              "--checkpoint_every", "0", "--out_dir", str(tmp_path), "--no_wandb", "--no_progress",
              "--device", "cpu"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    train_py = str(ROOT / "train.py")
    proc = subprocess.Popen([sys.executable, train_py, *common, "--name", "cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "cut"
    deadline = time.time() + 120
    while not (run / "history.jsonl").exists() and time.time() < deadline:   # epoch 1 written: the signal
        time.sleep(0.05)                                        # lands in epoch 2 (32 steps) or its start
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"python train.py --resume {run}" in err
    assert (run / "checkpoint_interrupted.pt").is_file()
    r = cli_in_process(["--resume", str(run), "--no_progress"], capsys)     # the printed command, in this process
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert cli.main([*common, "--name", "ref"]) == 0                    # the uninterrupted run, in this process
    assert final_of(run) == final_of(tmp_path / "ref")


@pytest.mark.slow
def test_overwrite_replaces_a_run_without_stale_checkpoints(tiny_cfg):
    cfg = tiny_cfg(name="o", epochs=3)
    vqvae.train(cfg)
    vqvae.train(tiny_cfg(name="o", epochs=1, overwrite=True))
    run = Path(cfg.out_dir) / "o"
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_epoch1.pt"]
    assert len(history_of(run)) == 1


@pytest.mark.slow
def test_resuming_a_finished_run_needs_overwrite_and_discards_its_later_results(tiny_cfg):
    cfg = tiny_cfg(name="f", epochs=3)
    first = vqvae.train(cfg)
    run = Path(cfg.out_dir) / "f"
    before = snapshot(run)
    with pytest.raises(vqvae.BavqError, match="has finished"):
        vqvae.train(vqvae.resume_config(run / "checkpoint_epoch1.pt"))
    assert snapshot(run) == before                               # refused: nothing touched
    # with --overwrite, the results after epoch 1 are discarded and recomputed (identically)
    seen = {}
    orig = vqvae_experiment.train_epoch                         # patched where the run calls it

    def spy(*a, **k):
        seen.setdefault("files", sorted(p.name for p in run.iterdir()))
        return orig(*a, **k)
    vqvae_experiment.train_epoch = spy
    try:
        again = vqvae.train(vqvae.resume_config(run / "checkpoint_epoch1.pt", {"overwrite": True}))
    finally:
        vqvae_experiment.train_epoch = orig
    assert "checkpoint_epoch3.pt" not in seen["files"] and "final_metrics.json" not in seen["files"]
    assert again == first


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("weight_decay", 0.5), ("seed", 7), ("batch_size", 16), ("train_subset", 128),
                                        ("commitment_cost", 1.0), ("fsq_levels", [2, 8])])
def test_resume_refuses_settings_that_would_not_apply_and_writes_nothing(tiny_cfg, flag, value):
    q = "fsq" if flag == "fsq_levels" else "vq_ema"
    cfg = tiny_cfg(name="r", epochs=2, quantizer=q)
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "r"
    (run / "final_metrics.json").unlink()
    before = snapshot(run)
    with pytest.raises(vqvae.BavqError, match=flag):
        vqvae.train(vqvae.resume_config(run / "checkpoint_epoch1.pt", {flag: value}))
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_may_change_how_it_runs_and_extend_epochs(tiny_cfg):
    cfg = tiny_cfg(name="x", epochs=2)
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "x"
    (run / "final_metrics.json").unlink()
    (run / "final_model.pt").unlink()
    final = vqvae.train(vqvae.resume_config(run, {"epochs": 3, "progress_every": 1}))
    assert final["epoch"] == 3 and len(history_of(run)) == 3
    with pytest.raises(vqvae.BavqError, match="already at the end of epoch 3"):
        vqvae.train(vqvae.resume_config(run / "checkpoint_epoch3.pt", {"epochs": 2, "overwrite": True}))


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_needs_overwrite(tiny_cfg):
    """Later checkpoints of an unfinished run are results too: not deleted without --overwrite."""
    cfg = tiny_cfg(name="e", epochs=3)
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "e"
    for p in ("final_metrics.json", "final_model.pt"):
        (run / p).unlink()
    before = snapshot(run)
    with pytest.raises(vqvae.BavqError, match="checkpoint_epoch2.pt, checkpoint_epoch3.pt"):
        vqvae.train(vqvae.resume_config(run / "checkpoint_epoch1.pt"))
    assert snapshot(run) == before


@pytest.mark.slow
def test_overwrite_is_never_inherited_from_the_checkpoint(tiny_cfg):
    cfg = tiny_cfg(name="o2", epochs=2, overwrite=True)            # started with --overwrite
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "o2"
    assert vqvae.load_checkpoint(run / "checkpoint_epoch1.pt")["config"]["overwrite"] is False
    assert "overwrite: false" in (run / "config.yaml").read_text()
    before = snapshot(run)
    with pytest.raises(vqvae.BavqError, match="has finished"):
        vqvae.train(vqvae.resume_config(run / "checkpoint_epoch1.pt"))
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_cannot_be_cut_short(tiny_cfg, monkeypatch):
    calls = {"n": 0}

    def stop_after_6(self):
        calls["n"] += 1
        return calls["n"] > 6
    monkeypatch.setattr(vqvae_experiment._StopFlag, "__call__", stop_after_6)
    cfg = tiny_cfg(name="m", epochs=3)
    with pytest.raises(vqvae.TrainingInterrupted):
        vqvae.train(cfg)
    monkeypatch.undo()
    run = Path(cfg.out_dir) / "m"
    with pytest.raises(vqvae.BavqError, match="inside epoch 2"):
        vqvae.train(vqvae.resume_config(run, {"epochs": 1}))


@pytest.mark.slow
def test_optimizer_state_takes_the_parameters_layout():
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(2, 3, 4, 4), "exp_avg_sq": torch.rand(2, 3, 4, 4)}
    ref = {k: v.clone() for k, v in opt.state[p].items()}
    vqvae_experiment._match_state_layout(opt)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][k].stride() == p.stride()
        assert torch.equal(opt.state[p][k], ref[k])


def test_resume_refuses_another_place_and_a_checkpoint_from_another_run(tmp_path):
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="a", quantizer="vq_ema", checkpoint_every=1))
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="b", quantizer="ba_vq", checkpoint_every=1))
    with pytest.raises(vqvae.BavqError, match="point to"):
        vqvae.resume_config(tmp_path / "a", {"name": "elsewhere", "epochs": 2})
    with pytest.raises(vqvae.BavqError, match="point to"):
        vqvae.resume_config(tmp_path / "a", {"out_dir": str(tmp_path / "other"), "epochs": 2})
    assert vqvae.resume_config(tmp_path / "a", {"out_dir": str(tmp_path), "name": "a", "epochs": 2}).epochs == 2
    # b's checkpoint copied into a: refused, and a's config.yaml is left as it was
    import shutil
    shutil.copy(tmp_path / "b" / "checkpoint_epoch1.pt", tmp_path / "a" / "checkpoint_epoch1.pt")
    before = (tmp_path / "a" / "config.yaml").read_text()
    with pytest.raises(vqvae.BavqError, match="does not belong to the run"):
        vqvae.train(vqvae.resume_config(tmp_path / "a" / "checkpoint_epoch1.pt", {"epochs": 2, "overwrite": True}))
    assert (tmp_path / "a" / "config.yaml").read_text() == before


# --------------------------------------------------------------------------- clear errors about existing runs and checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run written by train.py's main in this process (the errors below are about it, not about
    starting a process)."""
    import train
    d = tmp_path_factory.mktemp("errs")
    assert train.main([*TINY, "--out_dir", str(d), "--name", "done"]) == 0
    return d, d / "done"


@pytest.mark.slow
def test_errors_about_existing_runs_leave_them_untouched(finished_run, tmp_path, capsys):
    d, run = finished_run
    before = snapshot(run)
    r = cli_in_process([*TINY, "--out_dir", str(d), "--name", "done"], capsys)             # finished run, no --overwrite
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = cli_in_process(["--resume", str(run), "--codebook_size", "32", "--no_progress"], capsys)   # different shape
    assert r.returncode == 2 and "different model shape" in r.stderr and "codebook_size: 16 -> 32" in r.stderr
    r = cli_in_process(["--resume", str(run / "final_model.pt")], capsys)                   # weights only
    assert r.returncode == 2 and "not a bavq training checkpoint" in r.stderr
    r = cli_in_process(["--resume", str(d / "nope")], capsys)
    assert r.returncode == 2 and "neither a run directory nor a checkpoint" in r.stderr
    assert snapshot(run) == before


@pytest.mark.slow
def test_corrupt_or_truncated_checkpoint_is_a_clear_error(finished_run, tmp_path, capsys):
    _, run = finished_run
    broken = tmp_path / "run"
    broken.mkdir()
    data = (run / "checkpoint_epoch1.pt").read_bytes()
    (broken / "checkpoint_epoch1.pt").write_bytes(data[: len(data) // 2])         # truncated
    r = cli_in_process(["--resume", str(broken / "checkpoint_epoch1.pt")], capsys)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    (broken / "checkpoint_epoch1.pt").write_bytes(b"\x00garbage" * 100)
    r = cli_in_process(["--resume", str(broken)], capsys)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr
    assert (broken / "checkpoint_epoch1.pt").read_bytes() == b"\x00garbage" * 100  # left as it was


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=1)
    vqvae.train(cfg)
    ck = torch.load(tmp_path / "r" / "checkpoint_epoch1.pt", weights_only=False)
    ck["format"] = vqvae.CHECKPOINT_FORMAT + 1
    torch.save(ck, tmp_path / "r" / "checkpoint_epoch1.pt")
    with pytest.raises(vqvae.BavqError, match="Update bavq"):
        vqvae.load_checkpoint(tmp_path / "r" / "checkpoint_epoch1.pt")


# --------------------------------------------------------------------------- atomic writes


_KILL_WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import vqvae
path = sys.argv[1]
big = {"w": torch.zeros(4_000_000)}
print("ready", flush=True)
while True:
    big["w"].add_(1.0)
    vqvae.atomic_torch_save(big, path)
"""


@pytest.mark.slow
def test_kill_9_mid_write_never_leaves_a_truncated_checkpoint(tmp_path):
    """Three writers, each rewriting its own checkpoint in a loop, killed (SIGKILL) after 0.3, 0.55 and 0.8 s,
    likely mid-write: every file is a complete checkpoint. (Started together: one interpreter start-up's wait.)"""
    delays = (0.3, 0.55, 0.8)
    paths = [tmp_path / f"run{i}" / "checkpoint_epoch1.pt" for i in range(len(delays))]
    procs = []
    for path in paths:
        path.parent.mkdir()
        vqvae.atomic_torch_save({"w": torch.zeros(4_000_000)}, path)
        procs.append(subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(path), str(ROOT)],
                                      stdout=subprocess.PIPE, text=True))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    start = time.time()
    for p, delay in zip(procs, delays):
        time.sleep(max(0.0, start + delay - time.time()))
        p.kill()                                                # SIGKILL, likely mid-write
        p.wait()
    for path in paths:
        w = torch.load(path, weights_only=True)["w"]            # always a complete file
        assert w.shape == (4_000_000,) and bool((w == w[0]).all())
        assert sorted(q.name for q in path.parent.iterdir() if not q.name.startswith(".")) == [path.name]


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=3, checkpoint_every=1)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".checkpoint_epoch2.pt.tmp" + str(os.getpid())):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(vqvae.os, "fsync", fsync)
    with pytest.raises(vqvae.WriteError) as e:
        vqvae.train(cfg)
    msg = str(e.value)
    _one_paragraph(msg)
    assert "No space left on device" in msg and f"python train.py --resume {tmp_path / 'r'}" in msg
    run = tmp_path / "r"
    assert vqvae.load_checkpoint(run / "checkpoint_epoch1.pt")["epoch"] == 1      # intact
    assert not (run / "checkpoint_epoch2.pt").exists() and not list(run.glob(".*.tmp*"))
    monkeypatch.setattr(vqvae.os, "fsync", real_fsync)
    assert vqvae.train(vqvae.resume_config(run))["epoch"] == 3                     # and it resumes


# --------------------------------------------------------------------------- W&B


@pytest.mark.slow
def test_wandb_without_api_key_falls_back_and_does_not_crash(tiny_cfg, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))            # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(name="wb", wandb=True)
    final = vqvae.train(cfg)
    out = capsys.readouterr().out
    assert "no W&B API key" in out and "offline" in out
    assert np.isfinite(final["psnr"])
    assert (vqvae.Path(cfg.out_dir) / "wb" / "wandb").is_dir()


@pytest.mark.slow
def test_the_tests_ignore_the_users_wandb_settings(tmp_path):
    """A shell with WANDB_MODE=online, an API key and an entity: inside the test suite W&B is disabled
    and none of them is seen."""
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40, "WANDB_ENTITY": "someone",
           "WANDB_CONFIG_DIR": str(tmp_path)}
    code = ("import os, conftest; print(os.environ['WANDB_MODE'], os.environ.get('WANDB_API_KEY'), "
            "os.environ.get('WANDB_ENTITY'), os.environ['WANDB_CONFIG_DIR'] != " + repr(str(tmp_path)) + ")")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["disabled", "None", "None", "True"]


def test_no_wandb_never_imports_wandb(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)       # any import of wandb would raise
    vqvae.train(tiny_cfg(name="nowb", wandb=False))


@pytest.mark.slow
def test_config_file_with_resume_names_the_settings_it_would_change(finished_run, tmp_path, capsys):
    """--resume RUN --config FILE: the file's settings that a resume may not change and that differ from the run's
    are named with the file, one paragraph, nothing written; a file that only changes what a resume may change
    (here --epochs, to extend the run) is applied."""
    d, run = finished_run
    before = snapshot(run)
    bad = tmp_path / "server.yaml"
    bad.write_text("commitment_cost: 0.5\nbatch_size: 16\nepochs: 3\ndevice: cpu\n")
    r = cli_in_process(["--resume", str(run), "--config", str(bad), "--no_progress", "--overwrite"], capsys)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    msg = r.stderr
    _one_paragraph(msg.removeprefix("error: ").strip())
    assert f"--config {bad} sets" in msg and "commitment_cost: 0.25 -> 0.5" in msg and "batch_size: 32 -> 16" in msg
    assert "epochs" not in msg.split("sets", 1)[1].split("(the run's")[0]          # epochs may change: not named
    assert snapshot(run) == before
    good = tmp_path / "longer.yaml"
    good.write_text("epochs: 2\n")
    cfg = cli.config_from_args(["--resume", str(run), "--config", str(good), "--overwrite"])
    assert cfg.epochs == 2 and cfg.lr == 3e-4
