"""The CUDA tier: the GPU-only paths, run where a CUDA GPU is present and skipped (with the reason
shown) everywhere else.

`bash gpu_check.sh` runs these together with the benchmark and a short
real-data run. What is checked here (one NVIDIA GPU):

- one training step of every quantizer under the CUDA runtime (bf16 autocast, channels_last, fused
  AdamW, cuDNN autotuning): finite losses, gradients and weights;
- the quantizers keep their maths in float32 under autocast: the same latents give the same codes
  with and without bf16 autocast, exactly; and the whole bf16 model picks the float32 model's codes
  except at near-ties, where a near-tie is defined exactly (the float32 distance gap between the two
  codes is within what the bf16 perturbation of the latent can change);
- --amp fp16 (gradient scaler) trains finitely;
- --compile and --compile_mode reduce-overhead (CUDA graphs) against eager;
- the device data path against the DataLoader path;
- no per-step host synchronisation (torch.cuda.set_sync_debug_mode): an epoch of 6 steps makes
  no more synchronisations than an epoch of 3;
- the distributed path with NCCL: a 1-GPU torchrun run equals the plain run.
"""
import pytest
import torch

import vqvae
from benchmark import count_syncs
from conftest import record_code_indices, tiny_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA test tier)")]

DEV = torch.device("cuda")


def cuda_config(**kw):
    kw.setdefault("device", "cuda")
    return tiny_config(**kw)


