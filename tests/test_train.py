"""Specification of the training entry points: outputs, reproducibility, data sources, W&B fallback."""
import json
import os
import subprocess
import sys
import tarfile
import urllib.error

import numpy as np
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import vqvae
from conftest import ROOT, SHARED_DATA, record_code_indices, tiny_config

FINAL_KEYS = {"loss", "recon_loss", "perplexity", "usage_rate", "psnr", "dead_codes"}
BA_FINAL_KEYS = {"entropy_loss", "beta", "codebook_loss", "psnr_soft"}
HISTORY_KEYS = {"epoch", "train/loss", "train/recon_loss", "train/perplexity", "train/grad_norm",
                "train/grad_norm_max", "train/dead_code_restarts", "train/dead_codes", "train/usage_rate",
                "val/loss", "val/recon_loss", "val/psnr", "val/perplexity", "val/usage_rate", "val/dead_codes"}


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_cli_one_epoch_writes_every_output(tmp_path, quantizer):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--quantizer", quantizer, "--dataset", "fake",
         "--train_subset", "128", "--val_subset", "64", "--hidden_dim", "8", "--latent_dim", "8",
         "--codebook_size", "16", "--batch_size", "32", "--epochs", "2", "--checkpoint_every", "1",
         "--name", "run", "--out_dir", str(tmp_path / "exp"), "--no_wandb", "--no_progress", "--device", "cpu",
         *(["--fsq_levels", "4", "4"] if quantizer == "fsq" else [])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "Epoch 2/2" in r.stdout and "PSNR" in r.stdout and "Perplexity" in r.stdout and "Usage" in r.stdout
    run = tmp_path / "exp" / "run"
    assert {p.name for p in run.iterdir()} >= {"final_model.pt", "final_metrics.json", "history.jsonl",
                                                "config.yaml", "checkpoint_epoch1.pt", "checkpoint_epoch2.pt"}
    final = json.loads((run / "final_metrics.json").read_text())
    expected = FINAL_KEYS | set(vqvae.QUANTIZERS[quantizer].loss_names) | (BA_FINAL_KEYS if quantizer == "ba_vq" else set())
    assert expected <= set(final)
    assert all(np.isfinite(final[k]) for k in expected)
    assert 1.0 <= final["perplexity"] <= 16 and 0 < final["usage_rate"] <= 1
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


# --------------------------------------------------------------------------- data sources


def test_fake_data_is_deterministic_uint8():
    a, _ = vqvae.load_dataset(tiny_config())
    b, _ = vqvae.load_dataset(tiny_config())
    assert a.dtype == torch.uint8 and a.shape == (256, 3, 32, 32) and torch.equal(a, b)
    x = vqvae.to_float(a)
    assert x.min() >= -1 and x.max() <= 1
    assert vqvae.to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def _write_folder(root, split, n_per_class, size):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_dataset_resizes_and_accepts_val(tmp_path):
    _write_folder(tmp_path, "train", 3, 40)
    _write_folder(tmp_path, "val", 2, 32)
    cfg = tiny_config(dataset="folder", data_dir=str(tmp_path), num_workers=0, train_subset=0, val_subset=0)
    tr, va = vqvae.load_dataset(cfg)
    assert tr.shape == (6, 3, 32, 32) and va.shape == (4, 3, 32, 32) and tr.dtype == torch.uint8
    # val images are 32x32 already: stored exactly
    first = np.array(Image.open(tmp_path / "val" / "cat" / "0.png"))
    assert torch.equal(va[0], torch.from_numpy(first).permute(2, 0, 1))
    # a full split is cached next to the data and reused
    assert list(tmp_path.glob(".bavq_train_*.pt"))
    tr2, _ = vqvae.load_dataset(cfg)
    assert torch.equal(tr, tr2)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(vqvae.BavqError, match="does not exist"):
        vqvae.load_dataset(tiny_config(dataset="folder", data_dir=str(tmp_path / "nope")))
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(vqvae.BavqError, match="No images found"):
        vqvae.load_dataset(tiny_config(dataset="folder", data_dir=str(tmp_path), num_workers=0))


def test_cifar10_without_network_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.load_dataset(tiny_config(dataset="cifar10", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "--dataset folder" in msg and "download" in msg and "\n" not in msg
    assert "shared/data" not in msg                                    # no path of this project's own setup

    def offline_after_mkdir(root, **k):                                 # what torchvision does: folder first
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("timed out")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline_after_mkdir)
    with pytest.raises(vqvae.BavqError):
        vqvae.load_dataset(tiny_config(dataset="cifar10", data_dir=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()                            # nothing left behind


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


def test_no_wandb_never_imports_wandb(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)       # any import of wandb would raise
    vqvae.train(tiny_cfg(name="nowb", wandb=False))


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
