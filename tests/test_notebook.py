"""Specification of analyze.ipynb: it runs headless on real (tiny) runs and reports what the run files say."""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat (requirements-dev.txt)")
NotebookClient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (requirements-dev.txt)").NotebookClient

import vqvae
from conftest import ROOT, tiny_config

NOTEBOOK = ROOT / "analyze.ipynb"
QUANTIZERS = ("vq_ema", "ba_vq")
SEEDS = (0, 1)
K = 16
UNFINISHED = "crashed/ba_vq_k16_s2"
# Appended to the executed copy only: which interpreter ran the notebook and what it imported.
PROBE = 'import sys\nprint("PROBE", sys.prefix, "wandb" in sys.modules, "pandas" in sys.modules)'

pytestmark = pytest.mark.slow          # subprocesses and whole runs (deselect with -m "not slow")


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """Four real finished runs (2 quantizers x 2 seeds) and one unfinished run in a sub-folder."""
    out = tmp_path_factory.mktemp("nb") / "experiments"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and far faster on a busy 2-core machine
    try:
        for q in QUANTIZERS:
            for seed in SEEDS:
                vqvae.train(tiny_config(quantizer=q, codebook_size=K, seed=seed, epochs=2, checkpoint_every=0,
                                        out_dir=str(out), name=f"{q}_k{K}_s{seed}"))
        for q in QUANTIZERS:            # the R(D) analysis of one run per quantizer (notebook section 6)
            vqvae.evaluate_run(out / f"{q}_k{K}_s0", device="cpu",
                               rate_distortion={"positions": 1000, "alphabet_size": 32})
    finally:
        torch.set_num_threads(threads)
    # A run that crashed during epoch 2: config + one complete history line + a cut-off line, no final files.
    src, dst = out / f"ba_vq_k{K}_s0", out / UNFINISHED
    dst.mkdir(parents=True)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg.update(seed=2, name="ba_vq_k16_s2")
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    lines = (src / "history.jsonl").read_text().splitlines()
    (dst / "history.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    return out


def execute(experiments_dir: Path, workdir: Path, monkeypatch, via_env: bool = False):
    """Run analyze.ipynb headless on ``experiments_dir``, chosen by replacing the parameters cell, or with
    ``via_env`` by the environment variable BAVQ_EXPERIMENTS_DIR (the committed cell unchanged);
    returns (notebook, stdout text, n images)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    if via_env:
        monkeypatch.setenv("BAVQ_EXPERIMENTS_DIR", str(experiments_dir))
    else:
        monkeypatch.delenv("BAVQ_EXPERIMENTS_DIR", raising=False)
        params[0].source = f"EXPERIMENTS_DIR = {str(experiments_dir)!r}"
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    # A "python3" kernelspec that is this interpreter, ahead of any user-level one (JUPYTER_PATH comes first).
    spec = workdir / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(workdir / "jupyter"))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    probe = next(line.split() for line in text.splitlines() if line.startswith("PROBE"))
    assert probe[1:] == [sys.prefix, "False", "False"], probe  # same environment; W&B / pandas not needed
    return nb, text, images


def _markdown_table(text: str, first_header: str) -> tuple[list, list]:
    """(header, rows) of the markdown table whose header starts with ``first_header``: its contiguous lines."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} "))
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(split(ln))
    return split(lines[start]), rows


def parse_table(text: str) -> dict:
    """The final-metrics markdown table as {(quantizer, K): {column: cell}}."""
    header, rows = _markdown_table(text, "quantizer")
    table = {}
    for cells in rows:
        row = dict(zip(header, cells))
        table[(row["quantizer"], row["K"])] = row
    return table


