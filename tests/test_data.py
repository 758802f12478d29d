import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from stepadapt import StepadaptError
from stepadapt.data import FASHION_MNIST_DIR, load_dataset, read_idx_images

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_fmnist
def test_fashion_mnist_test_split_is_padded_and_scaled():
    x = load_dataset("fashion-mnist", "test")
    assert x.shape == (10000, 1, 32, 32)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    # The 2-pixel pad is background (-1); the centre is not.
    assert (x[:, :, :2, :] == -1).all() and (x[:, :, :, -2:] == -1).all()
    assert x[:, :, 2:30, 2:30].mean() > -0.6


@needs_fmnist
def test_limit_is_a_deterministic_subset():
    a = load_dataset("fashion-mnist", "test", limit=50, seed=3)
    b = load_dataset("fashion-mnist", "test", limit=50, seed=3)
    c = load_dataset("fashion-mnist", "test", limit=50, seed=4)
    assert a.shape == (50, 1, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_folder_rgb_and_grey(tmp_path):
    from stepadapt import Notice

    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_dataset(str(tmp_path), size=32)  # one colour image makes the folder RGB
    assert x.shape == (2, 3, 32, 32)
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(load_dataset(str(tmp_path), size=32, channels=3), x)
    with pytest.raises(StepadaptError, match="is RGB but the model is greyscale"):
        load_dataset(str(tmp_path), size=16, channels=1)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):  # grey pictures saved as RGB files are grey
        Image.fromarray(np.repeat(rng.integers(0, 256, (20, 20, 1), dtype=np.uint8), 3, axis=2)).save(
            grey / f"{i}.png"
        )
    g = load_dataset(str(grey), size=16)
    assert g.shape == (3, 1, 16, 16)
    with pytest.warns(Notice, match="greyscale images, repeated to 3 channels"):
        rgb = load_dataset(str(grey), size=16, channels=3)
    assert rgb.shape == (3, 3, 16, 16) and torch.equal(rgb[:, :1], g)


def test_npz_uint8_and_float(tmp_path):
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    arr[:, 10:18, 10:18] = 255
    np.savez(tmp_path / "a.npz", images=arr)
    x = load_dataset(str(tmp_path / "a.npz"))
    assert x.shape == (4, 1, 32, 32) and x.max() == 1.0 and x.min() == -1.0
    bad = np.full((2, 3, 32, 32), np.nan, dtype=np.float32)
    np.savez(tmp_path / "nan.npz", images=bad)
    with pytest.raises(StepadaptError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))


def test_missing_and_corrupt_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(StepadaptError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepadaptError, match="no PNG/JPEG"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(StepadaptError, match="cannot read image"):
        load_dataset(str(tmp_path))
    idx = tmp_path / "x.gz"
    with gzip.open(idx, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(StepadaptError, match="truncated"):
        read_idx_images(idx)


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    import stepadapt.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(StepadaptError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("train")


def test_native_size_reads_the_data_and_never_raises(tmp_path):
    from stepadapt.data import native_size

    np.savez(tmp_path / "sq.npz", images=np.zeros((3, 20, 20, 3), dtype=np.uint8))
    np.savez(tmp_path / "flat.npz", images=np.zeros((5, 10), dtype=np.uint8))
    assert native_size(str(tmp_path / "sq.npz")) == 20 and native_size("fashion-mnist") == 32
    assert native_size(str(tmp_path / "flat.npz")) is None
    with pytest.raises(StepadaptError, match="expected N x H x W"):
        load_dataset(str(tmp_path / "flat.npz"))
