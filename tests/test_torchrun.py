"""One run over several processes (torchrun, gloo on the CPU, 2 processes, a tiny model): every process
ends with the same weights, codebooks and buffers; the run equals a 1-process run with the same
global batch for every quantizer (with k-means init and dead-code restarts where they apply); files are
written once; it resumes at another world size; a crash on one process ends the job."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vqvae
from conftest import ROOT

pytestmark = pytest.mark.slow

BASE = dict(dataset="fake", train_subset=100, val_subset=40, hidden_dim=8, latent_dim=8, codebook_size=16,
            batch_size=32, val_batch_size=16, epochs=2, wandb=False, progress=False, device="cpu",
            checkpoint_every=1, lr=2e-3)        # 100 = 3 x 32 + 4: the last batch splits 2 + 2; 40 = 2 x 16 + 8
REMEDIES = dict(init="kmeans", dead_code_threshold=1.0, dead_code_every=2, kmeans_batches=2)
CASES = {"vq_ema": REMEDIES, "vq": {**REMEDIES, "cvq": True}, "ba_vq": REMEDIES, "fsq": {"fsq_levels": [4, 4]},
         "simvq": {}, "sq_vae": {}, "lfq": {}, "rvq": {"rvq_stages": 2}}


def torchrun(configs, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), *[json.dumps(c) for c in configs]]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_equal_one_process_for_every_quantizer(tmp_path):
    configs = [{**BASE, "quantizer": q, "name": q, "out_dir": str(tmp_path / "two"), **extra} for q, extra in CASES.items()]
    r = torchrun(configs, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for c in configs:
        q = c["quantizer"]
        one = vqvae.train(vqvae.make_config({**c, "out_dir": str(tmp_path / "one")}))
        a = torch.load(tmp_path / "two" / f"{q}.rank0.pt")
        b = torch.load(tmp_path / "two" / f"{q}.rank1.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), q                # identical on every process
        ref = torch.load(tmp_path / "one" / q / "final_model.pt")
        # to float tolerance: the encoder's arithmetic on 2 blocks differs from 1 in the last bits, and Adam
        # turns such differences of near-zero gradient components into fractions of a step (lr = 2e-3;
        # measured up to 6e-4, LFQ, whose entropy logits are 200 <h, c>)
        worst = max(float((a[k].float() - ref[k].float()).abs().max()) for k in a)
        assert worst < 1e-3, (q, worst)
        two = json.loads((tmp_path / "two" / f"{q}.rank0.json").read_text())
        assert two == json.loads((tmp_path / "two" / f"{q}.rank1.json").read_text())
        # the same codes, up to near-ties (the encoder's arithmetic on 2 blocks differs from 1 in the last bits)
        flips = sum(abs(x - y) for x, y in zip(two["val_code_counts"], one["val_code_counts"]))
        assert flips <= 0.005 * sum(one["val_code_counts"]), (q, flips)
        for k in ("psnr", "ssim", "loss", "recon_loss"):
            assert two[k] == pytest.approx(one[k], rel=1e-3, abs=1e-5), (q, k)
        for k in ("perplexity", "usage_rate"):                            # follow the codes
            assert two[k] == pytest.approx(one[k], rel=1e-2), (q, k)
        run = tmp_path / "two" / q                                       # written once, by process 0
        history = (run / "history.jsonl").read_text().splitlines()
        assert [json.loads(l)["epoch"] for l in history] == [1, 2]
        assert r.stdout.count(f"run '{q}'") == 1
    assert not list(Path("/tmp").glob("bavq_rank*"))                      # the scratch directories are gone


def test_a_two_process_run_resumes_as_one_process_and_as_two(tmp_path):
    cfg = {**BASE, "quantizer": "ba_vq", "epochs": 3, "out_dir": str(tmp_path), **REMEDIES}
    r = torchrun([{**cfg, "name": "ref"}, {**cfg, "name": "cut"}], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "ref" / "final_metrics.json").read_text())
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (tmp_path / "cut" / p).unlink()
    one = vqvae.train(vqvae.resume_config(tmp_path / "cut", {"overwrite": True}))   # as 1 process
    assert one["psnr"] == pytest.approx(ref["psnr"], rel=1e-4) and one["val_code_counts"] == ref["val_code_counts"]
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (tmp_path / "cut" / p).unlink()
    r = torchrun([{"resume": str(tmp_path / "cut"), "overwrite": True, "wandb": False, "progress": False}], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "cut" / "final_metrics.json").read_text())
    assert two["psnr"] == pytest.approx(ref["psnr"], rel=1e-4)


def test_a_crash_on_one_process_ends_the_job_and_a_bad_batch_size_is_refused(tmp_path):
    t0 = time.time()
    r = torchrun([{**BASE, "quantizer": "vq_ema", "name": "x", "out_dir": str(tmp_path), "epochs": 50}], tmp_path,
                 env_extra={"BAVQ_TEST_FAIL_RANK": "1"}, timeout=300)
    assert r.returncode != 0 and "simulated crash on process 1" in r.stdout + r.stderr
    assert time.time() - t0 < 120                                          # bounded, not a hang
    r = torchrun([{**BASE, "quantizer": "vq_ema", "name": "y", "out_dir": str(tmp_path), "batch_size": 33}], tmp_path)
    assert r.returncode != 0 and "must divide" in r.stdout + r.stderr
    assert not (tmp_path / "y").exists()


def test_a_stop_request_on_one_process_stops_all_at_the_same_step_and_saves_once(tmp_path):
    """Process 1 alone is asked to stop before its 5th batch; the processes agree at every second poll
    (progress_every 2), so both stop before the 6th batch (step 5: epoch 2, batch 1), process 0 saves
    checkpoint_interrupted.pt, and the run resumed as one process ends as the uninterrupted run."""
    cfg = {**BASE, "quantizer": "vq", "epochs": 3, "progress_every": 2, "out_dir": str(tmp_path), "name": "cut"}
    r = torchrun([cfg], tmp_path, env_extra={"BAVQ_TEST_STOP_RANK": "1"})
    assert r.returncode != 0 and "--resume" in r.stdout + r.stderr
    ck = vqvae.load_checkpoint(tmp_path / "cut" / "checkpoint_interrupted.pt")
    assert ck["step"] == 5 and ck["epoch"] == 1 and ck["partial_epoch"]["batch"] == 1   # 4 batches per epoch
    resumed = vqvae.train(vqvae.resume_config(tmp_path / "cut"))
    ref = vqvae.train(vqvae.make_config({**cfg, "name": "ref"}))
    assert resumed["psnr"] == pytest.approx(ref["psnr"], rel=1e-3)
    assert not list(Path("/tmp").glob("bavq_rank*"))
