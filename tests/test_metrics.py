"""The metrics: perplexity, usage, PSNR, SSIM and rate, and validation over the whole set with hard codes."""
import math

import pytest
import torch

import vqvae
from vqvae import compute_perplexity, compute_psnr, compute_usage_rate, psnr_per_image


@pytest.mark.parametrize("K", [2, 16, 512])
def test_perplexity_of_uniform_histogram_is_K(K):
    idx = torch.arange(K).repeat(7)
    assert compute_perplexity(idx, K) == pytest.approx(K, rel=1e-6)


def test_perplexity_of_single_code_is_one():
    assert compute_perplexity(torch.full((100,), 3), 16) == pytest.approx(1.0)


def test_perplexity_by_hand():
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, perplexity = 2^1.5
    idx = torch.tensor([0, 0, 1, 2])
    assert compute_perplexity(idx, 8) == pytest.approx(2 ** 1.5, rel=1e-6)


def test_usage_rate_counts_codes_used_at_least_once():
    assert compute_usage_rate(torch.tensor([0, 0, 5, 7, 7, 7]), 16) == pytest.approx(3 / 16)
    assert compute_usage_rate(torch.arange(16), 16) == 1.0
    assert compute_usage_rate(torch.tensor([[1, 1], [1, 1]]), 4) == 0.25   # any shape


def test_psnr_of_known_mse_equals_closed_form():
    """Images in [-1, 1]; an error of e on that scale is e/2 on [0, 1], PSNR = 10 log10(1/(e/2)^2)."""
    x = torch.zeros(3, 3, 32, 32)
    for e in (0.02, 0.1, 0.5):
        xr = x + e
        assert compute_psnr(x, xr) == pytest.approx(10 * math.log10(1 / (e / 2) ** 2), rel=1e-5)
    # the original code's formula 20 log10(1/sqrt(mse)) on [-1, 1] is 6.02 dB lower
    e = 0.1
    seed = 20 * math.log10(1 / math.sqrt(e ** 2))
    assert compute_psnr(x, x + e) - seed == pytest.approx(20 * math.log10(2), abs=1e-4)


def test_psnr_is_mean_of_per_image_values():
    x = torch.zeros(2, 3, 32, 32)
    xr = torch.stack([torch.full((3, 32, 32), 0.02), torch.full((3, 32, 32), 0.2)])
    per = [10 * math.log10(1 / 0.01 ** 2), 10 * math.log10(1 / 0.1 ** 2)]   # 40 dB and 20 dB
    torch.testing.assert_close(psnr_per_image(x, xr), torch.tensor(per))
    assert compute_psnr(x, xr) == pytest.approx(30.0, rel=1e-6)               # not PSNR of the mean MSE