def test_notebook_reports_real_runs(experiments, tmp_path, monkeypatch):
    _, text, images = execute(experiments, tmp_path, monkeypatch, via_env=True)
    assert "4 finished, 1 unfinished" in text
    assert "unfinished" in text and UNFINISHED in text

    table = parse_table(text)
    assert set(table) == {(q, str(K)) for q in QUANTIZERS}
    for q in QUANTIZERS:
        row = table[(q, str(K))]
        finals = [json.loads((experiments / f"{q}_k{K}_s{s}" / "final_metrics.json").read_text()) for s in SEEDS]
        assert row["n_seeds"] == str(len(SEEDS))  # the unfinished ba_vq run is not averaged in
        mean_psnr = statistics.fmean(f["psnr"] for f in finals)
        assert row["PSNR (dB)"].split("±")[0].strip() == f"{mean_psnr:.2f}", (row, mean_psnr)
        mean_ppl = statistics.fmean(f["perplexity"] for f in finals)
        assert row["perplexity"].split("±")[0].strip() == f"{mean_ppl:.2f}", (row, mean_ppl)
        mean_usage = statistics.fmean(100 * f["usage_rate"] for f in finals)
        assert row["usage %"].split("±")[0].strip() == f"{mean_usage:.1f}", (row, mean_usage)
        std_mse = statistics.stdev(f["mse"] for f in finals)
        assert row["val MSE"].split("±")[1].strip() == f"{std_mse:.4f}", (row, std_mse)
        mean_ssim = statistics.fmean(f["ssim"] for f in finals)
        assert row["SSIM"].split("±")[0].strip() == f"{mean_ssim:.4f}", (row, mean_ssim)
    # every other number the runs report is in the second table, one row per metric
    header, rows = _markdown_table(text, "metric")
    finals = [json.loads(p.read_text()) for p in experiments.glob("*/final_metrics.json")]
    reported = {k for f in finals for k, v in f.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = {"psnr", "ssim", "perplexity", "usage_rate", "mse", "bits_per_image", "train_perplexity",
             "train_usage_rate", "psnr_soft", "lpips", "rfid", "epoch"}
    assert {r[0] for r in rows} == reported - shown and "code_entropy_bits" in {r[0] for r in rows}

    # section 6: one row per run with rate_distortion.json, its numbers as in the file
    header, rows = _markdown_table(text, "run")
    assert sorted(r[0] for r in rows) == sorted(f"{q}_k{K}_s0" for q in QUANTIZERS)
    for cells in rows:
        row = dict(zip(header, cells))
        rd = json.loads((experiments / row["run"] / "rate_distortion.json").read_text())
        assert row["rate (bits/position)"] == f"{rd['run_measured']['rate_bits']:.3f}"
        g = rd["gaps"]["codebook"]
        assert row["rate gap: own codebook"] == f"{g['rate_bits']:+.3f} ± {g['rate_uncertainty_bits']:.3f}"
        assert row["rate gap: Gaussian"] == f"{rd['gaps']['gaussian']['rate_bits']:+.3f}"

    assert images >= 4  # curves, usage histograms, rate-distortion plot, R(D) of the latents


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [], f"cell {c.get('id')} has outputs: clear them before committing"
        assert c.execution_count is None, f"cell {c.get('id')} has an execution count"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert 'EXPERIMENTS_DIR = os.environ.get("BAVQ_EXPERIMENTS_DIR", "experiments")' in params[0].source


def test_notebook_without_runs_says_so(tmp_path, monkeypatch):
    empty = tmp_path / "experiments"
    empty.mkdir()
    _, text, images = execute(empty, tmp_path, monkeypatch)
    assert "No runs found" in text
    assert images == 0


def test_runs_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path, monkeypatch):
    """Two vq_ema K=16 runs with other inits are two rows, labelled by the setting that differs, and
    the rate-distortion plot still gets drawn."""
    out = tmp_path / "experiments"
    for init in ("uniform", "normal"):
        vqvae.train(tiny_config(quantizer="vq_ema", codebook_size=K, init=init, epochs=1, checkpoint_every=0,
                                out_dir=str(out), name=f"vq_{init}"))
    _, text, images = execute(out, tmp_path, monkeypatch)
    rows = [ln for ln in text.splitlines() if ln.strip().startswith("| vq_ema")]
    assert len(rows) == 2 and any("init=normal" in r for r in rows) and any("init=uniform" in r for r in rows)
    assert "Rows differ in: init" in text
    assert images >= 3
