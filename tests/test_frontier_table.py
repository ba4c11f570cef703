"""The table and plot of the equal-rate frontier (vqvae_analysis; docs/results.md): which runs it pools, the rate it
reports (log2 of the validation perplexity), and the lines of its plot; tools/frontier_table.py prints the report."""
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

import vqvae_analysis as A


def fake_run(root: Path, name: str, quantizer: str, K: int, psnr: float, perplexity: float, finished=True,
             config=None, **metrics):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"quantizer": quantizer, "codebook_size": K, **(config or {})}))
    if finished:
        (run / "final_metrics.json").write_text(json.dumps({"psnr": psnr, "perplexity": perplexity, **metrics}))


@pytest.mark.parametrize("key, fam, pt", [
    ("vq_ema_best_vq_ema_k512", "vq_ema_best_vq_ema", "512"),
    ("ibq_ibq_k64", "ibq_ibq", "64"),
    ("fsq_8x5x5_fsq_k200", "fsq_fsq", "8x5x5"),          # the levels set the rate: one line over level sets
    ("fsq_8x5x5x5_fsq_k1000", "fsq_fsq", "8x5x5x5"),
    ("ba_vq_best_beta1000_ba_vq_k512", "ba_vq_best_beta_ba_vq", "beta 1000"),   # one line over beta ranges
    ("ecvq_lam0.01_ecvq_k512", "ecvq_lam_ecvq", "lam 0.01"),                    # one line over ECVQ's lam
    ("ecvq_lam1e-3_ecvq_k1024", "ecvq_lam_ecvq", "lam 1e-3"),
    ("optvq_eps10_optvq_k256", "optvq_eps_optvq", "eps 10"),                   # and over OptVQ's eps
])
def test_a_group_belongs_to_the_line_of_what_sets_its_rate(key, fam, pt):
    assert A.frontier_family(key) == fam
    assert A.frontier_point(key, {"K": int(key.rsplit("_k", 1)[1])}) == pt


def test_seeds_are_pooled_across_folders_and_the_rate_is_log2_of_the_perplexity(tmp_path):
    fake_run(tmp_path / "a", "vq_ema_best_vq_ema_k512_s0", "vq_ema", 512, 22.0, 256.0)
    fake_run(tmp_path / "a", "vq_ema_best_vq_ema_k512_s1", "vq_ema", 512, 23.0, 512.0)
    fake_run(tmp_path / "b", "vq_ema_best_vq_ema_k512_s3", "vq_ema", 512, 24.0, 1024.0)
    fake_run(tmp_path / "a", "ibq_ibq_k64_s0", "ibq", 64, 19.0, 32.0)
    fake_run(tmp_path / "a", "ibq_ibq_k64_s1", "ibq", 64, 0.0, 0.0, finished=False)   # unfinished: left out, counted
    found, unfinished = A.frontier_groups([tmp_path / "a", tmp_path / "b"])
    assert unfinished == 1
    assert sorted(found) == ["ibq_ibq_k64", "vq_ema_best_vq_ema_k512"]
    assert len(found["vq_ema_best_vq_ema_k512"]["runs"]) == 3
    text = A.frontier_table(found, unfinished)
    bits = [8.0, 9.0, 10.0]                                   # log2 of 256, 512, 1024
    row = next(line for line in text.splitlines() if "vq_ema_best_vq_ema_k512" in line)
    assert f"| 23.00 ± {statistics.stdev([22.0, 23.0, 24.0]):.2f} |" in row
    assert f"| 9.00 ± {statistics.stdev(bits):.2f} | 576.00 ± {64 * statistics.stdev(bits):.2f} |" in row
    assert "| `ibq_ibq_k64` (1) | ibq | 64 | 19.00 | 32.00 | 5.00 | 320.00 |" in text
    assert "4 finished runs, 1 unfinished." in text


def test_bits_per_image_are_the_runs_own_when_recorded(tmp_path):
    # a run of 16 latent positions per image (a 4 x 4 grid): 5 bits per position are 80 bits per image, not 320
    fake_run(tmp_path, "fsq_4x4x4_fsq_k64_s0", "fsq", 64, 20.0, 32.0, bits_per_image=80.0)
    found, _ = A.frontier_groups([tmp_path])
    assert "| 5.00 | 80.00 |" in A.frontier_table(found, 0)


