"""Finished runs can be reloaded and evaluated: load_run rebuilds the run's own architecture,
encode/decode_codes round-trip through the codes, evaluate.py recomputes the final metrics."""
import json

import pytest
import torch

import evaluate
import vqvae
from conftest import fsq_levels_for, tiny_config


@pytest.mark.parametrize("quantizer", list(vqvae.QUANTIZERS))
def test_decode_codes_of_encode_is_the_eval_reconstruction(quantizer):
    kw = {"fsq_levels": fsq_levels_for(32)} if quantizer == "fsq" else {}
    torch.manual_seed(0)
    model = vqvae.VQVAE(quantizer, codebook_size=32, latent_dim=8, hidden_dim=8, **kw)
    model.train()
    x = vqvae.to_float(vqvae._fake_images(5, seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = model.encode(x)
    assert idx.shape == (5, 8, 8) and idx.dtype == torch.long and model.training      # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                                             # no state change
    with torch.no_grad():
        expect = model.eval()(x)[0]
    torch.testing.assert_close(model.decode_codes(idx), expect, rtol=1e-5, atol=1e-6)


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