@pytest.mark.parametrize("name", ["vq_ema", "vq", "ba_vq"])
def test_validate_uses_the_whole_set_and_hard_codes(name, float64):
    """validate() == per-image PSNR of hard-code reconstructions averaged over every image, and
    perplexity/usage over every code index, whatever the batch size (N not a multiple of it). In float64: the
    encoder's output for a batch of 32 and of 70 images may differ in the last bits, which in float32 could
    move a latent within a few ulps of a tie to the other code."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(name, codebook_size=32, latent_dim=8, hidden_dim=8)
    images = vqvae._fake_images(70, seed=3)
    model.quantizer.set_schedule(0.7)
    if name == "ba_vq":                      # a non-uniform running marginal, so that it matters
        model.quantizer.log_q_bar.copy_(torch.log_softmax(torch.randn(32), 0))
    m = vqvae.validate(model, images, batch_size=32)
    model.eval()
    with torch.no_grad():
        x = vqvae.to_float(images)
        z = model.encoder(x)
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
        d = vqvae.squared_distances(z_flat, model.quantizer.codebook.detach())
        if name == "ba_vq":   # argmax of P(k|x) = softmax(log Q-bar - beta d), each latent on its own
            q = model.quantizer
            log_p = torch.log_softmax(q.log_q_bar.double() - q.beta.double() * d.double(), dim=1)
            idx = log_p.argmax(1)
            x_soft = model.decoder((log_p.exp() @ q.codebook.double()).reshape(70, 8, 8, 8).permute(0, 3, 1, 2))
            assert m["psnr_soft"] == pytest.approx(float(psnr_per_image(x, x_soft).mean()), rel=1e-5)
            h_q = -(q.log_q_bar.double().exp() * q.log_q_bar.double()).sum()
            h_p = -(log_p.exp() * log_p).sum(1).mean()
            assert m["mutual_information_bits"] == pytest.approx(float((h_q - h_p) / math.log(2)), rel=1e-4)
        else:
            idx = d.argmin(1)
        zq = model.quantizer.codebook.detach()[idx].reshape(70, 8, 8, 8).permute(0, 3, 1, 2)
        xr = model.decoder(zq)
    assert m["psnr"] == pytest.approx(float(psnr_per_image(x, xr).mean()), rel=1e-5)
    assert m["recon_loss"] == pytest.approx(float(((x - xr) ** 2).mean()), rel=1e-5)
    assert m["perplexity"] == pytest.approx(compute_perplexity(idx, 32), rel=1e-5)
    assert m["usage_rate"] == pytest.approx(compute_usage_rate(idx, 32))
    assert m["dead_codes"] == 32 - int(torch.unique(idx).numel())
    assert model.training is False   # validate restores the mode it found


def test_validate_restores_training_mode_and_state():
    torch.manual_seed(0)
    model = vqvae.VQVAE("vq_ema", codebook_size=16, latent_dim=8, hidden_dim=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vqvae.validate(model, vqvae._fake_images(20, seed=0), batch_size=8)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ba_validation_reports_soft_psnr_separately():
    torch.manual_seed(0)
    model = vqvae.VQVAE("ba_vq", codebook_size=16, latent_dim=8, hidden_dim=8)
    model.quantizer.beta.fill_(0.5)
    m = vqvae.validate(model, vqvae._fake_images(20, seed=0), batch_size=10)
    assert {"psnr", "psnr_soft", "beta"} <= set(m)
    assert m["psnr"] != m["psnr_soft"]
    assert m["beta"] == pytest.approx(0.5)


def test_ba_validation_does_not_depend_on_the_validation_batch_size(float64):
    """BA-VQ evaluates each latent with its running marginal: the same code histogram and (to float
    rounding of the sums) the same metrics for validation batches of 1, 7 and 1024 images. In float64: a
    batch of 1 changes the encoder's output in the last bits, and in float32 one latent of this case lies
    one ulp from a tie."""
    from conftest import tiny_config
    cfg = tiny_config(quantizer="ba_vq", batch_size=32)
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    vqvae.train_epoch(model, opt, train_u8[:96], cfg, torch.Generator().manual_seed(0), 0, 3)
    runs = [vqvae.validate(model, val_u8[:20], bs) for bs in (1, 7, 1024)]
    for m in runs[1:]:
        assert torch.equal(m["code_counts"], runs[0]["code_counts"])
        for k in ("psnr", "psnr_soft", "loss", "recon_loss", "commitment_loss", "codebook_loss", "entropy_loss",
                  "perplexity"):
            assert m[k] == pytest.approx(runs[0][k], rel=1e-6), k              # sums kept in float32
        assert m["mutual_information_bits"] == pytest.approx(runs[0]["mutual_information_bits"], abs=1e-7)


def test_ssim_matches_scikit_image():
    """ssim_per_image == scikit-image's structural_similarity with the paper's settings (Gaussian
    window sigma 1.5, population covariances, data range 1), per image, on [0, 1] images."""
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (requirements-dev.txt) is the reference")
    g = torch.Generator().manual_seed(0)
    x = vqvae.to_float(vqvae._fake_images(4, seed=5))
    x_recon = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)      # some values outside [-1, 1]
    ours = vqvae.ssim_per_image(x, x_recon)
    a, b = ((x + 1) / 2).double().numpy(), ((x_recon + 1) / 2).clamp(0, 1).double().numpy()
    ref = [metrics.structural_similarity(a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False) for i in range(4)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-5)
    assert vqvae.ssim_per_image(x, x).tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    assert 0 < min(ref) < 0.9


def test_rate_is_the_entropy_of_the_code_histogram():
    """code_entropy_bits = H of the histogram in bits (uniform over 4 of 8 codes: 2 bits);
    bits_per_image = that times the codes per image; validation reports both, and SSIM."""
    counts = torch.tensor([5, 5, 5, 5, 0, 0, 0, 0])
    assert float(vqvae.entropy_bits(counts)) == pytest.approx(2.0)
    torch.manual_seed(0)
    model = vqvae.VQVAE("vq_ema", codebook_size=32, latent_dim=8, hidden_dim=8)
    images = vqvae._fake_images(30, seed=3)
    m = vqvae.validate(model, images, batch_size=16)
    c = m["code_counts"].double()
    p = c / c.sum()
    h = float(-(p[p > 0] * p[p > 0].log2()).sum())
    assert m["code_entropy_bits"] == pytest.approx(h, rel=1e-6)
    assert m["bits_per_image"] == pytest.approx(h * 64, rel=1e-6)                  # 8x8 codes per image
    with torch.no_grad():
        x = vqvae.to_float(images)
        xr = model.eval()(x)[0]
    assert m["ssim"] == pytest.approx(float(vqvae.ssim_per_image(x, xr).mean()), rel=1e-5)


# --------------------------------------------------------------------------- the papers' conventions


def _sqvae_test_perplexity(indices_bhw, K, bs):
    """sony/sqvae, transcribed: for each test batch of bs images (shuffle off, last batch kept), the
    mean one-hot over its positions, exp(-sum p log(p + 1e-7)); then np.mean over the batches."""
    import numpy as np
    values = []
    for start in range(0, indices_bhw.shape[0], bs):
        enc = torch.nn.functional.one_hot(indices_bhw[start:start + bs].flatten(), K).float()
        avg_probs = enc.mean(0)
        values.append(float(torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7)))))
    return float(np.array(values).mean(0))


def test_sqvae_perplexity_equals_the_transcription_of_their_code():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 512, (100, 8, 8), generator=g)               # 3 batches of 32 and one of 4
    ours = vqvae.perplexity_per_batch(idx, 512)
    assert ours == pytest.approx(_sqvae_test_perplexity(idx, 512, 32), rel=1e-6)
    assert ours == pytest.approx(_sqvae_test_perplexity(idx, 512, 32), rel=1e-6)
    assert vqvae.perplexity_per_batch(idx, 512, images_per_batch=100) == pytest.approx(
        _sqvae_test_perplexity(idx, 512, 100), rel=1e-6)


def test_sqvae_perplexity_by_hand_and_its_batch_size_dependence():
    # 3 images of 2 positions, 2 images per batch: batch 1 codes (0, 0, 1, 1) -> p = (1/2, 1/2): ~2;
    # batch 2 codes (2, 2) -> p = (1): ~1; mean 1.5 (the 1e-7 inside the log moves it by ~1e-7)
    idx = torch.tensor([[0, 0], [1, 1], [2, 2]])
    assert vqvae.perplexity_per_batch(idx, 4, images_per_batch=2) == pytest.approx(1.5, abs=1e-6)
    assert vqvae.compute_perplexity(idx, 4) == pytest.approx(3.0)     # ours: one histogram of the whole set
    # K = 512 codes used uniformly at random: ~K exp(-(K - 1) / (2 n)) at n positions per batch (the plug-in
    # entropy's bias), not K (1 - e^(-n/K)), the expected number of distinct codes (502.6 and 511.8)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 512, (3200, 8, 8), generator=g)
    for images, n in ((32, 2048), (64, 4096)):
        expected = 512 * math.exp(-511 / (2 * n))                                            # 452.0, 481.0
        assert vqvae.perplexity_per_batch(idx, 512, images_per_batch=images) == pytest.approx(expected, rel=0.01)
        distinct = [torch.unique(b).numel() for b in idx.split(images)]                      # 3,200 images: whole batches
        assert sum(distinct) / len(distinct) == pytest.approx(512 * (1 - math.exp(-n / 512)), rel=0.01)
    assert vqvae.compute_perplexity(idx, 512) == pytest.approx(512, rel=0.01)


def test_sqvae_perplexity_of_stacked_codebooks_counts_each_stage_apart():
    idx = torch.zeros(2, 2, 1, 1, dtype=torch.long)                    # (N, S, H, W): code 0 of both stages
    assert vqvae.perplexity_per_batch(idx, 8, images_per_batch=2) == pytest.approx(2.0, abs=1e-6)


def _cvqvae_reference(x, x_recon, tmp_path):
    """CVQ-VAE's test.py (tensor2im, imageio.imwrite .jpg = Pillow quality 75) and evaluation.py (read
    back, /255, skimage psnr and ssim(multichannel=True, data_range=1, win_size=11): channel_axis in
    today's scikit-image), per image."""
    import numpy as np
    from PIL import Image
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (requirements-dev.txt) is the reference")

    def tensor2im(t):
        return (((t + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    psnr, ssim = [], []
    for i in range(x.shape[0]):
        for name, t in (("gt", x[i]), ("rec", x_recon[i])):
            Image.fromarray(tensor2im(t)).save(tmp_path / f"{name}{i:08d}.jpg", quality=75)
        gt = np.array(Image.open(tmp_path / f"gt{i:08d}.jpg").convert("RGB")).astype(np.float32) / 255.0
        rec = np.array(Image.open(tmp_path / f"rec{i:08d}.jpg").convert("RGB")).astype(np.float32) / 255.0
        psnr.append(metrics.peak_signal_noise_ratio(gt, rec, data_range=1))
        ssim.append(metrics.structural_similarity(gt, rec, channel_axis=2, data_range=1, win_size=11))
    return psnr, ssim


def test_cvqvae_psnr_and_ssim_equal_the_transcription_of_their_code(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = vqvae.to_float(vqvae._fake_images(6, seed=5))
    x_recon = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)
    ours = vqvae.cvqvae_image_metrics(x, x_recon)
    psnr, ssim = _cvqvae_reference(x, x_recon, tmp_path)
    assert ours["psnr_cvqvae"].tolist() == pytest.approx(psnr, abs=1e-4)
    assert ours["ssim_cvqvae"].tolist() == pytest.approx(ssim, abs=1e-5)
    # not the library's SSIM (Gaussian window, float images, no JPEG)
    assert (ours["ssim_cvqvae"] - vqvae.ssim_per_image(x, x_recon)).abs().max() > 1e-3


def test_cvqvae_images_are_truncated_not_rounded():
    x = torch.tensor([-1.0, 0.0031, 1.0, 1.5]).reshape(1, 1, 2, 2)      # 0.0031 -> 127.895 -> 127
    assert vqvae.to_uint8_truncated(x).flatten().tolist() == [0, 127, 255, 255]
    assert vqvae.to_uint8(x).flatten().tolist()[1] == 128               # the library's picture rounds


def test_uniform_ssim_equals_scikit_image_without_jpeg():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (requirements-dev.txt) is the reference")
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = vqvae.ssim_uniform_per_image(a, b)
    ref = [metrics.structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=1, win_size=11)
           for i in range(2)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-10)


def test_protocol_configs_report_the_conventions_of_the_papers_they_are_compared_with():
    import yaml
    cvq = yaml.safe_load(open(vqvae.Path(vqvae.__file__).parent / "configs" / "cvq_vae.yaml"))
    sq = yaml.safe_load(open(vqvae.Path(vqvae.__file__).parent / "configs" / "vqwae_sqvae.yaml"))
    assert {"psnr_cvqvae", "ssim_cvqvae"} <= set(cvq["eval_metrics"])
    assert "perplexity_sqvae" in sq["eval_metrics"]


def test_a_run_asking_for_the_papers_metrics_reports_them(tiny_cfg):
    cfg = tiny_cfg(eval_metrics=["psnr", "ssim", *vqvae.PAPER_METRICS])
    final = vqvae.train(cfg)
    model = vqvae.load_run(vqvae.Path(cfg.out_dir) / cfg.resolved_name())[0]
    _, val_u8 = vqvae.load_dataset(cfg)
    idx = model.encode(vqvae.to_float(val_u8))
    assert final["perplexity_sqvae"] == pytest.approx(_sqvae_test_perplexity(idx, cfg.codebook_size, 32), rel=1e-6)
    assert 0 < final["ssim_cvqvae"] < 1 and 5 < final["psnr_cvqvae"] < 40
