"""Nothing lost, nothing mixed: one process per run directory (train, resume, sweep member), with
claims of dead processes taken over; image folders decode every mode right and their cache sees
rewrites; config files cannot say a key twice."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import vqvae
import vqvae_experiment
from conftest import ROOT, tiny_config


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with vqvae.RunClaim(run) as first:
        with pytest.raises(vqvae.BavqError) as e:
            vqvae.RunClaim(run).__enter__()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and first.info["host"] in msg and first.info["started"] in msg
        assert "Nothing was changed" in msg
        # train() and a resume of the same directory are refused the same way, before touching anything
        with pytest.raises(vqvae.BavqError, match="in use by another bavq process"):
            vqvae.train(tiny_config(out_dir=str(tmp_path), name="run"))
    assert not (run / vqvae.CLAIM_FILE).exists() and not run.exists()   # released; the empty folder removed


def _write_claim(path, **info):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "h", "pid": 1, "boot_id": vqvae_experiment._boot_id(), "started": "then",
                                "token": "old", **info}))


def test_the_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    claim = tmp_path / "run" / vqvae.CLAIM_FILE
    _write_claim(claim, host=vqvae.socket.gethostname(), pid=pid)
    with vqvae.RunClaim(tmp_path / "run") as c:
        assert json.loads(claim.read_text())["token"] == c.info["token"]
    # the same pid alive but from before a reboot (another boot id) is stale too
    _write_claim(claim, host=vqvae.socket.gethostname(), pid=os.getpid(), boot_id="another-boot")
    with vqvae.RunClaim(tmp_path / "run") as c:
        assert json.loads(claim.read_text())["token"] == c.info["token"]


def test_a_claim_from_another_host_is_taken_over_only_when_it_stopped_refreshing(tmp_path):
    claim = tmp_path / "run" / vqvae.CLAIM_FILE
    _write_claim(claim, host="other-host", pid=os.getpid())
    with pytest.raises(vqvae.BavqError, match="host other-host"):
        vqvae.RunClaim(tmp_path / "run").__enter__()                    # refreshed just now: alive
    old = time.time() - vqvae.CLAIM_STALE_S - 5
    os.utime(claim, (old, old))
    with vqvae.RunClaim(tmp_path / "run") as c:
        assert json.loads(claim.read_text())["token"] == c.info["token"]


@pytest.mark.slow
def test_two_runs_started_together_on_one_directory(tmp_path):
    """Two train.py --name X at once (different quantizers): one trains, the other stops with the
    one-paragraph refusal, and the run's files are all the first one's."""
    common = ["--dataset", "fake", "--train_subset", "512", "--val_subset", "64", "--hidden_dim", "16",
              "--latent_dim", "16", "--codebook_size", "32", "--batch_size", "32", "--epochs", "3",
              "--no_wandb", "--no_progress", "--device", "cpu", "--out_dir", str(tmp_path), "--name", "X"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    a = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--quantizer", "ba_vq", *common],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    claim = tmp_path / "X" / vqvae.CLAIM_FILE
    t0 = time.time()
    while not claim.exists() and time.time() - t0 < 60 and a.poll() is None:
        time.sleep(0.05)
    b = subprocess.run([sys.executable, str(ROOT / "train.py"), "--quantizer", "vq_ema", *common],
                       capture_output=True, text=True, env=env, timeout=120)
    a.communicate(timeout=300)
    assert a.returncode == 0
    assert b.returncode == 2 and "in use by another bavq process" in b.stderr and "Traceback" not in b.stderr
    assert "ba_vq" in (tmp_path / "X" / "config.yaml").read_text()
    history = [json.loads(l) for l in (tmp_path / "X" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert "train/entropy_loss" in history[0]                           # ba_vq's, not vq_ema's
    assert not claim.exists()


# --------------------------------------------------------------------------- image folders


def _folder(tmp_path, images):
    """An ImageFolder with one class; images: {name: PIL image}."""
    d = tmp_path / "data"
    for split in ("train", "test"):
        (d / split / "c").mkdir(parents=True, exist_ok=True)
        for name, im in images.items():
            im.save(d / split / "c" / name)
    return d


def _decode(d):
    cfg = vqvae.make_config({"dataset": "folder", "data_dir": str(d), "num_workers": 0})
    return vqvae.load_dataset(cfg)[0]


def test_every_image_mode_decodes_to_the_right_8_bit_rgb(tmp_path):
    """16-bit and 32-bit grayscale are scaled (PIL's own convert clips them to 255: nearly white),
    palette / CMYK / RGBA / LA / L / 1 / float convert to the RGB values they show."""
    from PIL import Image
    g = np.random.default_rng(0)
    gray8 = g.integers(0, 256, (32, 32)).astype(np.uint8)
    rgb = g.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    images = {
        "a_l.png": Image.fromarray(gray8),
        "b_i16.png": Image.fromarray(gray8.astype(np.uint16) * 257),
        "c_i32.tif": Image.fromarray(gray8.astype(np.int32) * 257),
        "d_f.tif": Image.fromarray(gray8.astype(np.float32) / 255.0),
        "e_rgba.png": Image.fromarray(np.dstack([rgb, np.full((32, 32), 128, np.uint8)])),
        "f_la.png": Image.fromarray(np.dstack([gray8, np.full((32, 32), 9, np.uint8)])),
        "g_p.png": Image.fromarray(rgb).quantize(64),
        "h_cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "i_1.png": Image.fromarray(gray8 > 127),
    }
    assert [im.mode for im in images.values()] == ["L", "I;16", "I", "F", "RGBA", "LA", "P", "CMYK", "1"]
    x = _decode(_folder(tmp_path, images))                             # (9, 3, 32, 32), sorted by name
    as_rgb = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)    # noqa: E731
    gray3 = torch.from_numpy(gray8)[None].expand(3, -1, -1)
    for i in range(4):                                                  # L, I;16, I, F: the same gray image
        assert torch.equal(x[i], gray3), i
    assert torch.equal(x[4], as_rgb(rgb))                               # RGBA: alpha dropped
    assert torch.equal(x[5], gray3)
    assert torch.equal(x[6], as_rgb(np.asarray(images["g_p.png"].convert("RGB"))))
    assert (x[7].int() - as_rgb(rgb).int()).abs().max() <= 1            # CMYK round trip
    assert torch.equal(x[8], torch.from_numpy(np.where(gray8 > 127, 255, 0).astype(np.uint8))[None].expand(3, -1, -1))
    assert float(x[1].float().mean()) == pytest.approx(float(gray8.mean()), abs=0.5)   # not nearly white


def test_the_image_cache_sees_a_same_size_rewrite(tmp_path):
    """Rewriting an uncompressed image with other pixels keeps its size; the cache must not return
    the old pixels (its key includes every file's modification time)."""
    from PIL import Image
    a = np.zeros((32, 32, 3), np.uint8)
    d = _folder(tmp_path, {"x.bmp": Image.fromarray(a)})
    first = _decode(d)
    assert list(d.glob(".bavq_train_*.pt"))                             # cached
    size = (d / "train" / "c" / "x.bmp").stat().st_size
    time.sleep(0.01)
    for split in ("train", "test"):
        Image.fromarray(a + 200).save(d / split / "c" / "x.bmp")
    assert (d / "train" / "c" / "x.bmp").stat().st_size == size
    second = _decode(d)
    assert int(first.max()) == 0 and int(second.min()) == 200


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-3\nepochs: 3\nlr: 2.0e-3\n")
    with pytest.raises(vqvae.BavqError, match="'lr' more than once"):
        vqvae.load_yaml_config(f)


# --------------------------------------------------------------------------- leftovers and resume


@pytest.mark.slow
def test_stale_temporaries_are_removed_and_overwrite_removes_old_wandb_runs(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="r", checkpoint_every=1)
    vqvae.train(cfg)
    run = tmp_path / "r"
    (run / ".checkpoint_epoch1.pt.tmp4242").write_bytes(b"half a checkpoint")
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    vqvae.train(vqvae.resume_config(run, {"epochs": 2, "overwrite": True}))
    assert not (run / ".checkpoint_epoch1.pt.tmp4242").exists() and (run / "wandb").is_dir()
    (run / ".final_model.pt.tmp99").write_bytes(b"x")
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="r", overwrite=True))
    assert not (run / "wandb").exists() and not (run / ".final_model.pt.tmp99").exists()


