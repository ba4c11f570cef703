"""Grids of runs: a sweep runs every combination, skips finished runs, resumes interrupted ones and refuses
changed settings; shards split a grid across processes; the summary tells every run's state."""
import os
import subprocess
import sys

import pytest
import torch

import train as cli
import vqvae
import vqvae_grid
from conftest import ROOT, TINY, cli_in_process, final_of, run_cli, snapshot

pytestmark = pytest.mark.slow          # subprocesses and whole runs (deselect with -m "not slow")


# --------------------------------------------------------------------------- sweeps


def test_sweep_runs_the_grid_skips_finished_runs_and_prints_a_table(tmp_path, capsys):
    args = [*TINY, "--out_dir", str(tmp_path), "--name", "g", "--quantizer", "vq_ema", "ba_vq",
            "--codebook_size", "8", "16", "--seed", "0"]
    r = cli_in_process(args, capsys)
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
        assert f"{final_of(tmp_path / n)['psnr']:.2f}" in line and line.rstrip().endswith("finished")
    # second invocation: everything already finished -> skipped, files untouched
    before = {n: snapshot(tmp_path / n) for n in names}
    r = cli_in_process(args, capsys)
    assert r.returncode == 0 and r.stdout.count("skipped (finished)") == 4
    assert {n: snapshot(tmp_path / n) for n in names} == before


GROUPS_YAML = """name: g
lr: 0.002
seed: [0, 1]
groups:
  plain: {quantizer: vq_ema}
  rated: {quantizer: ecvq, ecvq_lambda: 0.5, seed: 5, lr: 0.003}
"""


def test_groups_share_the_files_settings_and_flags_override_both(tmp_path):
    """A config file's ``groups``: each group's settings over the shared ones, flags over both, each group over the
    sweep keys' values (its own if it gives them, the flags' if they do); run names <name>_<group>_<q>_k<K>_s<seed>."""
    f = tmp_path / "g.yaml"
    f.write_text(GROUPS_YAML)
    configs, sweep = cli.configs_from_args(["--config", str(f), "--epochs", "3"])
    assert sweep
    assert [(c.name, c.lr, c.epochs, c.wandb_group) for c in configs] == [
        ("g_plain_vq_ema_k512_s0", 0.002, 3, "g_plain"), ("g_plain_vq_ema_k512_s1", 0.002, 3, "g_plain"),
        ("g_rated_ecvq_k512_s5", 0.003, 3, "g_rated")]
    assert configs[2].ecvq_lambda == 0.5
    configs, _ = cli.configs_from_args(["--config", str(f), "--seed", "7", "--lr", "0.01", "--name", "h"])
    assert [(c.name, c.lr) for c in configs] == [("h_plain_vq_ema_k512_s7", 0.01), ("h_rated_ecvq_k512_s7", 0.01)]
    # a group alone as a sweep: --name <name>_<group> with its settings as flags makes the same runs
    alone, _ = cli.configs_from_args(["--quantizer", "ecvq", "--ecvq_lambda", "0.5", "--lr", "0.003", "--seed", "5",
                                      "6", "--name", "g_rated", "--epochs", "3"])
    import dataclasses
    assert dataclasses.asdict(alone[0]) == dataclasses.asdict(
        cli.configs_from_args(["--config", str(f), "--epochs", "3"])[0][2])


@pytest.mark.parametrize("groups, says", [
    ("groups: [a, b]\n", "must map each group's name"),
    ("groups: {}\n", "must map each group's name"),
    ("groups:\n  a: {quantizer: vq_ema, bogus_key: 1}\n", "group 'a'.*bogus_key"),
    ("groups:\n  a: {quantizer: vq_ema, lr: fast}\n", "group 'a'.*lr"),
])
def test_bad_groups_are_refused_with_what_to_fix(tmp_path, groups, says):
    f = tmp_path / "g.yaml"
    f.write_text("name: g\n" + groups)
    with pytest.raises(vqvae.BavqError, match=says):
        cli.configs_from_args(["--config", str(f)])


def test_a_grid_of_groups_runs_resumes_and_cannot_be_resumed_as_one_run(tmp_path, capsys):
    f = tmp_path / "g.yaml"
    f.write_text(GROUPS_YAML.replace("seed: [0, 1]", "seed: [0]").replace("seed: 5, ", ""))
    args = [*TINY, "--config", str(f), "--out_dir", str(tmp_path / "runs")]
    r = cli_in_process(args, capsys)
    assert r.returncode == 0, r.stderr
    names = {"g_plain_vq_ema_k16_s0", "g_rated_ecvq_k16_s0"}
    assert {p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".grid_")} == names
    r = cli_in_process(args, capsys)
    assert r.returncode == 0 and r.stdout.count("skipped (finished)") == 2
    r = cli_in_process([*args, "--resume", str(tmp_path / "runs" / "g_plain_vq_ema_k16_s0")], capsys)
    assert r.returncode == 2 and "grid of groups" in r.stderr


