"""tools/frontier_table.py, the table and plot of the equal-rate frontier (docs/results.md): which runs it pools,
the rate it reports (log2 of the validation perplexity), and the lines of its plot."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("frontier_table", ROOT / "tools" / "frontier_table.py")
frontier_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(frontier_table)


def fake_run(root: Path, name: str, quantizer: str, K: int, psnr: float, perplexity: float, finished=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"quantizer": quantizer, "codebook_size": K}))
    if finished:
        (run / "final_metrics.json").write_text(json.dumps({"psnr": psnr, "perplexity": perplexity}))


@pytest.mark.parametrize("key, fam, pt", [
    ("vq_ema_best_vq_ema_k512", "vq_ema_best_vq_ema", "512"),
    ("ibq_ibq_k64", "ibq_ibq", "64"),
    ("fsq_8x5x5_fsq_k200", "fsq_fsq", "8x5x5"),          # the levels set the rate: one line over level sets
    ("fsq_8x5x5x5_fsq_k1000", "fsq_fsq", "8x5x5x5"),
    ("ba_vq_best_beta1000_ba_vq_k512", "ba_vq_best_beta_ba_vq", "beta 1000"),   # one line over beta ranges
])
def test_a_group_belongs_to_the_line_of_what_sets_its_rate(key, fam, pt):
    assert frontier_table.family(key) == fam
    assert frontier_table.point(key, {"K": int(key.rsplit("_k", 1)[1])}) == pt


def test_seeds_are_pooled_across_folders_and_the_rate_is_log2_of_the_perplexity(tmp_path):
    fake_run(tmp_path / "a", "vq_ema_best_vq_ema_k512_s0", "vq_ema", 512, 22.0, 256.0)
    fake_run(tmp_path / "a", "vq_ema_best_vq_ema_k512_s1", "vq_ema", 512, 23.0, 512.0)
    fake_run(tmp_path / "b", "vq_ema_best_vq_ema_k512_s3", "vq_ema", 512, 24.0, 1024.0)
    fake_run(tmp_path / "a", "ibq_ibq_k64_s0", "ibq", 64, 19.0, 32.0)
    fake_run(tmp_path / "a", "ibq_ibq_k64_s1", "ibq", 64, 0.0, 0.0, finished=False)   # unfinished: left out, counted
    found, unfinished = frontier_table.groups([tmp_path / "a", tmp_path / "b"])
    assert unfinished == 1
    assert sorted(found) == ["ibq_ibq_k64", "vq_ema_best_vq_ema_k512"]
    assert len(found["vq_ema_best_vq_ema_k512"]["runs"]) == 3
    text = frontier_table.table(found, unfinished)
    bits = [8.0, 9.0, 10.0]                                   # log2 of 256, 512, 1024
    row = next(line for line in text.splitlines() if "vq_ema_best_vq_ema_k512" in line)
    assert f"| 23.00 ± {statistics.stdev([22.0, 23.0, 24.0]):.2f} |" in row
    assert f"| 9.00 ± {statistics.stdev(bits):.2f} | 576.00 ± {64 * statistics.stdev(bits):.2f} |" in row
    assert "| `ibq_ibq_k64` (1) | ibq | 64 | 19.00 | 32.00 | 5.00 | 320.00 |" in text
    assert "4 finished runs, 1 unfinished." in text


def test_the_plot_is_written(tmp_path):
    for s, (psnr, ppl) in enumerate([(20.0, 100.0), (20.5, 120.0)]):
        fake_run(tmp_path, f"fsq_8x5x5_fsq_k200_s{s}", "fsq", 200, psnr, ppl)
        fake_run(tmp_path, f"fsq_4x4x4_fsq_k64_s{s}", "fsq", 64, psnr - 1, ppl / 2)
    found, _ = frontier_table.groups([tmp_path])
    out = tmp_path / "frontier.png"
    frontier_table.plot(found, [tmp_path], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
