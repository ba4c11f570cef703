"""The modules: vqvae.py reads as the method top to bottom, in the order its docstring gives, and knows nothing of
running experiments; beside it vqvae_fused.py (BA-VQ's fast path), vqvae_experiment.py, vqvae_grid.py and
vqvae_analysis.py; the public names are reachable as vqvae.NAME (and only those); the library's own modules and
scripts import what they use from where it is defined, no private name across modules; nothing outside a
quantizer probes a quantizer's class; pyproject installs the five modules."""
import ast
import re

import pytest

import vqvae
from conftest import ROOT


SECTION = re.compile(r"^# =+\n# (.+)\n# =+$", re.M)


def test_vqvae_reads_as_the_method_top_to_bottom():
    """vqvae.py: config -> model (by about line 300) -> quantizers -> metrics -> training -> data -> config checking
    and YAML, as its sections and its docstring say, each name where its section is."""
    text = (ROOT / "vqvae.py").read_text()
    sections = SECTION.findall(text)
    assert sections == ["config", "model", "quantizers", "metrics", "training", "data", "config checking and YAML"]
    doc = vqvae.__doc__
    assert [doc.index(f"\n    {s}") for s in sections] == sorted(doc.index(f"\n    {s}") for s in sections)
    order = ["\nclass Config", "\nclass VQVAE", "\nclass Quantizer", "\nQUANTIZERS = {", "\ndef compute_psnr",
             "\ndef train_epoch", "\ndef validate", "\ndef load_dataset", "\ndef config_problems",
             "\ndef load_yaml_config"]
    pos = [text.index(s) for s in order]
    assert pos == sorted(pos)
    assert text[:text.index("\nclass VQVAE")].count("\n") < 300


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
    with pytest.raises(AttributeError):
        vqvae.json                               # nor what the modules beside it import
    with pytest.raises(AttributeError):
        vqvae.signal


def test_pyproject_makes_vqvae_an_installable_module():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert p["tool"]["setuptools"]["py-modules"] == ["vqvae", "vqvae_fused", "vqvae_experiment", "vqvae_grid",
                                                     "vqvae_analysis"]
    req = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(p["project"]["dependencies"]) == sorted(r for r in req if r)


LIBRARY = ["vqvae.py", "vqvae_fused.py", "vqvae_experiment.py", "vqvae_grid.py", "vqvae_analysis.py"]
SCRIPTS = ["train.py", "evaluate.py", "benchmark.py", "tools/golden_runs.py", "tools/frontier_table.py"]


def _imports_and_uses(path):
    tree = ast.parse((ROOT / path).read_text())
    private = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and (n.module or "").startswith("vqvae") for a in n.names if a.name.startswith("_")]
    via_vqvae = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == "vqvae"}
    return private, via_vqvae


@pytest.mark.parametrize("path", LIBRARY[1:] + SCRIPTS)
def test_the_librarys_own_code_imports_what_it_uses_from_where_it_is_defined(path):
    """``vqvae.NAME`` only for names vqvae.py defines (the lazy re-export is for notebooks: grep and
    go-to-definition do not see it), and no private name of another module."""
    private, via_vqvae = _imports_and_uses(path)
    assert private == []
    assert sorted(n for n in via_vqvae if n not in vars(vqvae) and not n.startswith("__")) == []


def test_the_import_check_sees_a_hidden_route(tmp_path):
    (tmp_path / "x.py").write_text("import vqvae\nfrom vqvae_experiment import _StopFlag\nvqvae.train(None)\n")
    private, via = _imports_and_uses(tmp_path / "x.py")              # ROOT / an absolute path is that path
    assert private == ["vqvae_experiment._StopFlag"] and "train" in via and "train" not in vars(vqvae)


def _class_probes(tree, names: bool = True) -> list:
    """isinstance/issubclass/type() tests against a quantizer class or its codebook's, and (``names``)
    comparisons with a quantizer's name (``cfg.quantizer == "ba_vq"``), outside the quantizer classes themselves."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Quantizer"):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and getattr(sub.func, "id", None) in ("isinstance", "issubclass", "type"):
                names = {getattr(a, "id", getattr(a, "attr", getattr(a, "value", ""))) for a in ast.walk(sub)
                         if isinstance(a, (ast.Name, ast.Attribute, ast.Constant))}
                names = {n for n in names if isinstance(n, str)}
                if any(n.endswith("Quantizer") and n != "Quantizer" for n in names) or "codebook" in names:
                    found.append(ast.unparse(sub))
            if names and isinstance(sub, ast.Compare):
                sides = [sub.left, *sub.comparators]
                if (any(isinstance(s, ast.Attribute) and s.attr in ("quantizer", "quantizer_type") for s in sides)
                        and any(isinstance(s, ast.Constant) and s.value in vqvae.QUANTIZERS for s in sides)):
                    found.append(ast.unparse(sub))
    return found


@pytest.mark.parametrize("path", LIBRARY + SCRIPTS)
def test_nothing_outside_a_quantizer_probes_its_class_or_name(path):
    assert _class_probes(ast.parse((ROOT / path).read_text())) == []


def test_no_test_probes_a_quantizers_class():
    """Tests state behaviour through the contract (a test may still name the quantizer it configures)."""
    probes = {p.name: _class_probes(ast.parse(p.read_text()), names=False) for p in sorted((ROOT / "tests").glob("*.py"))}
    assert {k: v for k, v in probes.items() if v} == {}


def test_the_probe_check_sees_probes():
    tree = ast.parse("def f(q, cfg):\n    if isinstance(q, BAQuantizer) or cfg.quantizer == 'ba_vq':\n"
                     "        return isinstance(getattr(q, 'codebook', None), P)\n")
    assert len(_class_probes(tree)) == 3


TRACKER = re.compile(r"\b[Ii]ssues? \d+")       # "issue 23", "Issue 24's": our tracker, which a reader does not have


def _tracker_mentions(root) -> list:
    """'file:line' of every mention of a tracker number in the project's text files (code, docs, configs, scripts).
    Another project's public tracker is cited with its repository and '#' (encodec issue #61), which is allowed."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (not path.is_file() or rel.parts[0] in (".git", ".venv", "data", "experiments", "results")
                or path.suffix not in (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".ipynb", "")):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if TRACKER.search(line) and "TRACKER" not in line:
                found.append(f"{rel}:{i}")
    return found


def test_no_tracker_numbers_anywhere_in_the_project(tmp_path):
    assert _tracker_mentions(ROOT) == []
    (tmp_path / "a.md").write_text("as iss" "ue 23 asked\nencodec issue #61\n")           # split: not a mention here
    assert _tracker_mentions(tmp_path) == ["a.md:1"]
