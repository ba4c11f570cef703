"""Shared fixtures and helpers. Tests never need a W&B account or network."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tests are isolated from the user's W&B settings: whatever the shell says (WANDB_MODE=online, an API key,
# an entity or a base URL), W&B is off and reads no user settings file; tests of the W&B fallback set
# what they need themselves.
for _key in [k for k in os.environ if k.startswith("WANDB_")]:
    del os.environ[_key]
_WANDB_HOME = Path(tempfile.mkdtemp(prefix="bavq_tests_wandb_"))
atexit.register(shutil.rmtree, _WANDB_HOME, True)                  # removed when pytest exits
os.environ.update(WANDB_MODE="disabled", WANDB_SILENT="true", WANDB_DIR=str(_WANDB_HOME),
                  WANDB_CONFIG_DIR=str(_WANDB_HOME), WANDB_CACHE_DIR=str(_WANDB_HOME))
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


class Float64Runtime(vqvae.Runtime):
    """The plain runtime with every batch in float64 (the model made float64 with ``.double()``): two paths that
    sum in other orders then differ near 1e-16, far below anything that a few training steps can turn into a
    different code, so that comparing them exactly does not depend on the CPU's float32 rounding."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return super().prepare(x.double())


@pytest.fixture
def float64():
    """The test runs with torch's default float dtype set to float64: models built in it, and images from
    ``vqvae.to_float``, are float64. For comparisons of two computations that sum in other orders (batch sizes,
    processes, code paths): their differences stay near 1e-16, so that the same codes and metrics to 1e-9 hold
    on any CPU, where in float32 a latent within a few ulps of a tie may pick another code."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(before)


def record_inputs(model: vqvae.VQVAE) -> list:
    """A list to which every forward of the model's encoder appends a copy of its input (the images it sees)."""
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
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
    config.addinivalue_line("markers", "slow: whole runs, CLI processes, torch.compile, the notebook: seconds each "
                                       "(deselect with -m 'not slow' for the quick maths specification)")


# --------------------------------------------------------------------------- quantizers


FSQ_LEVELS = {16: [4, 4], 32: [4, 8], 512: [8, 8, 8]}


def shape_kwargs(name: str, K: int) -> dict:
    """What a quantizer needs besides K to have K codes: FSQ's levels."""
    return {"fsq_levels": fsq_levels_for(K)} if name == "fsq" else {}


def make_quantizer(name, K=16, D=8, **kw):
    """A QUANTIZERS[name] with K codes of dimension D, seeded (FSQ: levels giving K)."""
    torch.manual_seed(0)
    if name == "fsq":
        kw.setdefault("fsq_levels", FSQ_LEVELS[K])
    return vqvae.QUANTIZERS[name](K, D, **kw)


def make_model(name, K=16, D=8, hidden=8):
    """A small VQVAE around QUANTIZERS[name] (FSQ: levels giving K)."""
    kw = {"fsq_levels": FSQ_LEVELS[K]} if name == "fsq" else {}
    return vqvae.VQVAE(name, codebook_size=K, latent_dim=D, hidden_dim=hidden, **kw)


def latents(B=2, D=8, H=4, W=4, scale=0.1, seed=1):
    """Seeded Gaussian latents (B, D, H, W) times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, H, W, generator=g) * scale


def latent_grid(x):
    """Rows of x (N, D) as a latent grid (B=1, D, H=1, W=N)."""
    return x.t().reshape(1, x.shape[1], 1, x.shape[0])                 # (N, D) -> (B=1, D, H=1, W=N)


_USAGE_CACHE = {}


def usage_after_training(quantizer, epochs=3, **kw):
    """Validation usage rate after ``epochs`` epochs in a collapse-prone toy setting (fake images, K=64).
    Training is deterministic, so a setting already measured in this session (plain VQ, the baseline of several
    tests) is returned from a cache keyed by the setting and the default float dtype."""
    key = (quantizer, epochs, tuple(sorted(kw.items())), torch.get_default_dtype())
    if key not in _USAGE_CACHE:
        _USAGE_CACHE[key] = _usage_after_training(quantizer, epochs, **kw)
    return _USAGE_CACHE[key]


def _usage_after_training(quantizer, epochs, **kw):
    cfg = tiny_config(quantizer=quantizer, codebook_size=64, batch_size=32, lr=2e-3, **kw)
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    g, step = torch.Generator().manual_seed(0), 0
    for _ in range(epochs):
        _, step = vqvae.train_epoch(model, opt, train_u8, cfg, g, step, 8 * epochs)
    return vqvae.validate(model, val_u8, 64)["usage_rate"]


# --------------------------------------------------------------------------- runs


def history(cfg):
    """The history.jsonl rows of the run that ``cfg`` names."""
    return [json.loads(l) for l in (Path(cfg.out_dir) / cfg.resolved_name() / "history.jsonl").read_text().splitlines()]


def final_of(run_dir):
    """final_metrics.json of a run directory."""
    return json.loads((Path(run_dir) / "final_metrics.json").read_text())


def snapshot(run):
    """Every file of a run directory, name -> bytes (to show that nothing was touched)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def one_paragraph(msg):
    """A failure message is one paragraph: no traceback, one line, and says something."""
    assert "Traceback" not in msg and "\n" not in msg.strip() and len(msg) > 40


def cli_in_process(args, capsys, cwd=None, monkeypatch=None):
    """train.py's main with ``args`` in this process (no interpreter start-up, ~1 s each): its exit
    status and output as a finished subprocess gives them; an uncaught exception (what a user would
    see as a traceback) fails the test. For tests of messages and exit codes, not of the process."""
    import train
    if cwd is not None and monkeypatch is not None:
        monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = train.main(list(args))
    except SystemExit as e:                  # argparse's errors exit
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def run_cli(args, cwd):
    """train.py with ``args`` in a subprocess (W&B disabled)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


# train.py flags for a run of a few seconds on generated images
TINY = ["--dataset", "fake", "--train_subset", "64", "--val_subset", "32", "--hidden_dim", "8", "--latent_dim", "8",
        "--codebook_size", "16", "--batch_size", "32", "--epochs", "1", "--checkpoint_every", "1",
        "--no_wandb", "--no_progress", "--device", "cpu"]
