"""One run over several processes (torchrun, gloo on the CPU, 2 processes, a tiny model) is the 1-process run:
one float64 training step gives the same gradients, weights and buffers to 1e-12 for every quantizer and every
remedy that keeps state; a short end-to-end run ends identically on every process, with the 1-process
metrics, writing its files once; it resumes at another world size; a crash on one process ends the job."""
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
from ddp_step import float64_step

BASE = dict(dataset="fake", train_subset=100, val_subset=40, hidden_dim=8, latent_dim=8, codebook_size=16,
            batch_size=32, val_batch_size=16, epochs=2, wandb=False, progress=False, device="cpu",
            checkpoint_every=1, lr=2e-3)        # 100 = 3 x 32 + 4: the last batch splits 2 + 2; 40 = 2 x 16 + 8
REMEDIES = dict(init="kmeans", dead_code_threshold=1.0, dead_code_every=2, kmeans_batches=2)
CASES = {"vq_ema": REMEDIES, "vq": {**REMEDIES, "cvq": True}, "ba_vq": REMEDIES, "fsq": {"fsq_levels": [4, 4]},
         "simvq": {}, "sq_vae": {}, "lfq": {}, "rvq": {"rvq_stages": 2}, "ibq": {}}
# One step of every quantizer and of every remedy that keeps state (EMA counts and sums, k-means init, restarts,
# BA's running marginal and mean distance, its soft EMA codebook, CVQ's usage, the affine map's statistics and
# parameters, the synchronized update, the alternating step's momentum); batch 30 splits 15 + 15.
STEP = dict(dataset="fake", train_subset=64, val_subset=16, hidden_dim=8, latent_dim=8, codebook_size=16,
            batch_size=30, epochs=1, wandb=False, progress=False, device="cpu", lr=2e-3)
STATEFUL = dict(init="kmeans", dead_code_threshold=1.0, dead_code_every=1, kmeans_batches=1)
STEP_CASES = {
    "vq_ema": dict(quantizer="vq_ema", **STATEFUL),
    "vq_ema_copy": dict(quantizer="vq_ema", ema_smoothing="copy", ema_init_count=1.0, init="data", kmeans_batches=1),
    "vq_cvq": dict(quantizer="vq", cvq=True, **STATEFUL),
    "vq_affine_ema_alternate": dict(quantizer="vq", affine_reparam="ema", alternate_lr=0.1),
    "vq_affine_learned_sync": dict(quantizer="vq", affine_reparam="learned", sync_nu=0.5, gradient_estimator="rotation"),
    "ba_vq": dict(quantizer="ba_vq", **STATEFUL),
    "ba_vq_soft_ema": dict(quantizer="ba_vq", ba_codebook_update="ema", ba_prior="ema", ba_temperature="relative",
                           ba_decoder_input="hard", ba_codebook_loss="expected", **STATEFUL),
    "ba_vq_cvq_autograd": dict(quantizer="ba_vq", cvq=True, ba_impl="autograd", affine_reparam="learned"),
    "fsq": dict(quantizer="fsq", fsq_levels=[4, 4]),
    "simvq": dict(quantizer="simvq"),
    "sq_vae": dict(quantizer="sq_vae"),
    "lfq": dict(quantizer="lfq"),
    "rvq": dict(quantizer="rvq", rvq_stages=2),
    "ibq": dict(quantizer="ibq", **STATEFUL),
    "ecvq": dict(quantizer="ecvq", ecvq_lambda=0.5, **STATEFUL),
}


F64 = {"BAVQ_TEST_FLOAT64": "1"}          # the workers in float64 (tests/ddp_worker.py)
E2E = ("vq_ema", "ba_vq")                 # the end-to-end runs: the flagship pair with remedies
CUT = {**BASE, "quantizer": "ba_vq", "epochs": 3, **REMEDIES}    # trained by 1 process, resumed by 2
STOP = {**BASE, "quantizer": "vq", "epochs": 3, "progress_every": 2, "name": "cut"}


