"""The run lock (RunClaim): one process per run directory (train, resume, sweep member), a second one refused
naming the holder, and the claims of dead processes taken over."""
import json
import os
import subprocess
import sys
import time

import pytest

import vqvae
import vqvae_experiment
from conftest import ROOT, tiny_config


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with vqvae.RunClaim(run) as first:
        with pytest.raises(vqvae.BavqError) as e:
            vqvae.RunClaim(run).__enter__()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and first.info["host"] in msg and first.info["started"] in msg
        assert "Nothing was changed" in msg
        # train() and a resume of the same directory are refused the same way, before touching anything
        with pytest.raises(vqvae.BavqError, match="in use by another bavq process"):
            vqvae.train(tiny_config(out_dir=str(tmp_path), name="run"))
    assert not (run / vqvae.CLAIM_FILE).exists() and not run.exists()   # released; the empty folder removed


def _write_claim(path, **info):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "h", "pid": 1, "boot_id": vqvae_experiment._boot_id(), "started": "then",
                                "token": "old", **info}))


def test_the_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    claim = tmp_path / "run" / vqvae.CLAIM_FILE
    _write_claim(claim, host=vqvae.socket.gethostname(), pid=pid)
    with vqvae.RunClaim(tmp_path / "run") as c:
        assert json.loads(claim.read_text())["token"] == c.info["token"]
    # the same pid alive but from before a reboot (another boot id) is stale too
    _write_claim(claim, host=vqvae.socket.gethostname(), pid=os.getpid(), boot_id="another-boot")
    with vqvae.RunClaim(tmp_path / "run") as c:
        assert json.loads(claim.read_text())["token"] == c.info["token"]


def test_a_claim_from_another_host_is_taken_over_only_when_it_stopped_refreshing(tmp_path):
    claim = tmp_path / "run" / vqvae.CLAIM_FILE
    _write_claim(claim, host="other-host", pid=os.getpid())
    with pytest.raises(vqvae.BavqError, match="host other-host"):
        vqvae.RunClaim(tmp_path / "run").__enter__()                    # refreshed just now: alive
    old = time.time() - vqvae.CLAIM_STALE_S - 5
    os.utime(claim, (old, old))
    with vqvae.RunClaim(tmp_path / "run") as c:
        assert json.loads(claim.read_text())["token"] == c.info["token"]


@pytest.mark.slow
def test_two_runs_started_together_on_one_directory(tmp_path):
    """Two train.py --name X at once (different quantizers): one trains, the other stops with the
    one-paragraph refusal, and the run's files are all the first one's."""
    common = ["--dataset", "fake", "--train_subset", "512", "--val_subset", "64", "--hidden_dim", "16",
              "--latent_dim", "16", "--codebook_size", "32", "--batch_size", "32", "--epochs", "3",
              "--no_wandb", "--no_progress", "--device", "cpu", "--out_dir", str(tmp_path), "--name", "X"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    a = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--quantizer", "ba_vq", *common],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    claim = tmp_path / "X" / vqvae.CLAIM_FILE
    t0 = time.time()
    while not claim.exists() and time.time() - t0 < 60 and a.poll() is None:
        time.sleep(0.05)
    b = subprocess.run([sys.executable, str(ROOT / "train.py"), "--quantizer", "vq_ema", *common],
                       capture_output=True, text=True, env=env, timeout=120)
    a.communicate(timeout=300)
    assert a.returncode == 0
    assert b.returncode == 2 and "in use by another bavq process" in b.stderr and "Traceback" not in b.stderr
    assert "ba_vq" in (tmp_path / "X" / "config.yaml").read_text()
    history = [json.loads(l) for l in (tmp_path / "X" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert "train/entropy_loss" in history[0]                           # ba_vq's, not vq_ema's
    assert not claim.exists()


@pytest.mark.slow
def test_a_resume_while_the_run_still_trains_is_refused_naming_the_holder(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=2)
    vqvae.train(cfg)
    (tmp_path / "r" / "final_metrics.json").unlink()
    with vqvae.RunClaim(tmp_path / "r"):                  # as if the first process were still training
        with pytest.raises(vqvae.BavqError, match=f"pid {os.getpid()}"):
            vqvae.train(vqvae.resume_config(tmp_path / "r", {"overwrite": True}))
