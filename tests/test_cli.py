"""The command line (train.py): flags are never abbreviated, and whatever a run cannot use is refused in one
paragraph, without a traceback and without writing anything."""
import os

import pytest

import vqvae
from conftest import TINY, cli_in_process, one_paragraph as _one_paragraph, run_cli, tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", [
    (["--quantizer", "vqq"], "invalid choice"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "0"], "lr must be > 0"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch_size", "-4"], "batch_size must be >= 1"),
    (["--codebook_size", "1"], "codebook_size must be >= 2"),
    (["--beta_start", "2", "--beta_end", "1"], "beta_end must be >= beta_start"),
    (["--epochs", "two"], "invalid int value"),
    (["--dataset", "folder", "--data_dir", "/nonexistent/dir"], "does not exist"),
])
def test_bad_input_is_one_clear_paragraph(tmp_path, args, expect, capsys, monkeypatch):
    r = cli_in_process([*TINY, "--out_dir", str(tmp_path), *args], capsys, tmp_path, monkeypatch)
    assert r.returncode == 2
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())                          # nothing written


@pytest.mark.slow
def test_cli_flags_are_not_abbreviated_and_an_unknown_flag_is_one_line(tmp_path, capsys, monkeypatch):
    r = run_cli(["--quant", "ba_vq"], cwd=tmp_path)          # as a process: the exit status a shell sees
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--help" in r.stderr and "usage" not in r.stderr
    r = cli_in_process(["--nope"], capsys, tmp_path, monkeypatch)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--help" in r.stderr and "usage" not in r.stderr
    r = cli_in_process(["--help"], capsys, tmp_path, monkeypatch)
    assert r.returncode == 0
    assert "a fix, 0 = the original code" in r.stdout and "{overwrite,copy}" in r.stdout and "--resume" in r.stdout


# --------------------------------------------------------------------------- every failure is one paragraph


@pytest.mark.parametrize("out_dir,name", [("/proc", "bavq_test"), ("/sys", "kernel")])
def test_an_unwritable_place_is_one_paragraph_and_touches_nothing(out_dir, name):
    if not os.path.isdir(out_dir):
        pytest.skip(f"{out_dir} does not exist here")
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.train(tiny_config(out_dir=out_dir, name=name))
    _one_paragraph(str(e.value))
    assert "--out_dir" in str(e.value)


@pytest.mark.parametrize("overrides,expect", [
    (dict(codebook_size=10**13), "Ran out of memory"),        # beyond any address space: fails at once
    (dict(val_subset=10**12), "Ran out of memory"),
])
def test_sizes_that_cannot_be_allocated_are_one_paragraph(tmp_path, overrides, expect):
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.train(tiny_config(out_dir=str(tmp_path), name="r", **overrides))
    _one_paragraph(str(e.value))
    assert expect in str(e.value) and not (tmp_path / "r" / vqvae.CLAIM_FILE).exists()


@pytest.mark.slow
def test_cuda_in_a_config_file_without_cuda_is_one_paragraph(tmp_path, capsys, monkeypatch):
    if vqvae.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.train(tiny_config(device="cuda:0", out_dir=str(tmp_path)))
    _one_paragraph(str(e.value))
    assert "--device cuda:0 was asked for" in str(e.value)
    # from a YAML file through the CLI, and cuda:N from the command line: the same paragraph, exit 2
    (tmp_path / "c.yaml").write_text('device: "cuda:0"\ndataset: fake\nwandb: false\n')
    for args in (["--config", str(tmp_path / "c.yaml")], ["--dataset", "fake", "--no_wandb", "--device", "cuda:1"]):
        r = cli_in_process([*args, "--out_dir", str(tmp_path / "o")], capsys, tmp_path, monkeypatch)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "was asked for" in r.stderr, r.stderr


def test_cuda_asked_for_says_whether_torch_is_a_cpu_build_or_finds_no_gpu(monkeypatch):
    """A CPU-only build and a CUDA build without a usable GPU get different advice."""
    monkeypatch.setattr(vqvae.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vqvae.torch.version, "cuda", None)
    with pytest.raises(vqvae.BavqError, match="is a CPU-only build. Install a CUDA build") as e:
        vqvae.pick_device("cuda")
    _one_paragraph(str(e.value))
    monkeypatch.setattr(vqvae.torch.version, "cuda", "12.4")
    with pytest.raises(vqvae.BavqError, match=r"a CUDA 12.4 build\) finds no usable GPU.*nvidia-smi and "
                                              "CUDA_VISIBLE_DEVICES") as e:
        vqvae.pick_device("cuda:1")
    assert "CPU-only" not in str(e.value)


@pytest.mark.parametrize("rank,printed", [(None, True), ("0", True), ("1", False), ("3", False)])
def test_under_torchrun_only_process_0_prints_a_configuration_error(monkeypatch, capsys, rank, printed):
    import train as cli
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert cli.main(["--dataset", "fake", "--lr", "-1"]) == 2          # every process exits 2
    err = capsys.readouterr().err
    assert ("lr must be > 0" in err) == printed and (err == "") != printed


# --------------------------------------------------------------------------- one pattern for flag names


def _flags(parser) -> dict:
    """{option string: its argparse action} of a parser."""
    return {s: a for a in parser._actions for s in a.option_strings}


RUN_CONTROL = {"-h", "--help", "--config", "--groups", "--shard", "--jobs", "--summarize"}   # train.py's own, not settings


def test_one_pattern_for_flag_names():
    """A flag that sets a Config field has the field's name in every script (several values: the same name with
    several arguments, as train.py's grids; train.py's booleans also --no_<field>); a script's own flags are named
    for what they do (evaluate.py's R(D) options with an rd_ prefix). benchmark.py keeps its older spellings
    (--quantizers, --codebook_sizes, --train_images, --val_images) as aliases of the field names."""
    import benchmark
    import train
    fields = set(vqvae.config_fields())
    train_flags = set(_flags(train.build_parser()))
    assert {f for f in train_flags if f[2:] not in fields and f.removeprefix("--no_") not in fields} == RUN_CONTROL
    bench = _flags(benchmark.build_parser())
    for field in ("quantizer", "codebook_size", "train_subset", "val_subset", "batch_size", "hidden_dim",
                  "latent_dim", "device", "dataset", "data_dir", "epochs"):
        assert f"--{field}" in bench, field
    for old, new in (("--quantizers", "--quantizer"), ("--codebook_sizes", "--codebook_size"),
                     ("--train_images", "--train_subset"), ("--val_images", "--val_subset")):
        assert bench[old] is bench[new]                                   # the same option
    a = benchmark.parse_args(["--quantizer", "fsq", "lfq", "--codebook_size", "64", "--train_subset", "128"])
    b = benchmark.parse_args(["--quantizers", "fsq", "lfq", "--codebook_sizes", "64", "--train_images", "128"])
    assert vars(a) == vars(b) and a.quantizers == ["fsq", "lfq"] and a.codebook_sizes == [64]
    import evaluate
    ev = set(_flags(evaluate.build_parser()))
    assert {f for f in ev if f[2:] not in fields} == {"-h", "--help", "--checkpoint", "--rate_distortion", "--rd_positions",
                                                     "--rd_alphabet", "--rd_repeats", "--rd_seed"}

