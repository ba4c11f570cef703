"""Specification of the experiment workflow: resume, interruption, atomic checkpoints, clear
errors, sweeps and pictures."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train as cli
import vqvae
import vqvae_experiment
import vqvae_grid
from conftest import ROOT

pytestmark = pytest.mark.slow          # subprocesses and whole runs (deselect with -m "not slow")


def final_of(run_dir):
    return json.loads((Path(run_dir) / "final_metrics.json").read_text())


def history_of(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


def strip_times(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_resume_from_an_epoch_checkpoint_is_bit_identical(tiny_cfg, quantizer):
    ref = vqvae.train(tiny_cfg(name="ref", quantizer=quantizer, epochs=3))
    cfg = tiny_cfg(name="cut", quantizer=quantizer, epochs=3)
    vqvae.train(cfg)
    run = Path(cfg.out_dir) / "cut"
    # as if the process had died after writing checkpoint_epoch1.pt
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (run / p).unlink()
    resumed = vqvae.train(cli.config_from_args(["--resume", str(run)]))
    assert resumed == ref                                        # bit-identical, every key
    ref_hist = strip_times(history_of(Path(cfg.out_dir) / "ref"))
    assert strip_times(history_of(run)) == ref_hist              # history rebuilt, not duplicated
    a = torch.load(Path(cfg.out_dir) / "ref" / "final_model.pt", weights_only=True)
    b = torch.load(run / "final_model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    resumed = vqvae.train(vqvae.resume_config(run))
    assert resumed == ref
    assert not (run / "checkpoint_interrupted.pt").exists()     # superseded and removed at the end


def test_ctrl_c_saves_checkpoint_and_prints_resume_command(tmp_path):
    """Real SIGINT to the CLI: exit 130, checkpoint saved, and the printed command resumes to the
    same final metrics as an uninterrupted run."""
    common = ["--dataset", "fake", "--train_subset", "2048", "--val_subset", "64", "--hidden_dim", "8",
              "--latent_dim", "8", "--codebook_size", "16", "--batch_size", "32", "--epochs", "2",
              "--checkpoint_every", "0", "--out_dir", str(tmp_path), "--no_wandb", "--no_progress",
              "--device", "cpu"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    train_py = str(ROOT / "train.py")
    proc = subprocess.Popen([sys.executable, train_py, *common, "--name", "cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "cut"
    deadline = time.time() + 120
    while not (run / "history.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)                                             # somewhere inside epoch 1 or 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"python train.py --resume {run}" in err
    assert (run / "checkpoint_interrupted.pt").is_file()
    r = subprocess.run([sys.executable, train_py, "--resume", str(run), "--no_progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    r = subprocess.run([sys.executable, train_py, *common, "--name", "ref"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert final_of(run) == final_of(tmp_path / "ref")


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


def test_kill_9_mid_write_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_epoch1.pt"
    vqvae.atomic_torch_save({"w": torch.zeros(4_000_000)}, path)
    for delay in (0.3, 0.55, 0.8):
        p = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(path), str(ROOT)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.kill()                                                # SIGKILL, likely mid-write
        p.wait()
        w = torch.load(path, weights_only=True)["w"]            # always a complete file
        assert w.shape == (4_000_000,) and bool((w == w[0]).all())


# --------------------------------------------------------------------------- clear errors


def run_cli(args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


TINY = ["--dataset", "fake", "--train_subset", "64", "--val_subset", "32", "--hidden_dim", "8", "--latent_dim", "8",
        "--codebook_size", "16", "--batch_size", "32", "--epochs", "1", "--checkpoint_every", "1",
        "--no_wandb", "--no_progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("errs")
    r = run_cli([*TINY, "--out_dir", str(d), "--name", "done"], cwd=d)
    assert r.returncode == 0, r.stderr
    return d, d / "done"


def snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.mark.parametrize("args,expect", [
    (["--quantizer", "vqq"], "invalid choice"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "0"], "lr must be > 0"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch_size", "-4"], "batch_size must be >= 1"),
    (["--codebook_size", "1"], "codebook_size must be >= 2"),
    (["--beta_start", "2", "--beta_end", "1"], "beta_end must be >= beta_start"),
    (["--epochs", "two"], "invalid int value"),
    (["--dataset", "folder", "--data_dir", "/nonexistent/dir"], "does not exist"),
])
def test_bad_input_is_one_clear_paragraph(tmp_path, args, expect):
    r = run_cli([*TINY, "--out_dir", str(tmp_path), *args], cwd=tmp_path)
    assert r.returncode == 2
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())                          # nothing written


def test_errors_about_existing_runs_leave_them_untouched(finished_run, tmp_path):
    d, run = finished_run
    before = snapshot(run)
    r = run_cli([*TINY, "--out_dir", str(d), "--name", "done"], cwd=d)             # finished run, no --overwrite
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["--resume", str(run), "--codebook_size", "32", "--no_progress"], cwd=d)   # different shape
    assert r.returncode == 2 and "different model shape" in r.stderr and "codebook_size: 16 -> 32" in r.stderr
    r = run_cli(["--resume", str(run / "final_model.pt")], cwd=d)                   # weights only
    assert r.returncode == 2 and "not a bavq training checkpoint" in r.stderr
    r = run_cli(["--resume", str(d / "nope")], cwd=d)
    assert r.returncode == 2 and "neither a run directory nor a checkpoint" in r.stderr
    assert snapshot(run) == before


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(finished_run, tmp_path):
    _, run = finished_run
    broken = tmp_path / "run"
    broken.mkdir()
    data = (run / "checkpoint_epoch1.pt").read_bytes()
    (broken / "checkpoint_epoch1.pt").write_bytes(data[: len(data) // 2])         # truncated
    r = run_cli(["--resume", str(broken / "checkpoint_epoch1.pt")], cwd=tmp_path)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    (broken / "checkpoint_epoch1.pt").write_bytes(b"\x00garbage" * 100)
    r = run_cli(["--resume", str(broken)], cwd=tmp_path)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr
    assert (broken / "checkpoint_epoch1.pt").read_bytes() == b"\x00garbage" * 100  # left as it was


def test_overwrite_replaces_a_run_without_stale_checkpoints(tiny_cfg):
    cfg = tiny_cfg(name="o", epochs=3)
    vqvae.train(cfg)
    vqvae.train(tiny_cfg(name="o", epochs=1, overwrite=True))
    run = Path(cfg.out_dir) / "o"
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_epoch1.pt"]
    assert len(history_of(run)) == 1


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


@pytest.mark.parametrize("flag,value", [("lr", 0.05), ("seed", 7), ("batch_size", 16), ("train_subset", 128),
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


def test_optimizer_state_takes_the_parameters_layout():
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(2, 3, 4, 4), "exp_avg_sq": torch.rand(2, 3, 4, 4)}
    ref = {k: v.clone() for k, v in opt.state[p].items()}
    vqvae_experiment._match_state_layout(opt)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][k].stride() == p.stride()
        assert torch.equal(opt.state[p][k], ref[k])


# --------------------------------------------------------------------------- sweeps


def test_sweep_runs_the_grid_skips_finished_runs_and_prints_a_table(tmp_path):
    args = [*TINY, "--out_dir", str(tmp_path), "--name", "g", "--quantizer", "vq_ema", "ba_vq",
            "--codebook_size", "8", "16", "--seed", "0"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = {f"g_{q}_k{k}_s0" for q in ("vq_ema", "ba_vq") for k in (8, 16)}
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".grid_")} == names
    for n in names:
        cfg = vqvae.make_config(__import__("yaml").safe_load((tmp_path / n / "config.yaml").read_text()))
        assert n == f"g_{cfg.quantizer}_k{cfg.codebook_size}_s{cfg.seed}"
        assert len(final_of(tmp_path / n)["val_code_counts"]) == cfg.codebook_size
    table = r.stdout[r.stdout.index("run "):]
    for n in names:
        line = next(l for l in table.splitlines() if l.startswith(n))
        assert f"{final_of(tmp_path / n)['psnr']:.2f}" in line and line.rstrip().endswith("done")
    # second invocation: everything already finished -> skipped, files untouched
    before = {n: snapshot(tmp_path / n) for n in names}
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("skipped (finished)") == 4
    assert {n: snapshot(tmp_path / n) for n in names} == before


def test_sweep_refuses_existing_runs_with_other_settings(tmp_path):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    before = {n: snapshot(tmp_path / n) for n in ("vq_ema_k16_s0", "vq_ema_k16_s1")}
    r = run_cli([*args, "--lr", "0.05"], cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.count("FAILED") == 2 and "lr: 0.0003 -> 0.05" in r.stderr
    assert {n: snapshot(tmp_path / n) for n in before} == before


def test_sweep_refuses_existing_runs_with_other_epochs(tmp_path):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    r = run_cli([*args, "--epochs", "2"], cwd=tmp_path)
    assert r.returncode == 1 and r.stdout.count("FAILED") == 2 and "epochs: 1 -> 2" in r.stderr


def test_sweep_never_restarts_a_run_whose_checkpoint_is_corrupt(tmp_path):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1", "--epochs", "2"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    run = tmp_path / "vq_ema_k16_s1"
    (run / "final_metrics.json").unlink()
    (run / "checkpoint_interrupted.pt").write_bytes(b"garbage")
    before = snapshot(run)
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 1 and "corrupt or truncated" in r.stderr and "FAILED" in r.stdout
    assert snapshot(run) == before                                  # the good checkpoints survive


def test_sweep_resumes_an_interrupted_run(tmp_path):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1", "--epochs", "2"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "vq_ema_k16_s1"
    ref = final_of(run)
    (run / "final_metrics.json").unlink()
    (run / "checkpoint_epoch2.pt").unlink()
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "skipped (finished)" in r.stdout
    assert final_of(run) == ref


# --------------------------------------------------------------------------- pictures


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


# --------------------------------------------------------------------------- grids across processes


GRID = ["--dataset", "fake", "--train_subset", "64", "--val_subset", "32", "--hidden_dim", "8", "--latent_dim", "8",
        "--codebook_size", "16", "--batch_size", "32", "--epochs", "1", "--no_wandb", "--no_progress", "--device", "cpu",
        "--quantizer", "vq_ema", "vq", "ba_vq", "--seed", "0", "1", "--name", "g"]


def test_shards_are_disjoint_deterministic_and_cover_the_grid(tmp_path):
    configs, sweep = cli.configs_from_args(GRID + ["--out_dir", str(tmp_path)])
    names = [c.resolved_name() for c in configs]
    parts = [[c.resolved_name() for c in vqvae.shard_configs(configs, (i, 4))] for i in range(1, 5)]
    assert sorted(sum(parts, [])) == sorted(names) and len(set(sum(parts, []))) == len(names)
    assert parts[0] == [names[0], names[4]] and parts[3] == [names[3]]
    assert vqvae.parse_shard("2/4") == (2, 4)
    assert vqvae.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (4, 4)
    assert vqvae.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "5",
                                    "SLURM_ARRAY_TASK_COUNT": "4"}) == (4, 4)
    assert vqvae.parse_shard(None, {}) is None
    for bad in ("0/4", "5/4", "two"):
        with pytest.raises(vqvae.BavqError, match="--shard"):
            vqvae.parse_shard(bad)
    assert {c.wandb_group for c in configs} == {"g"}                   # one W&B group per grid


@pytest.mark.slow
def test_grid_parts_in_separate_processes_and_the_summary(tmp_path):
    out = tmp_path / "exp"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = lambda *extra, env=env: subprocess.run([sys.executable, str(ROOT / "train.py"), *GRID, "--out_dir", str(out), *extra],
                                                 cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    r1 = run("--shard", "1/3")
    r3 = run(env={**env, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert r1.returncode == 0 and r3.returncode == 0, r1.stderr + r3.stderr
    assert "part 1 of 3" in r1.stdout and "part 3 of 3" in r3.stdout
    done = {p.name for p in out.iterdir() if (p / "final_metrics.json").is_file()}
    # grid order vq_ema s0, vq_ema s1, vq s0, vq s1, ba_vq s0, ba_vq s1: part 1 = runs 1, 4; part 3 = runs 3, 6
    assert done == {"g_vq_ema_k16_s0", "g_vq_k16_s1", "g_vq_k16_s0", "g_ba_vq_k16_s1"}
    (out / ".grid_g.failed").mkdir()                                      # as a run that failed before it started
    (out / ".grid_g.failed" / "g_ba_vq_k16_s0.txt").write_text("out of memory\n")
    s = subprocess.run([sys.executable, str(ROOT / "train.py"), "--summarize", "--out_dir", str(out), "--name", "g"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert s.returncode == 0, s.stderr
    lines = {l.split()[0]: l for l in s.stdout.splitlines()[2:]}
    assert list(lines) == ["g_vq_ema_k16_s0", "g_vq_ema_k16_s1", "g_vq_k16_s0", "g_vq_k16_s1", "g_ba_vq_k16_s0",
                           "g_ba_vq_k16_s1"]
    assert all(lines[n].rstrip().endswith("finished") for n in done)
    assert "FAILED: out of memory" in lines["g_ba_vq_k16_s0"] and lines["g_vq_ema_k16_s1"].rstrip().endswith("missing")
    assert "vq_ema" in lines["g_vq_ema_k16_s1"]                           # what a missing run is, from the manifest
    r2 = run("--shard", "2/3")                                            # the last part; the failed run retried
    assert r2.returncode == 0, r2.stderr
    s = subprocess.run([sys.executable, str(ROOT / "train.py"), "--summarize", "--out_dir", str(out), "--name", "g"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert sum("finished" in l for l in s.stdout.splitlines()[2:]) == 6


def test_run_status_tells_running_stopped_and_failed_runs_apart(tmp_path):
    run = tmp_path / "r"
    assert vqvae_grid._run_status(run)[1] == "missing"
    run.mkdir()
    assert vqvae_grid._run_status(run)[1] == "stopped before its first checkpoint"
    (run / "checkpoint_epoch2.pt").write_bytes(b"")
    assert vqvae_grid._run_status(run)[1] == "stopped after epoch 2 (resumable)"
    with vqvae.RunClaim(run):                                            # a live process holds it
        assert vqvae_grid._run_status(run)[1].startswith(f"running (pid {os.getpid()}")
    (tmp_path / "failed.txt").write_text("NonFiniteError: loss is NaN\n")
    assert vqvae_grid._run_status(run, tmp_path / "failed.txt")[1] == "FAILED: NonFiniteError: loss is NaN"
    (run / "final_metrics.json").write_text('{"psnr": 20.0}')
    assert vqvae_grid._run_status(run) == ({"psnr": 20.0}, "finished")
