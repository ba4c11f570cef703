"""Configuration: defaults, precedence of defaults, YAML and flags, strict keys, types and values, and the
shipped config files."""
import re
import math
import subprocess
import sys

import pytest
import yaml

import vqvae
import train as cli
from conftest import ROOT, cli_in_process, tiny_config


def test_defaults_are_the_original_code_settings():
    c = vqvae.Config()
    assert (c.quantizer, c.codebook_size, c.latent_dim, c.hidden_dim) == ("vq_ema", 512, 256, 128)
    assert (c.commitment_cost, c.decay, c.epsilon) == (0.25, 0.99, 1e-5)
    assert (c.beta_start, c.beta_end, c.ba_iterations, c.entropy_cost, c.codebook_cost) == (0.1, 5.0, 5, 0.01, 1.0)
    assert (c.lr, c.batch_size, c.dataset, c.data_dir) == (3e-4, 256, "cifar10", "./data")


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 3e-3\nquantizer: ba_vq\nwandb: false\n")
    cfg = cli.config_from_args(["--config", str(f), "--epochs", "9"])
    assert cfg.epochs == 9            # flag beats YAML
    assert cfg.lr == 3e-3             # YAML beats default ("3e-3" read by YAML 1.1 as a string)
    assert cfg.quantizer == "ba_vq"
    assert cfg.wandb is False
    assert cfg.batch_size == 256      # default
    assert cli.config_from_args(["--no_wandb"]).wandb is False
    assert cli.config_from_args(["--overwrite"]).overwrite is True


@pytest.mark.parametrize("path", ["config.yaml", "config_mac.yaml", "configs/original_code.yaml",
                                  "configs/vqwae_sqvae.yaml", "configs/cvq_vae.yaml", "configs/quickstart.yaml"])
def test_shipped_config_files_are_valid(path):
    cfg = cli.config_from_args(["--config", str(ROOT / path)])
    assert cfg.epochs >= 1


@pytest.mark.parametrize("path,expect", [
    ("configs/original_code.yaml", dict(codebook_size=512, latent_dim=256, batch_size=256, epochs=100, lr=3e-4)),
    ("configs/vqwae_sqvae.yaml", dict(codebook_size=512, latent_dim=64, batch_size=32, epochs=100, lr=1e-3)),
    ("configs/cvq_vae.yaml", dict(codebook_size=512, latent_dim=64, batch_size=1024, epochs=500, lr=3e-4,
                                  cosine=True)),
])
def test_published_protocols_say_what_the_papers_used(path, expect):
    cfg = cli.config_from_args(["--config", str(ROOT / path)])
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == [   # the protocols, and the reduced one's
        "cvq_vae.yaml", "frontier_reduced.yaml", "ladder_ba_gap.yaml", "original_code.yaml", "quickstart.yaml", "reduced.yaml", "reduced_ba_vq_best.yaml",
        "reduced_ecvq.yaml", "reduced_vq_ema_best.yaml", "reduced_vq_ema_full_usage.yaml", "vqwae_sqvae.yaml"]


def test_the_ecvq_rung_is_vq_ema_best_plus_the_rate_term():
    """configs/reduced_ecvq.yaml, the first rung of BA-VQ's gap ladder, changes exactly the quantizer (and sets
    its lam): every other setting is configs/reduced_vq_ema_best.yaml's."""
    ecvq, best = (vqvae.load_yaml_config(ROOT / "configs" / f) for f in ("reduced_ecvq.yaml", "reduced_vq_ema_best.yaml"))
    assert {k: v for k, v in ecvq.items() if k not in ("quantizer", "ecvq_lambda")} == {k: v for k, v in best.items() if k != "quantizer"}
    assert (ecvq["quantizer"], best["quantizer"]) == ("ecvq", "vq_ema")


LADDER_STEPS = {           # rung: what it changes from the rung before it (the gap ladder, configs/ladder_ba_gap.yaml)
    "r1_rate_term": {"quantizer": ("vq_ema", "ecvq")},
    "r2_in_ba_code": {"quantizer": ("ecvq", "ba_vq")},
    "r3_batch_prior": {"ba_prior": ("ema", "batch"), "ba_iterations": (1, 5)},
    "r4_soft_assignment": {"ba_assignment": ("hard", "soft")},
    "r5_soft_ema": {"ba_codebook_update": ("ema_hard", "ema")},
    "r6_entropy_loss": {"entropy_cost": (0.0, 0.01)},
    "r7_relative_schedule": {"ba_temperature": ("absolute", "relative"), "beta_start": (250.0, 200.0),
                             "beta_end": (250.0, 2000.0)},
    "r8_copy_smoothing": {"ema_smoothing": ("overwrite", "copy")},
}


