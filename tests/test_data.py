"""Data loading: generated images, image folders (resizing, every PIL image mode, the cache, unreadable files,
the worker count) and CIFAR-10 without a network."""
import os
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae
from conftest import one_paragraph as _one_paragraph, tiny_config


def test_fake_data_is_deterministic_uint8():
    a, _ = vqvae.load_dataset(tiny_config())
    b, _ = vqvae.load_dataset(tiny_config())
    assert a.dtype == torch.uint8 and a.shape == (256, 3, 32, 32) and torch.equal(a, b)
    x = vqvae.to_float(a)
    assert x.min() >= -1 and x.max() <= 1
    assert vqvae.to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


# --------------------------------------------------------------------------- image folders


def _write_folder(root, split, n_per_class, size):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_dataset_resizes_and_accepts_val(tmp_path):
    _write_folder(tmp_path, "train", 3, 40)
    _write_folder(tmp_path, "val", 2, 32)
    cfg = tiny_config(dataset="folder", data_dir=str(tmp_path), num_workers=0, train_subset=0, val_subset=0)
    tr, va = vqvae.load_dataset(cfg)
    assert tr.shape == (6, 3, 32, 32) and va.shape == (4, 3, 32, 32) and tr.dtype == torch.uint8
    # val images are 32x32 already: stored exactly
    first = np.array(Image.open(tmp_path / "val" / "cat" / "0.png"))
    assert torch.equal(va[0], torch.from_numpy(first).permute(2, 0, 1))
    # a full split is cached next to the data and reused
    assert list(tmp_path.glob(".bavq_train_*.pt"))
    tr2, _ = vqvae.load_dataset(cfg)
    assert torch.equal(tr, tr2)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(vqvae.BavqError, match="does not exist"):
        vqvae.load_dataset(tiny_config(dataset="folder", data_dir=str(tmp_path / "nope")))
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(vqvae.BavqError, match="No images found"):
        vqvae.load_dataset(tiny_config(dataset="folder", data_dir=str(tmp_path), num_workers=0))


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


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_without_network_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(vqvae.BavqError) as e:
        vqvae.load_dataset(tiny_config(dataset="cifar10", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "--dataset folder" in msg and "download" in msg and "\n" not in msg
    assert "shared/data" not in msg                                    # no path of this project's own setup

    def offline_after_mkdir(root, **k):                                 # what torchvision does: folder first
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("timed out")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline_after_mkdir)
    with pytest.raises(vqvae.BavqError):
        vqvae.load_dataset(tiny_config(dataset="cifar10", data_dir=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()                            # nothing left behind
