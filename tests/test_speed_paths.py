"""The fast path (device-resident data batched by index, fused Blahut-Arimoto, channels_last) and
the plain path (DataLoader, autograd through every BA iteration, contiguous NCHW) compute the same
thing: a few float32 steps on the CPU give the same losses and the same code indices. (bf16 autocast,
the fused CUDA AdamW and torch.compile are GPU-side and not covered here.)"""
import pytest
import torch

import vqvae
from conftest import tiny_config


def run_steps(cfg, n_images=192, channels_last=False):
    train_u8, _ = vqvae.load_dataset(cfg)
    rt = vqvae.Runtime(torch.device("cpu"), channels_last=channels_last)
    model, opt = vqvae.setup_model(cfg, torch.device("cpu"), rt)
    seen = []
    orig = model.quantizer.forward

    def spy(z):
        out = orig(z)
        seen.append(out[2]["code_indices"].clone())
        return out
    model.quantizer.forward = spy
    g = torch.Generator().manual_seed(cfg.seed)
    metrics = []
    step = 0
    for _ in range(2):                                          # 2 epochs x 3 steps
        m, step = vqvae.train_epoch(model, opt, train_u8[:n_images], cfg, g, step, 6, rt=rt)
        metrics.append(m)
    return metrics, seen, model


@pytest.mark.parametrize("quantizer", ["vq_ema", "vq", "ba_vq", "fsq"])
def test_fast_and_plain_paths_agree(quantizer):
    fast = tiny_config(quantizer=quantizer, data_path="device", ba_impl="fused")
    plain = tiny_config(quantizer=quantizer, data_path="loader", ba_impl="autograd", num_workers=0)
    m_fast, idx_fast, model_fast = run_steps(fast, channels_last=True)      # NHWC convolutions too
    assert model_fast.encoder.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    m_plain, idx_plain, model_plain = run_steps(plain)
    assert len(idx_fast) == len(idx_plain) == 6
    for a, b in zip(idx_fast, idx_plain):
        assert torch.equal(a, b)
    for a, b in zip(m_fast, m_plain):
        for k in ("loss", "recon_loss", *vqvae._LOSS_KEYS[quantizer], "grad_norm", "perplexity"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    for (n, p), (_, q) in zip(model_fast.state_dict().items(), model_plain.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_validation_batch_size_default():
    assert vqvae.default_val_batch_size(tiny_config(quantizer="ba_vq", batch_size=64)) == 64
    assert vqvae.default_val_batch_size(tiny_config(quantizer="vq_ema", batch_size=64)) == 1024
    assert vqvae.default_val_batch_size(tiny_config(quantizer="vq_ema", val_batch_size=50)) == 50


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_bf16_autocast_trains_and_keeps_quantizer_maths_in_float32(quantizer):
    """--amp bf16 (here on the CPU): the network runs in bf16, the quantizer's buffers and losses stay
    float32 and training still lowers the loss."""
    cfg = tiny_config(quantizer=quantizer, amp="bf16")
    rt = vqvae.make_runtime(cfg, torch.device("cpu"))
    assert rt.amp_dtype == torch.bfloat16
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    with rt.autocast():
        z = model.encoder(vqvae.to_float(train_u8[:4]))
        assert z.dtype == torch.bfloat16
        _, losses, _ = model.quantizer(z)
    assert all(v.dtype == torch.float32 for v in losses.values())
    g = torch.Generator().manual_seed(0)
    first, step = vqvae.train_epoch(model, opt, train_u8, cfg, g, 0, 8, rt=rt)
    last, _ = vqvae.train_epoch(model, opt, train_u8, cfg, g, step, 8, rt=rt)
    assert last["recon_loss"] < first["recon_loss"]
    for b in model.quantizer.buffers():
        assert b.dtype in (torch.float32, torch.long)
    m = vqvae.validate(model, val_u8, 64, rt=rt)
    assert 0 < m["psnr"] < 100


def test_fp16_needs_cuda():
    with pytest.raises(vqvae.BavqError, match="fp16 needs a CUDA GPU"):
        vqvae.make_runtime(tiny_config(amp="fp16"), torch.device("cpu"))
    assert vqvae.make_runtime(tiny_config(), torch.device("cpu")).amp_dtype is None   # auto = off on CPU


def test_benchmark_runs_on_cpu_and_writes_its_table(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--device", "cpu", "--dataset", "fake",
                        "--train_images", "128", "--val_images", "64", "--hidden_dim", "8", "--latent_dim", "8",
                        "--codebook_sizes", "16", "32", "--batch_size", "64", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    assert "train s/epoch" in r.stdout and "val s/pass" in r.stdout and "img/s" in r.stdout
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu")
    rows = res["results"]
    assert [(x["quantizer"], x["K"]) for x in rows] == [("vq_ema", 16), ("vq_ema", 32), ("ba_vq", 16), ("ba_vq", 32)]
    for x in rows:
        assert x["train_images"] == 128 and x["val_images"] == 64
        assert x["train_s_per_epoch"] > 0 and x["val_s_per_pass"] > 0 and x["peak_memory_mb"] > 0
        assert x["train_images_per_s"] == pytest.approx(128 / x["train_s_per_epoch"])