def test_a_grid_run_in_parts_records_every_part(tmp_path, capsys):
    """Two groups of a config file run one after the other into the same folder (and later more seeds): the grid's
    record holds every part's runs, so the summary lists all of them; nothing is refused."""
    f = tmp_path / "g.yaml"
    f.write_text(GROUPS_YAML.replace("seed: [0, 1]", "seed: [0]").replace("seed: 5, ", ""))
    base = [*TINY, "--config", str(f), "--out_dir", str(tmp_path / "runs")]
    assert cli_in_process([*base, "--groups", "plain"], capsys).returncode == 0
    assert cli_in_process([*base, "--groups", "rated"], capsys).returncode == 0
    assert cli_in_process([*base, "--groups", "plain", "--seed", "1"], capsys).returncode == 0
    record = __import__("json").loads(vqvae_grid.grid_manifest_path(tmp_path / "runs", "g").read_text())
    assert [r["name"] for r in record["runs"]] == ["g_plain_vq_ema_k16_s0", "g_rated_ecvq_k16_s0", "g_plain_vq_ema_k16_s1"]
    table, _ = vqvae_grid.grid_summary(tmp_path / "runs", "g")
    assert table.count("finished") >= 3


def test_sweep_refuses_existing_runs_with_other_settings(tmp_path, capsys):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1"]
    assert cli_in_process(args, capsys).returncode == 0
    before = {n: snapshot(tmp_path / n) for n in ("vq_ema_k16_s0", "vq_ema_k16_s1")}
    r = cli_in_process([*args, "--lr", "0.05"], capsys)
    assert r.returncode == 1
    assert r.stdout.count("FAILED") == 2 and "lr: 0.0003 -> 0.05" in r.stderr
    assert {n: snapshot(tmp_path / n) for n in before} == before


def test_sweep_refuses_existing_runs_with_other_epochs(tmp_path, capsys):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1"]
    assert cli_in_process(args, capsys).returncode == 0
    r = cli_in_process([*args, "--epochs", "2"], capsys)
    assert r.returncode == 1 and r.stdout.count("FAILED") == 2 and "epochs: 1 -> 2" in r.stderr


def test_sweep_never_restarts_a_run_whose_checkpoint_is_corrupt(tmp_path, capsys):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1", "--epochs", "2"]
    assert cli_in_process(args, capsys).returncode == 0
    run = tmp_path / "vq_ema_k16_s1"
    (run / "final_metrics.json").unlink()
    (run / "checkpoint_interrupted.pt").write_bytes(b"garbage")
    before = snapshot(run)
    r = cli_in_process(args, capsys)
    assert r.returncode == 1 and "corrupt or truncated" in r.stderr and "FAILED" in r.stdout
    assert snapshot(run) == before                                  # the good checkpoints survive


def test_sweep_resumes_an_interrupted_run(tmp_path, capsys):
    args = [*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "--seed", "0", "1", "--epochs", "2"]
    r = cli_in_process(args, capsys)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "vq_ema_k16_s1"
    ref = final_of(run)
    (run / "final_metrics.json").unlink()
    (run / "checkpoint_epoch2.pt").unlink()
    r = cli_in_process(args, capsys)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "skipped (finished)" in r.stdout
    assert final_of(run) == ref


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
    for bad, why in (("0/4", "between 1 and 4"), ("5/4", "between 1 and 4"), ("two", "takes I/N"),
                     ("0/0", "at least 1 part"), ("1/0", "at least 1 part"), ("1/-2", "at least 1 part")):
        with pytest.raises(vqvae.BavqError, match="--shard") as e:
            vqvae.parse_shard(bad)
        assert why in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(vqvae.BavqError, match="SLURM_ARRAY_TASK_COUNT=0 .* at least 1 part"):
        vqvae.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"})
    assert {c.wandb_group for c in configs} == {"g"}                   # one W&B group per grid