def test_the_share_of_variance_leaves_out_a_run_whose_latents_do_not_vary():
    rd = lambda distortion, eig: {"run": {"distortion": distortion}, "covariance_eigenvalues": eig}
    assert A.frontier_share_of_variance([rd(1.0, [3.0, 1.0]), rd(2.0, [4.0])]) == "0.38 ± 0.18"
    assert A.frontier_share_of_variance([rd(1.0, [3.0, 1.0]), rd(1e-5, [0.0, 0.0])]) == \
        "0.25 (1 of 2 without latent variance)"
    assert A.frontier_share_of_variance([rd(1e-5, [0.0])]) == "(1 of 1 without latent variance)"


def test_the_plot_is_written(tmp_path):
    for s, (psnr, ppl) in enumerate([(20.0, 100.0), (20.5, 120.0)]):
        fake_run(tmp_path, f"fsq_8x5x5_fsq_k200_s{s}", "fsq", 200, psnr, ppl)
        fake_run(tmp_path, f"fsq_4x4x4_fsq_k64_s{s}", "fsq", 64, psnr - 1, ppl / 2)
    found, _ = A.frontier_groups([tmp_path])
    out = tmp_path / "frontier.png"
    A.frontier_plot(found, [tmp_path], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equal_rate_difference_interpolates_the_reference_linearly_in_rate_with_its_standard_error(tmp_path):
    # reference frontier: 20 dB at 4 bits (perplexity 16, SE 1), 23 dB at 6 bits (64, SE 2); means over two seeds
    for s, psnr in enumerate([19.0, 21.0]):
        fake_run(tmp_path, f"vq_ema_best_vq_ema_k64_s{s}", "vq_ema", 64, psnr, 16.0)
    for s, psnr in enumerate([21.0, 25.0]):
        fake_run(tmp_path, f"vq_ema_best_vq_ema_k512_s{s}", "vq_ema", 512, psnr, 64.0)
    # a group at 5 bits (t = 1/2): the reference there is 21.5 dB with SE hypot(1/2 * 1, 1/2 * 2); its own SE is 1/2
    for s, psnr in enumerate([22.0, 23.0]):
        fake_run(tmp_path, f"fsq_8x5x5_fsq_k200_s{s}", "fsq", 200, psnr, 32.0)
    fake_run(tmp_path, "ibq_ibq_k1024_s0", "ibq", 1024, 19.0, 128.0)     # 7 bits: outside the reference's range
    found, _ = A.frontier_groups([tmp_path])
    text = A.equal_rate_table(found, "vq_ema_best_vq_ema")
    assert f"| `fsq_8x5x5_fsq_k200` (2) | 5.00 | 22.50 | 21.50 | +1.00 ± {math.hypot(0.5, math.hypot(0.5, 1.0)):.2f} |" in text
    rows = text.splitlines()[2:]
    assert len(rows) == 1 and "ibq" not in text                        # the reference's own groups are not rows
    assert A._at_rate(A.frontier_points(found, "vq_ema_best_vq_ema"), 4.5) == (20.75, math.hypot(0.75 * 1, 0.25 * 2))


def test_the_script_prints_the_librarys_report(tmp_path):
    """tools/frontier_table.py only calls the library: its output is ``frontier_report``'s, the plot included."""
    import subprocess
    import sys
    for q, K, psnr, ppl in (("vq_ema", 16, 20.0, 8.0), ("vq_ema", 64, 21.0, 32.0)):
        fake_run(tmp_path / "runs", f"vq_ema_best_{q}_k{K}_s0", q, K, psnr, ppl)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "frontier_table.py"), str(tmp_path / "runs"), "--plot",
                        str(tmp_path / "f.png")], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == A.frontier_report([tmp_path / "runs"], tmp_path / "f.png") + "\n"
    assert (tmp_path / "f.png").stat().st_size > 0


def test_another_reference_family_and_a_missing_one(tmp_path):
    """--reference NAME sets the family every group is compared with at equal rate; a family that has no runs
    there is a one-paragraph error naming the families that do (the default reference is simply left out)."""
    import vqvae
    for K, psnr, ppl in ((16, 20.0, 8.0), (64, 21.0, 32.0)):
        fake_run(tmp_path / "runs", f"fsq_fsq_k{K}_s0", "fsq", K, psnr, ppl)
    fake_run(tmp_path / "runs", "ecvq_lam0.1_ecvq_k64_s0", "ecvq", 64, 20.9, 16.0)
    text = A.frontier_report([tmp_path / "runs"], reference="fsq_fsq")
    assert "against the `fsq_fsq` frontier" in text and "| `ecvq_lam0.1_ecvq_k64` (1) |" in text
    assert "At equal rate" not in A.frontier_report([tmp_path / "runs"])          # the default reference is absent
    with pytest.raises(vqvae.BavqError, match="No runs of the reference family 'vq_ema_best_vq_ema'.*fsq_fsq") as e:
        A.frontier_report([tmp_path / "runs"], reference="vq_ema_best_vq_ema")
    assert "\n" not in str(e.value)


