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


def fake_run(root: Path, name: str, quantizer: str, K: int, psnr: float, perplexity: float, finished=True, **metrics):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"quantizer": quantizer, "codebook_size": K}))
    if finished:
        (run / "final_metrics.json").write_text(json.dumps({"psnr": psnr, "perplexity": perplexity, **metrics}))


@pytest.mark.parametrize("key, fam, pt", [
    ("vq_ema_best_vq_ema_k512", "vq_ema_best_vq_ema", "512"),
    ("ibq_ibq_k64", "ibq_ibq", "64"),
    ("fsq_8x5x5_fsq_k200", "fsq_fsq", "8x5x5"),          # the levels set the rate: one line over level sets
    ("fsq_8x5x5x5_fsq_k1000", "fsq_fsq", "8x5x5x5"),
    ("ba_vq_best_beta1000_ba_vq_k512", "ba_vq_best_beta_ba_vq", "beta 1000"),   # one line over beta ranges
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