def torchrun(configs, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), *[json.dumps(c) for c in configs]]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One torchrun launch (2 processes, float64) for every test below, since each launch costs seconds of
    start-up: the float64 steps, the end-to-end runs, the resume as 2 processes of a run that 1 process wrote
    and cut short, a run that process 1 alone is asked to stop, and last a run that crashes on process 1
    (which ends the job). Returns (the finished launch, its wall-clock seconds, its folder)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)                  # the 1-process run to be resumed, as the workers run
    try:
        for name in ("ref", "cut"):
            vqvae.train(vqvae.make_config({**CUT, "name": name, "out_dir": str(tmp / "resume")}))
    finally:
        torch.set_default_dtype(before)
    cut = tmp / "resume" / "cut"
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (cut / p).unlink()
    (tmp / "step").mkdir()
    configs = [{**STEP, **extra, "name": name, "_step_out": str(tmp / "step")} for name, extra in STEP_CASES.items()]
    configs += [{**BASE, "quantizer": q, "name": q, "out_dir": str(tmp / "two"), **CASES[q]} for q in E2E]
    configs += [{"resume": str(cut), "overwrite": True, "wandb": False, "progress": False}]
    configs += [{**STOP, "out_dir": str(tmp / "stop"), "_stop_rank": 1}]
    configs += [{**BASE, "quantizer": "vq_ema", "name": "x", "out_dir": str(tmp / "crash"), "epochs": 50,
                 "_fail_rank": 1}]
    t0 = time.time()
    r = torchrun(configs, tmp, F64)
    return r, time.time() - t0, tmp


def test_one_float64_step_on_two_processes_is_the_one_process_step(launch, float64):
    """Gradients after the all-reduce, and weights and buffers after the step, equal the 1-process step to
    1e-12 (measured: at most 3e-15) for every quantizer and stateful remedy; the processes agree exactly."""
    r, _, tmp = launch
    for name, extra in STEP_CASES.items():
        c = {**STEP, **extra, "name": name}
        assert (tmp / "step" / f"{name}.rank1.pt").exists(), r.stdout[-3000:] + r.stderr[-3000:]
        ref = float64_step(vqvae.make_config(c).validate())
        two = [torch.load(tmp / "step" / f"{name}.rank{rank}.pt") for rank in (0, 1)]
        for k in ref["state"]:
            assert torch.equal(two[0]["state"][k], two[1]["state"][k]), (name, k)   # every process alike
        assert set(two[0]["grads"]) == set(ref["grads"])
        for k, g in ref["grads"].items():
            assert g.dtype == torch.float64 and two[0]["grads"][k].dtype == torch.float64
            err = float((two[0]["grads"][k] - g).abs().max())
            assert err <= 1e-12 * max(float(g.abs().max()), 1.0), (name, k, err)
        for k, v in ref["state"].items():
            if v.is_floating_point():
                err = float((two[0]["state"][k].double() - v.double()).abs().max())
                assert err <= 1e-12 * max(float(v.abs().max()), 1.0), (name, k, err)
            else:
                assert torch.equal(two[0]["state"][k], v), (name, k)