def test_several_codes_per_position_are_rated_by_the_sum_of_their_entropies_and_marked(tmp_path):
    """A run whose positions carry several codes (final metrics with combined_entropy_bits: residual VQ, OptVQ with
    heads) is placed at code_entropy_bits, the sum of the slots' entropies, not at log2 of the perplexity over all
    (slot, code) pairs; its row is marked † and the note says what the rate is."""
    fake_run(tmp_path, "optvq_heads4_optvq_k512_s0", "optvq", 512, 24.0, 300.0, code_entropy_bits=30.0,
             combined_entropy_bits=20.0, bits_per_image=1920.0, config={"optvq_eval": "nearest"})
    fake_run(tmp_path, "vq_ema_best_vq_ema_k512_s0", "vq_ema", 512, 22.0, 256.0, code_entropy_bits=7.999)
    found, _ = A.frontier_groups([tmp_path])
    text = A.frontier_table(found, 0)
    assert "| `optvq_heads4_optvq_k512` (1)† | optvq | 512 | 24.00 | 300.00 | 30.00 | 1920.00 |" in text
    assert "| 8.00 | 512.00 |" in text                              # one code per position: log2 of the perplexity
    assert "† several codes per position" in text and "‡" not in text


def test_batch_dependent_codes_are_marked_and_kept_off_the_equal_rate_comparison(tmp_path):
    """OptVQ with its authors' evaluation (Sinkhorn over the evaluation batch) has no code per latent: marked ‡ in
    the table, absent from the equal-rate table and the plot's lines; with --optvq_eval nearest it is placed."""
    for K, psnr, ppl in ((64, 20.0, 32.0), (1024, 24.0, 512.0)):
        fake_run(tmp_path, f"vq_ema_best_vq_ema_k{K}_s0", "vq_ema", K, psnr, ppl)
    fake_run(tmp_path, "optvq_sink_optvq_k256_s0", "optvq", 256, 22.0, 128.0, config={"optvq_heads": 1})
    fake_run(tmp_path, "optvq_eps10_optvq_k256_s0", "optvq", 256, 21.0, 128.0,
             config={"optvq_heads": 1, "optvq_eval": "nearest"})
    found, _ = A.frontier_groups([tmp_path])
    assert found["optvq_sink_optvq_k256"]["batch_dependent"] and not found["optvq_eps10_optvq_k256"]["batch_dependent"]
    text = A.frontier_report([tmp_path])
    assert "| `optvq_sink_optvq_k256` (1)‡ |" in text and "‡ evaluation codes that depend on their batch" in text
    equal_rate = text[text.index("At equal rate"):]
    assert "optvq_eps10" in equal_rate and "optvq_sink" not in equal_rate


def test_a_frontier_file_places_runs_as_their_folders_do(tmp_path):
    """--save writes the finished runs as a frontier file; the report from the file (with other runs' folder) equals
    the report from the folders. The same run twice, a missing path and a file of another kind are errors."""
    import vqvae
    for K, psnr, ppl in ((64, 20.0, 32.0), (1024, 24.0, 512.0)):
        fake_run(tmp_path / "ref", f"vq_ema_best_vq_ema_k{K}_s0", "vq_ema", K, psnr, ppl)
    rd = {"positions": 10, "run": {"distortion": 1.0}, "run_measured": {"rate_bits": 7.0, "distortion": 1.0},
          "gaps": {"codebook": {"rate_bits": 0.1}, "kmeans": {"rate_bits": 0.5, "distortion": 0.2}},
          "covariance_eigenvalues": [2.0, 2.0], "curve": [[0.0, 4.0]] * 100}
    (tmp_path / "ref" / "vq_ema_best_vq_ema_k1024_s0" / "rate_distortion.json").write_text(json.dumps(rd))
    fake_run(tmp_path / "mine", "mine_fsq_k200_s0", "fsq", 200, 22.5, 128.0)
    assert A.frontier_save([tmp_path / "ref"], tmp_path / "ref.json") == 2
    saved = json.loads((tmp_path / "ref.json").read_text())["runs"]
    assert set(saved["vq_ema_best_vq_ema_k1024_s0"]["rd"]) == set(A.RD_SUMMARY_KEYS)      # the summary, not the curve
    assert A.frontier_report([tmp_path / "mine", tmp_path / "ref.json"]) == \
        A.frontier_report([tmp_path / "mine", tmp_path / "ref"])
    assert "| `mine_fsq_k200` (1) | 7.00 | 22.50 |" in A.frontier_report([tmp_path / "mine", tmp_path / "ref.json"])
    with pytest.raises(vqvae.BavqError, match="same name come from two places"):
        A.frontier_report([tmp_path / "ref", tmp_path / "ref.json"])
    with pytest.raises(vqvae.BavqError, match="does not exist"):
        A.frontier_report([tmp_path / "nowhere"])
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(vqvae.BavqError, match="not a frontier file"):
        A.frontier_report([tmp_path / "other.json"])