def test_resume_refuses_another_place_and_a_checkpoint_from_another_run(tmp_path):
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="a", quantizer="vq_ema", checkpoint_every=1))
    vqvae.train(tiny_config(out_dir=str(tmp_path), name="b", quantizer="ba_vq", checkpoint_every=1))
    with pytest.raises(vqvae.BavqError, match="point to"):
        vqvae.resume_config(tmp_path / "a", {"name": "elsewhere", "epochs": 2})
    with pytest.raises(vqvae.BavqError, match="point to"):
        vqvae.resume_config(tmp_path / "a", {"out_dir": str(tmp_path / "other"), "epochs": 2})
    assert vqvae.resume_config(tmp_path / "a", {"out_dir": str(tmp_path), "name": "a", "epochs": 2}).epochs == 2
    # b's checkpoint copied into a: refused, and a's config.yaml is left as it was
    import shutil
    shutil.copy(tmp_path / "b" / "checkpoint_epoch1.pt", tmp_path / "a" / "checkpoint_epoch1.pt")
    before = (tmp_path / "a" / "config.yaml").read_text()
    with pytest.raises(vqvae.BavqError, match="does not belong to the run"):
        vqvae.train(vqvae.resume_config(tmp_path / "a" / "checkpoint_epoch1.pt", {"epochs": 2, "overwrite": True}))
    assert (tmp_path / "a" / "config.yaml").read_text() == before