def test_the_gap_ladder_goes_from_vq_ema_best_to_ba_vq_best_one_factor_a_rung():
    """configs/ladder_ba_gap.yaml: its first rung is configs/reduced_vq_ema_best.yaml and its last
    configs/reduced_ba_vq_best.yaml, setting for setting, and each rung changes only its factor (the settings a
    quantizer does not read are left out of the comparison; ECVQ's lam is 1/beta of the BA rungs)."""
    import dataclasses
    import inspect
    configs, sweep = cli.configs_from_args(["--config", str(ROOT / "configs/ladder_ba_gap.yaml"), "--seed", "3"])
    assert sweep and len(configs) == 9
    rungs = {c.wandb_group.removeprefix("ladder_"): dataclasses.asdict(c) for c in configs}   # <grid>_<rung>
    assert list(rungs) == ["r0_vq_ema_best"] + list(LADDER_STEPS)
    for rung, protocol in (("r0_vq_ema_best", "reduced_vq_ema_best"), ("r8_copy_smoothing", "reduced_ba_vq_best")):
        ref = dataclasses.asdict(cli.config_from_args(["--config", str(ROOT / f"configs/{protocol}.yaml"), "--seed", "3"]))
        assert {k: v for k, v in rungs[rung].items() if ref[k] != v} == {"name": rungs[rung]["name"],
                                                                        "wandb_group": rungs[rung]["wandb_group"]}
    def read_by(q):
        return set(inspect.signature(vqvae.QUANTIZERS[q].__init__).parameters)
    quantizer_fields = set().union(*map(read_by, vqvae.QUANTIZERS))
    names = list(rungs)
    for before, rung in zip(names, names[1:]):
        a, b = rungs[before], rungs[rung]
        both = read_by(a["quantizer"]) & read_by(b["quantizer"])
        changed = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in ("name", "wandb_group")
                   and (k not in quantizer_fields or k in both)}
        assert changed == LADDER_STEPS[rung], rung
    assert rungs["r1_rate_term"]["ecvq_lambda"] == pytest.approx(1.0 / rungs["r2_in_ba_code"]["beta_start"])


@pytest.mark.parametrize("group, protocol, flags", [
    ("vq_ema_best", "reduced_vq_ema_best", []),
    ("ba_vq_best", "reduced_ba_vq_best", []),
    ("ba_vq_best_beta1000", "reduced_ba_vq_best", ["--beta_start", "100", "--beta_end", "1000"]),
    ("ecvq_lam0.01", "reduced_ecvq", ["--ecvq_lambda", "0.01"]),
    ("vq_ema", "reduced", []),
    ("ibq", "reduced", ["--quantizer", "ibq"]),
    ("fsq_8x5x5", "reduced", ["--quantizer", "fsq", "--fsq_levels", "8", "5", "5", "--codebook_size", "200"]),
    ("optvq_eps10", "reduced", ["--quantizer", "optvq", "--optvq_heads", "1", "--optvq_eval", "nearest"]),
])
def test_the_frontier_grid_is_the_protocols_with_what_sets_the_rate(group, protocol, flags):
    """configs/frontier_reduced.yaml: each group is its protocol file with the flags that set its rate, as a sweep
    named <group> (the run names of the frontier measured before it was a grid config)."""
    import dataclasses
    configs, _ = cli.configs_from_args(["--config", str(ROOT / "configs/frontier_reduced.yaml"), "--groups", group])
    for cfg in configs:
        K = ["--codebook_size", str(cfg.codebook_size)] if "--codebook_size" not in flags else []
        ref, _ = cli.configs_from_args(["--config", str(ROOT / f"configs/{protocol}.yaml"), *flags, *K,
                                        "--seed", str(cfg.seed), "99", "--name", group])
        assert dataclasses.asdict(cfg) == dataclasses.asdict(ref[0])
        assert cfg.name == f"{group}_{cfg.quantizer}_k{cfg.codebook_size}_s{cfg.seed}"


def test_mac_config_is_quick():
    cfg = cli.config_from_args(["--config", str(ROOT / "config_mac.yaml")])
    assert (cfg.epochs, cfg.batch_size, cfg.codebook_size) == (3, 64, 256)
    assert (cfg.train_subset, cfg.val_subset, cfg.hidden_dim, cfg.latent_dim) == (10000, 2000, 64, 64)


