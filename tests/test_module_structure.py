"""The split into three modules: vqvae.py reads as the method top to bottom and knows nothing of running
experiments, the public names are reachable as vqvae.NAME, and pyproject installs the three modules."""
import ast
import re

import pytest

import vqvae
from conftest import ROOT


def test_vqvae_reads_as_the_method_top_to_bottom():
    """vqvae.py: config -> its checking -> data -> model -> quantizers -> metrics -> training."""
    text = (ROOT / "vqvae.py").read_text()
    order = ["\nclass Config", "\ndef config_problems", "\ndef load_dataset", "\nclass VQVAE", "\nclass Quantizer",
             "\nQUANTIZERS = {", "\ndef compute_psnr", "\ndef train_epoch", "\ndef validate"]
    pos = [text.index(s) for s in order]
    assert pos == sorted(pos)


PLUMBING = {"wandb", "checkpoint", "checkpoints", "distributed", "torchrun", "signal", "sweep", "grid", "claim",
            "lock", "shard", "manifest", "rundir"}


def _words(identifier: str) -> set:
    """run_dir -> {run, dir, rundir}; RunClaim -> {run, claim, runclaim}; ResidualBlock -> {residual, block, ...}."""
    parts = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", identifier)]
    return set(parts) | {a + b for a, b in zip(parts, parts[1:])}


def _plumbing_identifiers(tree) -> list:
    """Identifiers (names, attributes, imports, definitions) outside the Config class that name plumbing."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Config":
            continue                            # the one config: its fields may name W&B or checkpoints
        for sub in ast.walk(node):
            ids = []
            if isinstance(sub, ast.Name):
                ids = [sub.id]
            elif isinstance(sub, ast.Attribute):
                ids = [sub.attr]
            elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                ids = [sub.name]
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                ids = [a.name for a in sub.names] + [getattr(sub, "module", None) or ""]
            found += [i for i in ids if _words(i) & PLUMBING]
    return found


def test_vqvae_knows_nothing_of_running_experiments():
    """No code for run directories, checkpoints, locks, signals, torchrun, W&B or sweeps in the method
    module; it reaches them only through the lazy re-export of the experiment and grid modules' names."""
    assert _plumbing_identifiers(ast.parse((ROOT / "vqvae.py").read_text())) == []
    assert "data_parallel" not in vars(vqvae.VQVAE(codebook_size=4, latent_dim=2, hidden_dim=2))


def test_the_plumbing_check_sees_plumbing():
    tree = ast.parse("import signal\ndef f(cfg):\n    return save_checkpoint(cfg.run_dir)\n")
    assert set(_plumbing_identifiers(tree)) == {"signal", "save_checkpoint", "run_dir"}


PUBLIC_API = ("VQVAE", "Config", "QUANTIZERS", "Quantizer", "make_config", "load_yaml_config", "load_dataset",
              "build_model", "setup_model", "train_epoch", "validate", "compute_perplexity", "compute_usage_rate",
              "compute_psnr", "ssim_per_image", "train", "resume_config", "load_run", "evaluate_run", "run_sweep",
              "grid_summary", "load_checkpoint", "BavqError", "TrainingInterrupted", "NonFiniteError", "SWEEP_KEYS")


@pytest.mark.parametrize("name", PUBLIC_API)
def test_the_public_api_is_reachable_as_vqvae_dot_name(name):
    assert getattr(vqvae, name) is not None
    assert name in dir(vqvae)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        vqvae.not_a_name
    with pytest.raises(AttributeError):
        vqvae._StopFlag                          # private names of the experiment module are not re-exported


def test_pyproject_makes_vqvae_an_installable_module():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert p["tool"]["setuptools"]["py-modules"] == ["vqvae", "vqvae_experiment", "vqvae_grid"]
    req = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(p["project"]["dependencies"]) == sorted(r for r in req if r)