@pytest.mark.slow
def test_the_readmes_two_commands_place_new_runs_on_the_plane(tmp_path, capsys):
    """README's "Place a quantizer on the plane": its two commands as written, with tiny settings appended (later
    flags win) and the paths moved into tmp_path; the reference is a frontier file of tiny vq_ema_best runs. The
    first trains the grid, the second runs the R(D) analysis of every run and prints the tables and the plot."""
    import importlib.util
    import re
    from conftest import TINY, cli_in_process
    from test_docs import code_blocks
    block = next(code for lang, code, _ in code_blocks(ROOT / "README.md") if "experiments/mine" in code)
    commands = [line.split() for line in re.sub(r"\\\n", " ", block).splitlines() if line.startswith("python")]
    assert [c[:2] for c in commands] == [["python", "train.py"], ["python", "tools/frontier_table.py"]]
    tiny = [*TINY, "--codebook_size", "8", "16", "--seed", "0"]
    moved = {"experiments/mine": str(tmp_path / "mine"), "results/frontier_reduced.json": str(tmp_path / "ref.json"),
             "mine.png": str(tmp_path / "mine.png"), "configs/reduced.yaml": str(ROOT / "configs/reduced.yaml")}
    reference = [*TINY, "--init", "kmeans", "--dead_code_threshold", "1", "--codebook_size", "4", "32", "--seed", "0",
                 "--name", "vq_ema_best", "--out_dir", str(tmp_path / "ref")]
    assert cli_in_process(reference, capsys).returncode == 0
    spec = importlib.util.spec_from_file_location("frontier_table", ROOT / "tools" / "frontier_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "ref"), "--save", str(tmp_path / "ref.json")]) == 0
    r = cli_in_process([moved.get(a, a) for a in commands[0][2:]] + tiny, capsys)
    assert r.returncode == 0, r.stderr
    capsys.readouterr()
    assert tool.main([moved.get(a, a) for a in commands[1][2:]] + ["--rd_positions", "512", "--rd_alphabet", "16"]) == 0
    out = capsys.readouterr().out
    for K in (8, 16):
        assert f"| `mine_optvq_k{K}` (1) | optvq | {K} |" in out
        assert (tmp_path / "mine" / f"mine_optvq_k{K}_s0" / "rate_distortion.json").is_file()
    assert "| `vq_ema_best_vq_ema_k32` (1) | vq_ema | 32 |" in out and "R(D) of the latents" in out
    assert (tmp_path / "mine.png").read_bytes()[:4] == b"\x89PNG"


def test_a_ladder_sets_each_group_against_the_one_before_it_seed_by_seed(tmp_path):
    """--paired PREFIX: the groups of that prefix in name order, each against the previous on the seeds both have:
    differences 1.0 and 2.0 dB on seeds 0 and 1 (seed 2 only in the second group) give +1.50 ± 0.50."""
    for s, psnr in enumerate([20.0, 21.0]):
        fake_run(tmp_path, f"lad_r0_vq_ema_k512_s{s}", "vq_ema", 512, psnr, 256.0)
    for s, psnr in enumerate([21.0, 23.0, 30.0]):
        fake_run(tmp_path, f"lad_r1_ecvq_k512_s{s}", "ecvq", 512, psnr, 128.0)
    fake_run(tmp_path, "other_vq_k512_s0", "vq", 512, 10.0, 2.0)
    text = A.frontier_report([tmp_path], paired="lad_")
    table = text[text.index("Each `lad_*` group"):]
    assert "| `lad_r0_vq_ema_k512` (2) | 20.50 ± 0.71 | 8.00 ± 0.00 |  |  |" in table
    assert "| `lad_r1_ecvq_k512` (3) | 24.67 ± 4.73 | 7.00 ± 0.00 | +1.50 ± 0.50 | -1.00 ± 0.00 |" in table
    assert "other" not in table
    import vqvae
    with pytest.raises(vqvae.BavqError, match="No group's name starts with 'nope'"):
        A.frontier_report([tmp_path], paired="nope")