def test_the_quick_start_is_small_and_runs_ba_vq_and_vq_ema_with_its_remedies(tmp_path):
    """configs/quickstart.yaml (README's first command): BA-VQ with the reduced protocol's best BA options on a
    small model and 6,000 / 1,000 images for 3 epochs; the same file trains VQ-EMA with --quantizer vq_ema."""
    cfg = cli.config_from_args(["--config", str(ROOT / "configs/quickstart.yaml")])
    assert (cfg.quantizer, cfg.epochs, cfg.train_subset, cfg.val_subset) == ("ba_vq", 3, 6000, 1000)
    assert (cfg.hidden_dim, cfg.latent_dim, cfg.codebook_size, cfg.name) == (32, 32, 256, "quickstart")
    best = vqvae.load_yaml_config(ROOT / "configs/reduced_ba_vq_best.yaml")
    options = ("init", "dead_code_threshold", "ba_codebook_update", "ba_decoder_input", "ba_temperature",
               "beta_start", "beta_end", "ema_smoothing")
    assert {k: getattr(cfg, k) for k in options} == {k: best[k] for k in options}
    for q in ("ba_vq", "vq_ema"):
        run = cli.config_from_args(["--config", str(ROOT / "configs/quickstart.yaml"), "--quantizer", q,
                                    "--dataset", "fake", "--train_subset", "64", "--val_subset", "32", "--epochs", "1",
                                    "--out_dir", str(tmp_path), "--name", q, "--no_wandb", "--no_progress"])
        assert math.isfinite(vqvae.train(run)["psnr"])


REDUCED = sorted((ROOT / "configs").glob("reduced*.yaml"))


def test_the_reduced_configs_exist():
    assert {p.name for p in REDUCED} >= {"reduced.yaml", "reduced_vq_ema_best.yaml", "reduced_ba_vq_best.yaml",
                                         "reduced_vq_ema_full_usage.yaml"}


@pytest.mark.parametrize("path", REDUCED, ids=lambda p: p.name)
def test_reduced_config_loads_validates_and_runs_one_step(path, tmp_path):
    """The protocol's model, codebook and optimiser settings exactly; generated images stand in for
    CIFAR-10, one training step and a small validation."""
    given = vqvae.load_yaml_config(path)
    cfg = vqvae.make_config({**given, "dataset": "fake", "train_subset": given.get("batch_size", 128),
                             "val_subset": 64, "epochs": given.get("pretrain_epochs", 0) + 1,
                             "out_dir": str(tmp_path), "wandb": False, "progress": False, "device": "cpu"}).validate()
    assert (cfg.codebook_size, cfg.latent_dim, cfg.hidden_dim, cfg.batch_size, cfg.lr) == (512, 64, 64, 128, 1e-3)
    m = vqvae.train(cfg)
    assert math.isfinite(m["psnr"]) and m["psnr"] > 0


def test_unknown_key_is_an_error_listing_valid_keys():
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.make_config({"learning_rate": 1e-3}, source="x.yaml")
    msg = str(e.value)
    assert "learning_rate" in msg and "x.yaml" in msg and "lr" in msg and "codebook_size" in msg


@pytest.mark.parametrize("key,value", [("epochs", "ten"), ("epochs", 2.5), ("lr", "fast"),
                                       ("wandb", "yes"), ("quantizer", 3), ("batch_size", True)])
def test_wrong_type_is_an_error(key, value):
    with pytest.raises(vqvae.BavqError, match=key):
        vqvae.make_config({key: value})


@pytest.mark.parametrize("key,value", [("lr", 0.0), ("lr", -1e-3), ("epochs", 0), ("batch_size", 0),
                                       ("codebook_size", 1), ("beta_start", 6.0), ("ba_iterations", 0),
                                       ("decay", 1.0), ("epsilon", 0.0), ("quantizer", "vqq"),
                                       ("dataset", "imagenet")])
def test_bad_values_are_errors(key, value):
    with pytest.raises(vqvae.BavqError, match=key):
        vqvae.make_config({key: value}).validate()


@pytest.mark.parametrize("key", ["beta_end", "lr", "vq_loss_warmup_epochs", "grad_clip"])
def test_non_finite_config_values_are_errors(key):
    with pytest.raises(vqvae.BavqError, match=f"{key} must be a finite number"):
        vqvae.make_config({key: float("inf")}).validate()


