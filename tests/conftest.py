"""Shared fixtures. Tests never need a W&B account or network."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vqvae  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def tiny_config(**overrides) -> vqvae.Config:
    """A model and dataset small enough for a CPU test (seconds), with outputs in tmp dirs."""
    base = dict(dataset="fake", train_subset=256, val_subset=64, hidden_dim=16, latent_dim=16,
                codebook_size=32, batch_size=64, epochs=1, wandb=False, progress=False, device="cpu",
                checkpoint_every=1)
    base.update(overrides)
    if base.get("quantizer") == "fsq" and "fsq_levels" not in overrides:
        base["fsq_levels"] = fsq_levels_for(base["codebook_size"])
    return vqvae.make_config(base).validate()


def record_code_indices(model: vqvae.VQVAE) -> list:
    """Wrap the model's quantizer so every forward appends a copy of its code indices (B, H, W) to the
    returned list."""
    seen = []
    orig = model.quantizer.forward

    def spy(z):
        out = orig(z)
        seen.append(out[2]["code_indices"].clone())
        return out
    model.quantizer.forward = spy
    return seen


def fsq_levels_for(K: int) -> list:
    """FSQ levels whose product is K (K a power of two >= 2): 32 -> [4, 8], 16 -> [4, 4]."""
    levels = []
    while K > 8 and K % 4 == 0:
        levels.append(4)
        K //= 4
    return levels + [K]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(**overrides):
        overrides.setdefault("out_dir", str(tmp_path / "experiments"))
        return tiny_config(**overrides)
    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (the GPU tier; skipped without one)")
    config.addinivalue_line("markers", "slow: subprocesses, whole runs, torch.compile, the notebook "
                                       "(deselect with -m 'not slow' for the quick maths specification)")