# --------------------------------------------------------------------------- every failure is one paragraph


def _one_paragraph(msg):
    assert "Traceback" not in msg and "\n" not in msg.strip() and len(msg) > 40


def test_a_corrupt_image_is_named_and_can_be_skipped(tmp_path, capsys):
    from PIL import Image
    d = _folder(tmp_path, {"a.png": Image.new("RGB", (32, 32), (10, 20, 30)),
                           "b.png": Image.new("RGB", (32, 32), (1, 2, 3))})
    (d / "train" / "c" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = vqvae.make_config({"dataset": "folder", "data_dir": str(d), "num_workers": 0})
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.load_dataset(cfg)
    _one_paragraph(str(e.value))
    assert "b.png" in str(e.value) and "--skip_bad_images" in str(e.value)
    train_u8, val_u8 = vqvae.load_dataset(vqvae.make_config({**vqvae.asdict(cfg), "skip_bad_images": True}))
    assert train_u8.shape[0] == 1 and val_u8.shape[0] == 2
    assert "skipped 1 unreadable image file" in capsys.readouterr().err


@pytest.mark.parametrize("out_dir,name", [("/proc", "bavq_test"), ("/sys", "kernel")])
def test_an_unwritable_place_is_one_paragraph_and_touches_nothing(out_dir, name):
    if not os.path.isdir(out_dir):
        pytest.skip(f"{out_dir} does not exist here")
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.train(tiny_config(out_dir=out_dir, name=name))
    _one_paragraph(str(e.value))
    assert "--out_dir" in str(e.value)


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=3, checkpoint_every=1)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".checkpoint_epoch2.pt.tmp" + str(os.getpid())):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(vqvae.os, "fsync", fsync)
    with pytest.raises(vqvae.WriteError) as e:
        vqvae.train(cfg)
    msg = str(e.value)
    _one_paragraph(msg)
    assert "No space left on device" in msg and f"python train.py --resume {tmp_path / 'r'}" in msg
    run = tmp_path / "r"
    assert vqvae.load_checkpoint(run / "checkpoint_epoch1.pt")["epoch"] == 1      # intact
    assert not (run / "checkpoint_epoch2.pt").exists() and not list(run.glob(".*.tmp*"))
    monkeypatch.setattr(vqvae.os, "fsync", real_fsync)
    assert vqvae.train(vqvae.resume_config(run))["epoch"] == 3                     # and it resumes


@pytest.mark.parametrize("overrides,expect", [
    (dict(codebook_size=10**13), "Ran out of memory"),        # beyond any address space: fails at once
    (dict(val_subset=10**12), "Ran out of memory"),
])
def test_sizes_that_cannot_be_allocated_are_one_paragraph(tmp_path, overrides, expect):
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.train(tiny_config(out_dir=str(tmp_path), name="r", **overrides))
    _one_paragraph(str(e.value))
    assert expect in str(e.value) and not (tmp_path / "r" / vqvae.CLAIM_FILE).exists()


@pytest.mark.parametrize("overrides,expect", [
    (dict(seed=2**64), "seed must be in"),
    (dict(name=" "), "must not be blank"),
    (dict(name="x" * 300), "bytes long"),
])
def test_values_a_run_cannot_use_are_config_errors(overrides, expect):
    with pytest.raises(vqvae.BavqError, match=expect):
        tiny_config(**overrides)


