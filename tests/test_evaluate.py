"""Finished runs can be reloaded and evaluated: load_run rebuilds the run's own architecture,
encode/decode_codes round-trip through the codes, evaluate.py recomputes the final metrics."""
import errno
import json
import os

import pytest
import torch

import evaluate
import train as cli
import vqvae
import vqvae_experiment
from conftest import TINY, shape_kwargs, tiny_config


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_decode_codes_of_encode_is_the_eval_reconstruction(quantizer):
    torch.manual_seed(0)
    model = vqvae.VQVAE(quantizer, codebook_size=32, latent_dim=8, hidden_dim=8, **shape_kwargs(quantizer, 32))
    model.train()
    x = vqvae.to_float(vqvae._fake_images(5, seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = model.encode(x)
    S = model.quantizer.codes_per_position
    stages = (S,) if S > 1 else ()                                                  # residual VQ, OptVQ: (B, S, 8, 8)
    assert idx.shape == (5, *stages, 8, 8) and idx.dtype == torch.long and model.training      # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                                             # no state change
    with torch.no_grad():
        expect = model.eval()(x)[0]
    torch.testing.assert_close(model.decode_codes(idx), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_load_run_rebuilds_a_non_default_run_and_evaluate_recomputes_its_metrics(tmp_path, capsys):
    cfg = tiny_config(quantizer="ba_vq", hidden_dim=12, latent_dim=10, codebook_size=24, epochs=2,
                      out_dir=str(tmp_path), name="run")
    final = vqvae.train(cfg)
    run = tmp_path / "run"
    model, loaded = vqvae.load_run(run)
    assert not model.training and loaded.hidden_dim == 12 and loaded.latent_dim == 10
    assert model.quantizer.num_embeddings == 24
    assert evaluate.main([str(run), "--device", "cpu"]) == 0
    ev = json.loads((run / "eval_metrics.json").read_text())
    for k in ("psnr", "ssim", "perplexity", "usage_rate", "psnr_soft", "mutual_information_bits", "bits_per_image"):
        assert ev[k] == pytest.approx(final[k], rel=1e-6), k
    assert ev["val_code_counts"] == final["val_code_counts"]
    assert (run / "eval_recon.png").is_file() and (run / "eval_usage.png").is_file()
    # an earlier checkpoint gives that epoch's model
    m1, _ = vqvae.load_run(run, run / "checkpoint_epoch1.pt")
    assert not torch.equal(m1.quantizer.codebook, model.quantizer.codebook)


@pytest.mark.slow
def test_evaluate_a_grid_folder_and_clear_errors(tmp_path, capsys):
    for q in ("vq_ema", "fsq"):
        vqvae.train(tiny_config(quantizer=q, out_dir=str(tmp_path), name=q))
    assert evaluate.main([str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "vq_ema" in out and "fsq" in out and "PSNR" in out
    assert all((tmp_path / q / "eval_metrics.json").is_file() for q in ("vq_ema", "fsq"))
    assert evaluate.main([str(tmp_path / "nothing")]) == 2
    assert "No finished run found" in capsys.readouterr().err
    with pytest.raises(vqvae.BavqError, match="not a run directory"):
        vqvae.load_run(tmp_path)


def _numpy_fid(a, b):
    """The reference: pytorch-fid's formula with NumPy / SciPy (scipy.linalg.sqrtm) in float64."""
    import numpy as np
    linalg = pytest.importorskip("scipy.linalg", reason="SciPy (via scikit-image, requirements-dev.txt) is the reference")
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_the_numpy_scipy_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(250, 6, generator=g) * 0.7 + 0.3
    assert vqvae.frechet_distance(a, b) == pytest.approx(_numpy_fid(a, b), rel=1e-8)
    assert vqvae.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_reconstruction_fid_end_to_end_with_a_small_random_feature_network(float64):
    """The rFID pipeline (test images vs their eval-mode reconstructions as uint8, features, Frechet
    distance) with a tiny randomly initialised feature network in place of Inception, against the
    NumPy/SciPy formula on features computed independently (in float64: the pipeline reconstructs in batches of
    32, the reference in one of 90, and a pixel that lies a few float32 ulps from a rounding boundary of uint8
    could round the other way on another CPU)."""
    torch.manual_seed(0)
    feat = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 8 * 8, 5))
    net = lambda u8: feat(u8.to(torch.float64) / 255.0)                                 # noqa: E731
    model = vqvae.VQVAE("vq_ema", codebook_size=16, latent_dim=8, hidden_dim=8).eval()
    images = vqvae._fake_images(90, seed=4)
    ours = vqvae.reconstruction_fid(model, images, net, batch_size=32)
    with torch.no_grad():
        x_recon = model(vqvae.to_float(images))[0]
        recon_u8 = ((x_recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        ref = _numpy_fid(net(images), net(recon_u8))
    assert ours == pytest.approx(ref, rel=1e-6) and ours > 0


def test_a_missing_metric_package_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    """LPIPS / rFID asked for without their packages: one paragraph at the start, nothing written."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torchmetrics", "torch_fidelity") else real(name, *a))
    cfg = tiny_config(out_dir=str(tmp_path), eval_metrics=["psnr", "ssim", "lpips", "fid"])
    with pytest.raises(vqvae.BavqError, match=r"asks for lpips and fid, which need torch-fidelity, torchmetrics "
                                              r"\(not installed\)\. Install them with pip install -r requirements-eval"):
        vqvae.train(cfg)
    assert not (tmp_path / cfg.resolved_name()).exists()                 # nothing written
    with pytest.raises(vqvae.BavqError, match="asks for lpips, which needs torchmetrics"):
        vqvae.train(tiny_config(out_dir=str(tmp_path), eval_metrics=["psnr", "lpips"]))
    # a run that does not ask for them starts, and so does one whose packages are there
    monkeypatch.setattr(importlib.util, "find_spec", real)
    vqvae_experiment.check_metric_packages(["psnr", "ssim"])


def test_metric_weights_that_cannot_load_skip_with_one_line_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    """Packages present but the weights cannot be had (no network): the run still finishes, saying why."""
    def missing(*a, **k):
        raise ImportError("No module named 'torchmetrics'")
    monkeypatch.setattr(vqvae_experiment, "check_metric_packages", lambda names: None)   # as if installed
    monkeypatch.setattr(vqvae_experiment, "reconstruction_lpips", missing)
    monkeypatch.setattr(vqvae_experiment, "inception_features", missing)
    final = vqvae.train(tiny_config(out_dir=str(tmp_path), eval_metrics=["psnr", "ssim", "lpips", "fid"]))
    out = capsys.readouterr().out
    assert "lpips skipped (ImportError" in out and "fid skipped (ImportError" in out
    assert "psnr" in final and "lpips" not in final and "rfid" not in final
    with pytest.raises(vqvae.BavqError, match="eval_metrics"):
        tiny_config(eval_metrics=["psnr", "is"])


def test_lpips_and_inception_weights_load_where_available():
    """The real networks (needs requirements-eval.txt and their weights, downloaded once): LPIPS of an
    image with itself is 0, and Inception gives 2048 features. Skipped, with the reason, otherwise."""
    pytest.importorskip("torchmetrics", reason="requirements-eval.txt is not installed")
    model = vqvae.VQVAE("vq_ema", codebook_size=16, latent_dim=8, hidden_dim=8).eval()
    images = vqvae._fake_images(4, seed=1)
    try:
        lp = vqvae.reconstruction_lpips(model, images)
        net = vqvae.inception_features()
    except Exception as e:          # offline: the weights cannot be downloaded
        pytest.skip(f"LPIPS/Inception weights unavailable ({type(e).__name__}: {str(e)[:100]})")
    assert lp > 0
    assert net(images).shape == (4, 2048)


@pytest.mark.slow
def test_a_checkpoint_is_found_by_name_and_one_of_another_run_is_refused(tmp_path, capsys):
    """evaluate.py / load_run never write one run's evaluation into another run's directory, and a
    checkpoint's evaluation does not overwrite the final model's."""
    a = tiny_config(epochs=2, out_dir=str(tmp_path), name="a")
    b = tiny_config(epochs=2, out_dir=str(tmp_path), name="b", lr=1e-3)          # another run: other settings
    vqvae.train(a)
    vqvae.train(b)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    before = {p.name: p.read_bytes() for p in run_a.iterdir() if p.is_file()}
    assert evaluate.main([str(run_a), "--checkpoint", str(run_b / "checkpoint_epoch1.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not belong to the run in" in err and "written by run" in err and "--resume" not in err
    assert {p.name: p.read_bytes() for p in run_a.iterdir() if p.is_file()} == before   # nothing written
    # by name, in the run directory (not the current folder); written next to its own name
    assert evaluate.main([str(run_a), "--checkpoint", "checkpoint_epoch1.pt", "--device", "cpu"]) == 0
    assert (run_a / "eval_metrics_checkpoint_epoch1.json").is_file() and not (run_a / "eval_metrics.json").exists()
    assert (run_a / "eval_recon_checkpoint_epoch1.png").is_file()
    ev1 = json.loads((run_a / "eval_metrics_checkpoint_epoch1.json").read_text())
    assert ev1["checkpoint"] == "checkpoint_epoch1.pt"
    assert evaluate.main([str(run_a), "--device", "cpu"]) == 0                  # the final model: its own file
    assert json.loads((run_a / "eval_metrics.json").read_text())["psnr"] != ev1["psnr"]
    assert json.loads((run_a / "eval_metrics_checkpoint_epoch1.json").read_text()) == ev1
    # a missing name: the run's checkpoints are listed, and no command-line flag is suggested to Python
    with pytest.raises(vqvae.BavqError, match="found neither in the run directory") as e:
        vqvae.load_run(run_a, checkpoint="checkpoint_epoch7.pt")
    assert "checkpoint_epoch1.pt, checkpoint_epoch2.pt" in str(e.value) and "--resume" not in str(e.value)


def test_evaluate_refuses_an_unknown_device_in_one_paragraph(tmp_path, capsys):
    assert evaluate.main([str(tmp_path), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "--device 'gpu' is unknown" in err and "cuda:N" in err


def test_a_run_trained_with_fp16_evaluates_on_the_cpu_in_float32(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="h", epochs=1)
    vqvae.train(cfg)
    run = tmp_path / "h"
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("amp: auto", "amp: fp16"))      # as written on a GPU
    m = vqvae.evaluate_run(run, device="cpu")
    assert abs(m["psnr"] - json.loads((run / "final_metrics.json").read_text())["psnr"]) < 1e-4


@pytest.mark.slow
def test_evaluate_computes_the_rate_distortion_analysis_on_request_and_refuses_residual_vq(tmp_path, capsys):
    """--rate_distortion: rate_distortion.json (the library's analysis of the run's latents on the test set, with
    the flags' settings) and its plot; the printed line gives the gaps. Residual VQ is refused in one paragraph
    before anything is written; a bad flag value likewise."""
    for q in ("ba_vq", "rvq"):
        vqvae.train(tiny_config(quantizer=q, out_dir=str(tmp_path), name=q, checkpoint_every=0))
    run = tmp_path / "ba_vq"
    assert evaluate.main([str(run), "--device", "cpu", "--rate_distortion", "--rd_positions", "900",
                          "--rd_alphabet", "64", "--rd_seed", "3"]) == 0
    text = (run / "rate_distortion.json").read_text()
    assert "Infinity" not in text and "NaN" not in text                           # strict JSON
    rd = json.loads(text)
    pts = rd["curves"]["codebook"]
    assert pts[-1]["beta"] is None and vqvae.curve_rate_at(pts, pts[-1]["distortion"])["rate_bits"] == pts[-1]["rate_bits"]
    model, cfg = vqvae.load_run(run)
    _, val_u8 = vqvae.load_dataset(cfg)
    again = vqvae.latent_rate_distortion(model, val_u8, positions=900, alphabet_size=64, seed=3)
    assert rd["positions"] == 900 and rd["alphabet_size"] == 32 + 64 and rd["seed"] == 3
    for name in ("codebook", "kmeans", "gaussian"):
        assert rd["gaps"][name] == pytest.approx(again["gaps"][name], rel=1e-9), name
    assert rd["run"] == pytest.approx(again["run"], rel=1e-9)
    assert (run / "rate_distortion.png").is_file()
    out = capsys.readouterr().out
    assert f"codebook {rd['gaps']['codebook']['rate_bits']:+.3f}" in out and "rate_distortion.json" in out
    before = sorted(p.name for p in (tmp_path / "rvq").iterdir())
    assert evaluate.main([str(tmp_path / "rvq"), "--device", "cpu", "--rate_distortion"]) == 2
    err = capsys.readouterr().err
    assert "sum of one code per stage" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "rvq").iterdir()) == before          # nothing written
    assert evaluate.main([str(run), "--rate_distortion", "--rd_repeats", "0"]) == 2
    assert "--rd_repeats 0" in capsys.readouterr().err


def test_a_write_that_fails_tells_evaluation_and_grid_users_what_to_run_again(tmp_path, capsys, monkeypatch):
    """A full disk while evaluate.py or a grid writes its own file: the one-paragraph error says to evaluate (or run
    the grid) again, not to resume a training run, and the earlier files are intact."""
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="r"))
    run = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    real_replace = os.replace

    def full_disk(src, dst):
        if "eval_" in str(dst) or ".grid_" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(vqvae_experiment.os, "replace", full_disk)
    assert evaluate.main([str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "evaluate again" in err and "--resume" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before      # nothing half-written
    assert cli.main([*TINY, "--out_dir", str(tmp_path / "g"), "--quantizer", "vq_ema", "ba_vq"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again" in err and "--resume" not in err


def test_weights_that_do_not_fit_the_runs_model_are_one_paragraph_that_names_both_files(tmp_path):
    """A run whose config.yaml no longer describes its weights (edited, or another bavq version): load_run says
    which weights and which config disagree, what the run was written by, and what to do; nothing is written."""
    from conftest import one_paragraph
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=1, checkpoint_every=0)
    vqvae.train(cfg)
    run = tmp_path / "r"
    text = (run / "config.yaml").read_text()
    assert "latent_dim: 16" in text
    (run / "config.yaml").write_text(text.replace("latent_dim: 16", "latent_dim: 12"))
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(vqvae.BavqError) as e:
        vqvae_experiment.load_run(run)
    msg = str(e.value)
    one_paragraph(msg)
    assert f"'{run / 'final_model.pt'}' do not fit the model that '{run / 'config.yaml'}' describes" in msg
    assert "bavq code: " not in msg and "git " in msg and "restore its config.yaml" in msg
    assert sorted(p.name for p in run.iterdir()) == before