@pytest.mark.slow
def test_grid_parts_in_separate_processes_and_the_summary(tmp_path, capsys):
    out = tmp_path / "exp"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = lambda *extra, env=env: subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *GRID, "--out_dir", str(out), *extra], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    p1 = start("--shard", "1/3")                                          # two parts at the same time, as on a cluster
    p3 = start(env={**env, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    (out1, err1), (out3, err3) = p1.communicate(timeout=300), p3.communicate(timeout=300)
    assert p1.returncode == 0 and p3.returncode == 0, err1 + err3
    assert "part 1 of 3" in out1 and "part 3 of 3" in out3
    done = {p.name for p in out.iterdir() if (p / "final_metrics.json").is_file()}
    # grid order vq_ema s0, vq_ema s1, vq s0, vq s1, ba_vq s0, ba_vq s1: part 1 = runs 1, 4; part 3 = runs 3, 6
    assert done == {"g_vq_ema_k16_s0", "g_vq_k16_s1", "g_vq_k16_s0", "g_ba_vq_k16_s1"}
    (out / ".grid_g.failed").mkdir()                                      # as a run that failed before it started
    (out / ".grid_g.failed" / "g_ba_vq_k16_s0.txt").write_text("out of memory\n")
    capsys.readouterr()
    assert cli.main(["--summarize", "--out_dir", str(out), "--name", "g"]) == 0     # in this process: no start-up
    lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()[2:]}
    assert list(lines) == ["g_vq_ema_k16_s0", "g_vq_ema_k16_s1", "g_vq_k16_s0", "g_vq_k16_s1", "g_ba_vq_k16_s0",
                           "g_ba_vq_k16_s1"]
    assert all(lines[n].rstrip().endswith("finished") for n in done)
    assert "FAILED: out of memory" in lines["g_ba_vq_k16_s0"] and lines["g_vq_ema_k16_s1"].rstrip().endswith("missing")
    assert "vq_ema" in lines["g_vq_ema_k16_s1"]                           # what a missing run is, from the manifest
    assert cli.main([*GRID, "--out_dir", str(out), "--shard", "2/3"]) == 0   # the last part (in this process);
    capsys.readouterr()                                                   # the failed run retried
    assert cli.main(["--summarize", "--out_dir", str(out), "--name", "g"]) == 0
    assert sum("finished" in l for l in capsys.readouterr().out.splitlines()[2:]) == 6


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


# --------------------------------------------------------------------------- --jobs: several runs at once


def test_jobs_run_the_grid_at_once_with_the_runs_of_one_at_a_time_and_report_a_failed_run(tmp_path, capsys,
                                                                                         monkeypatch):
    """--jobs 2: every run once, in its own directory, with the final metrics of the same grid run one at a
    time with the workers' thread count (cpu_count // 2: the same ops in the same order, so the same bits on
    any CPU; another thread count sums in another order); the job logs hold each run's output. A run that
    cannot start (its directory holds another experiment's run) is FAILED in the table and left alone, the
    others finish, exit 1. A grid whose runs have all finished, run again with --jobs 2, skips them without
    starting a worker."""
    grid = ["--quantizer", "vq_ema", "ba_vq", "--name", "g"]
    seq, par = tmp_path / "seq", tmp_path / "par"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        assert cli.main([*TINY, *grid, "--out_dir", str(seq)]) == 0              # one at a time, in this process
    finally:
        torch.set_num_threads(threads)
    (par / "g_vq_k16_s0").mkdir(parents=True)
    (par / "g_vq_k16_s0" / "config.yaml").write_text("lr: 0.05\n")               # another experiment's run
    r = run_cli([*TINY, "--quantizer", "vq_ema", "ba_vq", "vq", "--name", "g", "--out_dir", str(par), "--jobs", "2"],
                cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    names = sorted(p.name for p in seq.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in par.iterdir() if not p.name.startswith(".")) == sorted(names + ["g_vq_k16_s0"])
    for n in names:
        a, b = final_of(seq / n), final_of(par / n)
        assert a["val_code_counts"] == b["val_code_counts"] and a["psnr"] == b["psnr"]
        assert f"{n} finished" in r.stdout
    logs = "".join(vqvae_grid.job_log_path(par, "g", j).read_text() for j in (1, 2))
    assert all("sweep run" in logs and f"-> {par / n}" in logs for n in names)
    table = r.stdout[r.stdout.index("run "):]
    assert all(next(l for l in table.splitlines() if l.startswith(n)).rstrip().endswith("finished") for n in names)
    assert "FAILED" in next(l for l in table.splitlines() if l.startswith("g_vq_k16_s0"))
    assert (par / "g_vq_k16_s0" / "config.yaml").read_text() == "lr: 0.05\n"      # left alone
    r = cli_in_process([*TINY, *grid, "--out_dir", str(seq), "--jobs", "2"], capsys, tmp_path, monkeypatch)
    assert r.returncode == 0 and r.stdout.count("skipped (finished)") == 2 * 2   # its event line and the table
    assert "at a time on one device" not in r.stdout                              # no worker started


def test_jobs_must_be_positive(tmp_path, capsys, monkeypatch):
    r = cli_in_process([*TINY, "--out_dir", str(tmp_path), "--quantizer", "vq_ema", "ba_vq", "--jobs", "0"], capsys,
                       tmp_path, monkeypatch)
    assert r.returncode == 2 and "--jobs 0" in r.stderr


def test_jobs_whose_workers_die_end_with_their_runs_failed_instead_of_waiting(tmp_path):
    """A worker that dies without a word (killed, out of memory, or unable to start) must not leave the grid
    waiting for it: here the script that started the grid is gone when the spawned workers look for it, so
    both die at start-up; the grid ends, exit 1, with both runs FAILED (it used to wait forever)."""
    script = tmp_path / "grid_then_vanish.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "if __name__ == '__main__':\n"
        "    os.remove(__file__)\n"
        f"    sys.exit(train.main({[*TINY, '--out_dir', str(tmp_path / 'g'), '--quantizer', 'vq_ema', 'ba_vq', '--jobs', '2']!r}))\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 1, r.stdout + r.stderr
    table = r.stdout[r.stdout.index("run "):]
    assert sum("FAILED (its job ended)" in l for l in table.splitlines()) == 2