@pytest.mark.parametrize("overrides,expect", [
    (dict(seed=2**64), "seed must be in"),
    (dict(name=" "), "must not be blank"),
    (dict(name="x" * 300), "bytes long"),
])
def test_values_a_run_cannot_use_are_config_errors(overrides, expect):
    with pytest.raises(vqvae.BavqError, match=expect):
        tiny_config(**overrides)


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(vqvae.BavqError, match="mapping"):
        cli.config_from_args(["--config", str(f)])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_yaml_file_is_an_error(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(vqvae.BavqError, match=r"is empty \(or only comments\), so it sets nothing"):
        vqvae.load_yaml_config(f)


def test_messages_agree_in_number_and_article():
    """One remedy 'applies', two 'apply'; 'an int value', 'a float value'."""
    with pytest.raises(vqvae.BavqError, match="init applies to codebook quantizers"):
        tiny_config(quantizer="fsq", init="normal")
    with pytest.raises(vqvae.BavqError, match="init, cosine apply to codebook quantizers"):
        tiny_config(quantizer="fsq", init="normal", cosine=True)
    with pytest.raises(vqvae.BavqError, match="cvq acts on a codebook learned by gradient"):
        tiny_config(quantizer="vq_ema", cvq=True)
    with pytest.raises(vqvae.BavqError, match="Change it to an int value"):
        vqvae.make_config({"epochs": "3"})
    with pytest.raises(vqvae.BavqError, match="Change it to a float value"):
        vqvae.make_config({"lr": "fast"})


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-3\nepochs: 3\nlr: 2.0e-3\n")
    with pytest.raises(vqvae.BavqError, match="'lr' more than once"):
        vqvae.load_yaml_config(f)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_cli_errors_are_one_paragraph_without_traceback(tmp_path, capsys, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("epochz: 3\n")
    r = cli_in_process(["--config", str(f)], capsys, tmp_path, monkeypatch)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "epochz" in r.stderr and "Valid keys" in r.stderr
    r = cli_in_process(["--quantizer", "nope"], capsys, tmp_path, monkeypatch)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = cli_in_process(["--dataset", "folder", "--data_dir", str(tmp_path / "missing"), "--no_wandb"], capsys, tmp_path, monkeypatch)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "experiments").exists()      # nothing written for a run that could not start


def test_resolved_config_roundtrips_through_yaml():
    cfg = vqvae.make_config({"quantizer": "ba_vq", "lr": 1e-3})
    again = vqvae.make_config(yaml.safe_load(vqvae.config_to_yaml(cfg)))
    assert again == cfg


def test_fsq_levels_alone_set_the_codebook_size():
    """--fsq_levels 4 4 2 alone: K = 32 (the product); both given and disagreeing: an error that
    lists the FSQ paper's level sets; the default levels 8 8 8 give K = 512."""
    assert cli.config_from_args(["--quantizer", "fsq", "--fsq_levels", "4", "4", "2"]).codebook_size == 32
    assert cli.config_from_args(["--quantizer", "fsq"]).codebook_size == 512
    assert cli.config_from_args(["--quantizer", "fsq", "--fsq_levels", "4", "4", "2", "--codebook_size", "32"]).codebook_size == 32
    with pytest.raises(vqvae.BavqError, match=r"give 32 codes but codebook_size is 64 .*8 5 5 5"):
        cli.config_from_args(["--quantizer", "fsq", "--fsq_levels", "4", "4", "2", "--codebook_size", "64"])
    assert vqvae.make_config({"quantizer": "fsq", "fsq_levels": [5, 3]}).codebook_size == 15
    assert cli.config_from_args(["--quantizer", "vq_ema"]).codebook_size == 512     # others: the default K


@pytest.mark.parametrize("kwargs, says", [
    (dict(quantizer_type="ba_vq", ba_impl="bogus"), "ba_impl 'bogus' is unknown (choose from fused, autograd)"),
    (dict(quantizer_type="vq", cvq=True, cvq_anchor="nearest"), "cvq_anchor 'nearest' is unknown"),
    (dict(quantizer_type="vq_ema", init="zeros"), "init 'zeros' is unknown"),
    (dict(quantizer_type="rvq", rvq_codebook="lucidrains"), "rvq_codebook 'lucidrains' is unknown"),
    (dict(quantizer_type="lfq", codebook_size=48), "power of two"),
    (dict(quantizer_type="fsq", codebook_size=100), "fsq_levels [8, 8, 8] give 512 codes but codebook_size is 100"),
    (dict(quantizer_type="sq_vae", sq_temperature_init=0.0), "sq_temperature_init must be > 0"),
    (dict(quantizer_type="vq_ema", decay=1.0), "decay must be in [0, 1)"),
    (dict(quantizer_type="nope"), "quantizer 'nope' is unknown"),
])
def test_a_model_built_in_a_notebook_is_checked_by_the_same_rules_as_a_run(kwargs, says):
    """VQVAE(...) applies the Config fields' rules (setting) and the quantizer's config_problems, the very rules a
    run's config is checked by (one place for each rule; constructors do not check again): one paragraph."""
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.VQVAE(**{"codebook_size": 16, "latent_dim": 8, "hidden_dim": 8, **kwargs})
    assert says in str(e.value) and "VQVAE(...)" in str(e.value) and "\n" not in str(e.value)
    cfg_keys = {"quantizer" if k == "quantizer_type" else k: v for k, v in {"codebook_size": 16, **kwargs}.items()}
    with pytest.raises(vqvae.BavqError, match=re.escape(says)):
        vqvae.make_config(cfg_keys).validate()                      # the same sentence for a run