def steps_on_cuda(cfg, n_steps=3, n_images=None):
    """``n_steps`` training steps (one epoch) on the GPU with the runtime ``cfg`` asks for."""
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    rt = vqvae.make_runtime(cfg, DEV)
    model, opt = vqvae.setup_model(cfg, DEV, rt)
    seen = record_code_indices(model)
    tr = train_u8[: (n_images or n_steps * cfg.batch_size)].to(DEV)
    tr = tr if cfg.data_path == "device" else tr.cpu()
    m, _ = vqvae.train_epoch(model, opt, tr, cfg, torch.Generator().manual_seed(cfg.seed), 0, n_steps, rt=rt)
    return m, seen, model, opt, rt, val_u8.to(DEV)


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_training_steps_on_the_cuda_runtime_are_finite(quantizer):
    cfg = cuda_config(quantizer=quantizer)                                # amp auto = bf16 on CUDA
    m, seen, model, opt, rt, val = steps_on_cuda(cfg)
    assert rt.amp_dtype == torch.bfloat16 and rt.channels_last
    assert opt.defaults.get("fused") is True                              # the fused CUDA AdamW kernel
    assert torch.backends.cudnn.benchmark
    assert model.encoder.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    for k in ("loss", "recon_loss", "grad_norm", "perplexity"):
        assert torch.isfinite(torch.tensor(float(m[k]))), k
    for n, p in model.state_dict().items():
        if p.is_floating_point():
            assert torch.isfinite(p).all(), n
    assert len(seen) == 3 and all(s.device.type == "cuda" for s in seen)
    v = vqvae.validate(model, val, vqvae.default_val_batch_size(cfg), rt=rt)
    assert 0 < v["psnr"] < 100


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_quantizer_codes_do_not_change_under_bf16_autocast(quantizer):
    """Same float32 latents in, with and without bf16 autocast: the quantizer's distances, BA and
    rounding run in float32, so the codes are identical."""
    extra = {"init": "normal"} if vqvae.QUANTIZERS[quantizer].has_codebook else {}   # the remedies' init
    cfg = cuda_config(quantizer=quantizer, **extra)
    model = vqvae.build_model(cfg, DEV).eval()
    z = torch.randn(64, cfg.latent_dim, 8, 8, device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    with torch.no_grad():
        _, _, ref = model.quantizer(z)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, _, amp = model.quantizer(z)
    assert torch.equal(ref["code_indices"], amp["code_indices"])


@pytest.mark.parametrize("quantizer", ["vq_ema", "vq"])
def test_bf16_model_picks_the_float32_codes_except_at_near_ties(quantizer):
    """The whole model in bf16 vs float32 (same weights, same images): where the codes differ, the
    float32 distance gap d(z32, b) - d(z32, a) between the float32 code a and the bf16 code b is at
    most 2 |z16 - z32| |e_a - e_b| (the most the bf16 perturbation of z can change it)."""
    cfg = cuda_config(quantizer=quantizer, init="normal")
    model = vqvae.build_model(cfg, DEV).eval()
    train_u8, _ = vqvae.load_dataset(cfg)
    x = vqvae.to_float(train_u8[:128].to(DEV))
    with torch.no_grad():
        z32 = model.encoder(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z16 = model.encoder(x).float()
        a = model.quantizer(z32)[2]["code_indices"].flatten()
        b = model.quantizer(z16)[2]["code_indices"].flatten()
    E = model.quantizer.codebook.float()
    zf32 = z32.permute(0, 2, 3, 1).reshape(-1, cfg.latent_dim)
    zf16 = z16.permute(0, 2, 3, 1).reshape(-1, cfg.latent_dim)
    d = vqvae.squared_distances(zf32, E)
    rows = torch.arange(len(a), device=DEV)
    gap = d[rows, b] - d[rows, a]
    bound = 2 * (zf16 - zf32).norm(dim=1) * (E[a] - E[b]).norm(dim=1) + 1e-4 * d[rows, a].abs()
    differ = a != b
    assert (gap[differ] <= bound[differ]).all()
    assert differ.float().mean() < 0.2


def test_fp16_with_gradient_scaler_trains_finitely():
    cfg = cuda_config(quantizer="vq_ema", amp="fp16")
    m, _, model, _, rt, val = steps_on_cuda(cfg)
    assert rt.scaler is not None and rt.amp_dtype == torch.float16
    assert torch.isfinite(torch.tensor(float(m["loss"])))
    assert 0 < vqvae.validate(model, val, 64, rt=rt)["psnr"] < 100


def _compare_runs(a, b, quantizer, rel=2e-3, tie_frac=0.005):
    (m_a, idx_a, model_a), (m_b, idx_b, model_b) = a, b
    assert len(idx_a) == len(idx_b)
    for x, y in zip(idx_a, idx_b):
        assert (x != y).float().mean() <= (tie_frac if quantizer == "ba_vq" else 0.002)
    for k in ("loss", "recon_loss"):
        assert m_a[k] == pytest.approx(m_b[k], rel=rel), k
    assert list(model_a.state_dict()) == list(model_b.state_dict())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_compiled_model_matches_eager_on_cuda(quantizer, mode):
    """--compile (and CUDA graphs with reduce-overhead) against eager, float32 (amp off, TF32 off) so
    that only the compiled kernels differ: the same codes but for near-ties, the same losses."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = []
        for compile_ in (False, True):
            cfg = cuda_config(quantizer=quantizer, amp="off", compile=compile_, compile_mode=mode)
            m, seen, model, _, rt, val = steps_on_cuda(cfg, n_steps=4)
            runs.append((m, seen, model))
            runs[-1] += (vqvae.validate(model, val, 64, rt=rt)["psnr"],)
        _compare_runs(runs[0][:3], runs[1][:3], quantizer)
        assert runs[0][3] == pytest.approx(runs[1][3], abs=0.02)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


# Residual VQ's encodec k-means (50 Lloyd iterations on the first batch) and its dead-code replacement
# amplify rounding: on the CPU, scaling the encoder's weights by 1 + 1e-6 changes 14.6% of the codes of the
# first step with the k-means alone, 0.04% with 1 iteration, 67% with replacement as well, and none with
# both off. The two data paths differ by rounding (channels_last convolutions), so residual VQ is compared
# with both off; its k-means and replacement are checked against encodec's code in test_rvq.py.
DATA_PATH_EXTRA = {"rvq": dict(rvq_kmeans_iters=0, rvq_dead_code_threshold=0)}


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_device_data_path_matches_the_loader_path_on_cuda(quantizer):
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    extra = DATA_PATH_EXTRA.get(quantizer, {})
    try:
        fast = steps_on_cuda(cuda_config(quantizer=quantizer, amp="off", data_path="device", **extra))
        plain = steps_on_cuda(cuda_config(quantizer=quantizer, amp="off", data_path="loader", num_workers=0,
                                          ba_impl="autograd", channels_last=False, **extra))
        _compare_runs(fast[:3], plain[:3], quantizer, rel=1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_no_per_step_host_syncs(quantizer):
    """torch.cuda.set_sync_debug_mode counts every host synchronisation: an epoch of 6 steps makes
    no more than an epoch of 3 (they are per epoch, not per step), remedies on."""
    extra = dict(grad_clip=1.0)
    if vqvae.QUANTIZERS[quantizer].has_codebook:                          # dead-code restarts, where they apply
        extra.update(dead_code_threshold=0.5, dead_code_every=2)
    cfg = cuda_config(quantizer=quantizer, progress_every=1000, **extra)
    train_u8, _ = vqvae.load_dataset(cfg)
    rt = vqvae.make_runtime(cfg, DEV)
    model, opt = vqvae.setup_model(cfg, DEV, rt)
    tr = train_u8.to(DEV)
    g = torch.Generator().manual_seed(0)
    vqvae.train_epoch(model, opt, tr[:128], cfg, g, 0, 100, rt=rt)          # warm-up (autotuning, allocator)
    # the first counted epoch also sees one-time warnings (measured on an H100: 13 then 12), so count twice
    count_syncs(lambda: vqvae.train_epoch(model, opt, tr[:3 * 64], cfg, g, 2, 100, rt=rt))
    n3 = count_syncs(lambda: vqvae.train_epoch(model, opt, tr[:3 * 64], cfg, g, 5, 100, rt=rt))
    n6 = count_syncs(lambda: vqvae.train_epoch(model, opt, tr[:6 * 64], cfg, g, 8, 100, rt=rt))
    assert n6 <= n3, (n3, n6)                  # a per-step sync would make n6 >= n3 + 3
    vb = 16
    count_syncs(lambda: vqvae.validate(model, tr[:2 * vb], vb, rt=rt))
    v2 = count_syncs(lambda: vqvae.validate(model, tr[:2 * vb], vb, rt=rt))
    v4 = count_syncs(lambda: vqvae.validate(model, tr[:4 * vb], vb, rt=rt))
    assert v4 <= v2, (v2, v4)


def test_a_one_gpu_nccl_torchrun_equals_the_plain_run(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    args = ["--dataset", "fake", "--train_subset", "256", "--val_subset", "64", "--hidden_dim", "16", "--latent_dim", "16",
            "--codebook_size", "32", "--batch_size", "64", "--epochs", "2", "--device", "cuda", "--no_wandb",
            "--no_progress", "--amp", "off", "--out_dir", str(tmp_path), "--quantizer", "ba_vq"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(ROOT / "train.py"), *args, "--name", "nccl"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--name", "plain"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "final_metrics.json").read_text()) for n in ("nccl", "plain"))
    assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-3) and a["perplexity"] == pytest.approx(b["perplexity"], rel=2e-2)
