"""A model-weight EMA (--model_ema DECAY) as the LitEma of IBQ's authors: its update with the decay's warm-up against a
transcription, buffers taken from the live model, validation and the final model on the averaged weights, checkpoints
that keep both and resume exactly."""
from pathlib import Path

import pytest
import torch

import vqvae
import train as cli


def lit_ema_transcription(params_per_step: list, decay: float, use_num_updates: bool) -> dict:
    """LitEma.forward (SEED-Voken's src/IBQ/modules/ema.py, from latent-diffusion's), in float64: with
    use_num_upates, num_updates += 1 and decay = min(decay, (1 + num_updates) / (10 + num_updates)) (IBQ's authors
    build it without, so the decay is constant); shadow -= (1 - decay) * (shadow - param); the shadow starts at the
    parameters as they were when it was made."""
    shadow = {k: v.clone() for k, v in params_per_step[0].items()}
    for n, params in enumerate(params_per_step[1:], 1):
        d = min(decay, (1 + n) / (10 + n)) if use_num_updates else decay
        for k in shadow:
            shadow[k] = shadow[k] - (1.0 - d) * (shadow[k] - params[k])
    return shadow


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("decay", [0.5, 0.999])
def test_the_update_is_their_litema_with_or_without_its_warm_up(decay, warmup):
    """Five updates of a model whose weights move each step: the averages equal the transcription's (IBQ's: constant
    decay; with the warm-up d = 2/11, 3/12, ... caps the decay at first, and 0.5 from the fourth update on)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    m[1].bias.requires_grad_(False)                                      # not trained: not averaged
    ema = vqvae.ModelEMA(m, decay, warmup)
    seen = [{k: p.detach().clone() for k, p in m.named_parameters()}]
    for _ in range(5):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m)
        seen.append({k: p.detach().clone() for k, p in m.named_parameters()})
    expected = lit_ema_transcription(seen, decay, warmup)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"} and ema.updates == 5
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-12)
    first = (1 - 2 / 11) if warmup else (1 - decay)                       # 1 - d at the first update
    torch.testing.assert_close(ema.shadow["0.weight"] if len(seen) == 2 else lit_ema_transcription(seen[:2], decay, warmup)["0.weight"],
                               seen[0]["0.weight"] - first * (seen[0]["0.weight"] - seen[1]["0.weight"]))


def test_applied_swaps_the_parameters_in_and_out_and_leaves_the_buffers():
    """Inside ``applied`` the model holds the averages; the buffers (VQ-EMA's codebook, its EMA counts) stay as
    trained; after it every tensor is back, bit for bit."""
    torch.manual_seed(1)
    model = vqvae.VQVAE("vq_ema", 16, 8, 8)
    ema = vqvae.ModelEMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        model.quantizer.codebook.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        for k, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[k])
        assert torch.equal(model.quantizer.codebook, before["quantizer.codebook"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_off_by_default():
    assert vqvae.Config().model_ema == 0.0 and vqvae.Config().model_ema_warmup is False
    with pytest.raises(vqvae.BavqError, match="model_ema"):
        vqvae.make_config({"model_ema": 1.0}).validate()


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["ibq"])
def test_a_run_validates_and_keeps_the_averaged_model_and_resumes_exactly(tiny_cfg, quantizer):
    """Validation and final_model.pt use the averaged weights (the model's buffers as trained); each checkpoint
    keeps the live weights and the averages; resuming from the first epoch's checkpoint ends bit-identical."""
    cfg = tiny_cfg(name="ema", quantizer=quantizer, model_ema=0.9, model_ema_warmup=True,
                   train_subset=128, val_subset=32, epochs=3)
    ref = vqvae.train(cfg)
    run = Path(cfg.out_dir) / "ema"
    final = torch.load(run / "final_model.pt", weights_only=True)
    ck = torch.load(run / "checkpoint_epoch3.pt", weights_only=False)
    live, avg = ck["model_state_dict"], ck["model_ema"]["shadow"]
    assert ck["model_ema"]["updates"] == 6                                   # 2 steps an epoch
    for k, v in final.items():
        assert torch.equal(v, avg[k] if k in avg else live[k]), k
    assert any(not torch.equal(live[k], avg[k]) for k in avg)                # the averages are not the live weights
    ev = vqvae.evaluate_run(run, device="cpu")                               # the final model: the averaged one
    assert ev["psnr"] == pytest.approx(ref["psnr"], abs=1e-5)
    for p in ("final_metrics.json", "final_model.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"):
        (run / p).unlink()
    resumed = vqvae.train(cli.config_from_args(["--resume", str(run)]))
    assert resumed == ref
    again = torch.load(run / "final_model.pt", weights_only=True)
    assert all(torch.equal(again[k], final[k]) for k in final)