@pytest.mark.slow
def test_a_short_two_process_run_ends_alike_everywhere_with_the_one_process_metrics_and_resumes_anyhow(
        launch, float64):
    """End to end (train, validate, checkpoints, files), for the flagship pair with remedies, in float64
    (BAVQ_TEST_FLOAT64; the 1-process runs under the ``float64`` fixture). Every process ends bit-identical,
    and against the 1-process run every validation code is the same and the metrics agree to 1e-6 (they are
    summed in float32): the encoder's arithmetic on 2 blocks differs from 1 in the last bits, and in float32
    8 Adam steps turned that into up to 2 of 2,560 codes flipped here and weights moved 10x further on another
    CPU; in float64 those differences stay near 1e-13, on any CPU.
    Resumes at another world size: a 3-epoch BA-VQ run that 1 process wrote (ref, and cut with its last epochs
    deleted) resumed as 2 processes ends as ref; the 2-process BA-VQ run, its last epoch deleted, resumed as
    1 process ends as the 1-process run: the same codes, the same PSNR to 1e-6."""
    r, _, tmp = launch
    for q in E2E:
        c = {**BASE, "quantizer": q, "name": q, "out_dir": str(tmp / "two"), **CASES[q]}
        assert (tmp / "two" / f"{q}.rank1.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
        one = vqvae.train(vqvae.make_config({**c, "out_dir": str(tmp / "one")}))
        a = torch.load(tmp / "two" / f"{q}.rank0.pt")
        b = torch.load(tmp / "two" / f"{q}.rank1.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), q                # identical on every process
        two = json.loads((tmp / "two" / f"{q}.rank0.json").read_text())
        assert two == json.loads((tmp / "two" / f"{q}.rank1.json").read_text())
        assert two["val_code_counts"] == one["val_code_counts"], q
        for k in ("psnr", "ssim", "loss", "recon_loss"):
            assert two[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9), (q, k)
        run = tmp / "two" / q                                            # written once, by process 0
        history = (run / "history.jsonl").read_text().splitlines()
        assert [json.loads(l)["epoch"] for l in history] == [1, 2]
        assert r.stdout.count(f"run '{q}'") == 1
    assert not list(Path("/tmp").glob("bavq_rank*"))                      # the scratch directories are gone
    ref = json.loads((tmp / "resume" / "ref" / "final_metrics.json").read_text())
    two = json.loads((tmp / "resume" / "cut" / "final_metrics.json").read_text())    # resumed as 2 processes
    assert two["psnr"] == pytest.approx(ref["psnr"], rel=1e-6) and two["val_code_counts"] == ref["val_code_counts"]
    run = tmp / "two" / "ba_vq"                                          # written by 2, resumed as 1
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt"):
        (run / p).unlink()
    resumed = vqvae.train(vqvae.resume_config(run, {"overwrite": True}))
    assert resumed["psnr"] == pytest.approx(one["psnr"], rel=1e-6) and resumed["val_code_counts"] == one["val_code_counts"]


@pytest.mark.slow
def test_a_crash_on_one_process_ends_the_job(launch):
    r, seconds, tmp = launch
    assert r.returncode != 0 and "simulated crash on process 1" in r.stdout + r.stderr
    assert seconds < 180                                                  # bounded, not a hang
    assert not (tmp / "crash" / "x" / "final_metrics.json").exists()


def test_a_global_batch_that_the_processes_cannot_share_is_refused_before_anything(tmp_path, monkeypatch):
    """The check runs before the process group is joined: as process 0 of 2, in this process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = vqvae.make_config({**BASE, "quantizer": "vq_ema", "name": "y", "out_dir": str(tmp_path), "batch_size": 33})
    with pytest.raises(vqvae.BavqError, match="must divide"):
        vqvae.train(cfg)
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_a_stop_request_on_one_process_stops_all_at_the_same_step_and_saves_once(launch, float64):
    """Process 1 alone is asked to stop before its 5th batch; the processes agree at every second poll
    (progress_every 2), so both stop before the 6th batch (step 5: epoch 2, batch 1), process 0 saves
    checkpoint_interrupted.pt, and the run resumed as one process ends as the uninterrupted run (in float64,
    as above: the same codes, the same PSNR to 1e-6)."""
    r, _, tmp = launch
    out = r.stdout + r.stderr
    assert out.count("[process 0] ") == 1 and out.count("[process 1] ") == 1 and "--resume" in out
    ck = vqvae.load_checkpoint(tmp / "stop" / "cut" / "checkpoint_interrupted.pt")
    assert ck["step"] == 5 and ck["epoch"] == 1 and ck["partial_epoch"]["batch"] == 1   # 4 batches per epoch
    resumed = vqvae.train(vqvae.resume_config(tmp / "stop" / "cut"))
    ref = vqvae.train(vqvae.make_config({**STOP, "out_dir": str(tmp / "stop"), "name": "ref"}))
    assert resumed["psnr"] == pytest.approx(ref["psnr"], rel=1e-6) and resumed["val_code_counts"] == ref["val_code_counts"]
    assert not list(Path("/tmp").glob("bavq_rank*"))