@pytest.mark.slow
def test_cuda_in_a_config_file_without_cuda_is_one_paragraph(tmp_path):
    if vqvae.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.train(tiny_config(device="cuda:0", out_dir=str(tmp_path)))
    _one_paragraph(str(e.value))
    assert "--device cuda:0 was asked for" in str(e.value)
    # from a YAML file through the CLI, and cuda:N from the command line: the same paragraph, exit 2
    (tmp_path / "c.yaml").write_text('device: "cuda:0"\ndataset: fake\nwandb: false\n')
    for args in (["--config", str(tmp_path / "c.yaml")], ["--dataset", "fake", "--no_wandb", "--device", "cuda:1"]):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out_dir", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "was asked for" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_resume_while_the_run_still_trains_is_refused_naming_the_holder(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=2)
    vqvae.train(cfg)
    (tmp_path / "r" / "final_metrics.json").unlink()
    with vqvae.RunClaim(tmp_path / "r"):                  # as if the first process were still training
        with pytest.raises(vqvae.BavqError, match=f"pid {os.getpid()}"):
            vqvae.train(vqvae.resume_config(tmp_path / "r", {"overwrite": True}))


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    cfg = tiny_config(out_dir=str(tmp_path), name="r", epochs=1)
    vqvae.train(cfg)
    ck = torch.load(tmp_path / "r" / "checkpoint_epoch1.pt", weights_only=False)
    ck["format"] = vqvae.CHECKPOINT_FORMAT + 1
    torch.save(ck, tmp_path / "r" / "checkpoint_epoch1.pt")
    with pytest.raises(vqvae.BavqError, match="Update bavq"):
        vqvae.load_checkpoint(tmp_path / "r" / "checkpoint_epoch1.pt")


# --------------------------------------------------------------------------- daily friction


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_latest_n_and_config_yaml_says_where_it_ran(tmp_path, capsys):
    cfg = tiny_config(out_dir=str(tmp_path), name="k", epochs=4, checkpoint_every=1, keep_checkpoints=2)
    vqvae.train(cfg)
    run = tmp_path / "k"
    assert sorted(p.name for p in run.glob("checkpoint_epoch*.pt")) == ["checkpoint_epoch3.pt", "checkpoint_epoch4.pt"]
    head = (run / "config.yaml").read_text().splitlines()[:2]
    assert head[1].startswith("# device used: cpu (cpu); torch ") and "bavq code: git " in head[1]
    assert vqvae.load_run(run)[1].keep_checkpoints == 2                # comments do not disturb reading it back
    out = capsys.readouterr().out
    assert "Epoch 4/4 (" in out and " s) | Train Loss" in out          # per-epoch time on the epoch line


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            pass

        def flush(self):
            pass
    assert vqvae._ProgressBar(3, "x", True).bar is None                # pytest's stderr is not a terminal
    monkeypatch.setattr(vqvae.sys, "stderr", Tty())
    bar = vqvae._ProgressBar(3, "x", True)
    assert bar.bar is not None
    bar.close()
    assert vqvae._ProgressBar(3, "x", False).bar is None


def test_num_workers_is_capped_at_the_cpu_count(tmp_path, monkeypatch):
    seen = []
    real = torch.utils.data.DataLoader

    def loader(*a, **k):
        seen.append(k["num_workers"])
        return real(*a, **{**k, "num_workers": 0})
    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    from PIL import Image
    d = _folder(tmp_path, {"a.png": Image.new("RGB", (32, 32))})
    vqvae.load_dataset(vqvae.make_config({"dataset": "folder", "data_dir": str(d), "num_workers": 999}))
    assert seen and max(seen) <= (os.cpu_count() or 1)


@pytest.mark.slow
def test_cli_flags_are_not_abbreviated_and_an_unknown_flag_is_one_line(tmp_path):
    for args in (["--quant", "ba_vq"], ["--nope"]):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--help" in r.stderr and "usage" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert "a fix, 0 = the original code" in r.stdout and "{overwrite,copy}" in r.stdout and "--resume" in r.stdout


def test_pyproject_makes_vqvae_an_installable_module():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert p["tool"]["setuptools"]["py-modules"] == ["vqvae", "vqvae_experiment", "vqvae_grid"]
    req = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(p["project"]["dependencies"]) == sorted(r for r in req if r)
