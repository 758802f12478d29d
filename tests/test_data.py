import gzip
import hashlib
import struct
from pathlib import Path

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
    g = load_dataset(str(grey), size=16, holdout=0)  # all three: 0.png is held out by default
    assert g.shape == (3, 1, 16, 16)
    with pytest.warns(Notice, match="greyscale images, repeated to 3 channels"):
        rgb = load_dataset(str(grey), size=16, channels=3, holdout=0)
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


def _hashed_out(name: str, holdout: float = 0.1) -> bool:
    """The split rule, written out here so a change to it (which would move users' images between
    train and test) fails a test: sha256 of the path relative to the folder, first 8 bytes."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") < holdout * 2**64


def _write(folder, ids, size: int = 8, name="img{:03d}.png"):
    """Grey noise images whose first two pixels spell their id, so a loaded image says its file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        a = np.random.default_rng(i).integers(0, 256, (size, size), dtype=np.uint8)
        a[0, 0], a[0, 1] = i % 256, i // 256
        Image.fromarray(a).save(folder / name.format(i))


def _ids(x: torch.Tensor) -> list[int]:
    px = ((x[:, 0, 0, :2] + 1) * 127.5).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def test_folder_hash_split_is_disjoint_pinned_and_independent_of_listing(tmp_path, monkeypatch):
    from stepadapt.data import DEFAULT_HOLDOUT, folder_split, held_out

    a = tmp_path / "a"
    _write(a, range(60))
    _write(a / "cls", [500, 501, 502], name="x{:03d}.png")  # class subfolders are split too
    train, test = _ids(load_dataset(str(a), "train", 8)), _ids(load_dataset(str(a), "test", 8))
    assert DEFAULT_HOLDOUT == 0.1 and held_out(str(a))
    assert test and not set(train) & set(test) and sorted(train + test) == [*range(60), 500, 501, 502]
    pinned = [i for i in range(60) if _hashed_out(f"img{i:03d}.png")]
    pinned += [i for i in (500, 501, 502) if _hashed_out(f"cls/x{i:03d}.png")]
    assert sorted(test) == pinned
    # Another folder holding the same files, written in reverse order, among 40 others: each common
    # file is on the same side, so adding images never moves old ones into or out of training.
    b = tmp_path / "b"
    _write(b, reversed(range(100)))
    b_test = set(_ids(load_dataset(str(b), "test", 8)))
    assert {i for i in range(60) if i in b_test} == set(test) - {500, 501, 502}
    listed = Path.rglob  # the file system's listing order is not the split's business
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(listed(self, pattern))))
    assert folder_split(a)[1] == sorted(folder_split(a)[1]) and _ids(load_dataset(str(a), "test", 8)) == test
    monkeypatch.undo()
    more = set(_ids(load_dataset(str(a), "test", 8, holdout=0.5)))
    assert set(test) < more and len(more) < 63  # a larger holdout keeps the old held-out files


def test_folder_train_and_test_subfolders_are_the_split(tmp_path):
    from stepadapt.data import held_out

    _write(tmp_path / "d" / "train", range(10))
    _write(tmp_path / "d" / "test", range(100, 104))
    d = str(tmp_path / "d")
    assert _ids(load_dataset(d, "train", 8)) == list(range(10))  # not hash-split: all of train/
    assert _ids(load_dataset(d, "test", 8, holdout=0)) == list(range(100, 104))
    assert held_out(d, 0.0)
    # validation/ stands in for a missing test/, and without train/ the rest of the folder trains
    _write(tmp_path / "v" / "validation", range(200, 203))
    _write(tmp_path / "v", range(5))
    v = str(tmp_path / "v")
    assert _ids(load_dataset(v, "train", 8)) == list(range(5))
    assert _ids(load_dataset(v, "test", 8)) == list(range(200, 203))
    _write(tmp_path / "only" / "test", range(3))
    with pytest.raises(StepadaptError, match="only in test/: nothing to train on"):
        load_dataset(str(tmp_path / "only"))


def test_tiny_folder_without_a_held_out_part_is_all_training(tmp_path):
    from stepadapt.data import held_out

    names = [n for n in ("a.png", "b.png", "c.png") if not _hashed_out(n)]
    assert len(names) == 3
    for i, n in enumerate(names):
        _write(tmp_path, [i], name=n)
    assert not held_out(str(tmp_path))  # 10% of 3 images by hash is none: nothing held out
    train, test = load_dataset(str(tmp_path), "train", 8), load_dataset(str(tmp_path), "test", 8)
    assert len(train) == 3 and torch.equal(train, test)
    _write(tmp_path, range(3, 40))
    assert held_out(str(tmp_path)) and not held_out(str(tmp_path), 0)


def test_npz_splits_by_array_or_by_index_hash(tmp_path):
    from stepadapt.data import held_out

    def imgs(ids):
        a = np.stack([np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8) for i in ids])
        a[:, 0, 0], a[:, 0, 1] = np.array(ids) % 256, np.array(ids) // 256
        return a

    np.savez(tmp_path / "tt.npz", train=imgs(range(6)), test=imgs(range(50, 53)))
    np.savez(
        tmp_path / "keras.npz", x_train=imgs(range(6)), y_train=np.arange(6), x_test=imgs([50]), y_test=[0]
    )
    for f in ("tt.npz", "keras.npz"):
        src = str(tmp_path / f)
        assert _ids(load_dataset(src, "train", 8)) == list(range(6)) and held_out(src, 0)
        assert _ids(load_dataset(src, "test", 8))[0] == 50
    np.savez(tmp_path / "one.npz", images=imgs(range(40)))
    one = str(tmp_path / "one.npz")
    train, test = _ids(load_dataset(one, "train", 8)), _ids(load_dataset(one, "test", 8))
    assert test == [i for i in range(40) if _hashed_out(str(i))] and sorted(train + test) == list(range(40))
    assert test and held_out(one) and not held_out(one, 0)
    assert _ids(load_dataset(one, "test", 8, holdout=0)) == list(range(40))  # no held-out part: all of it
    np.savez(tmp_path / "only-test.npz", test=imgs([1]))
    with pytest.raises(StepadaptError, match="no training array"):
        load_dataset(str(tmp_path / "only-test.npz"))


def test_proxy_sets_come_from_the_training_part(tmp_path):
    from stepadapt.data import proxy_sets

    _write(tmp_path, range(60))
    a, b = proxy_sets(str(tmp_path), 20, 8, 1)
    train, test = (
        set(_ids(load_dataset(str(tmp_path), "train", 8))),
        set(_ids(load_dataset(str(tmp_path), "test", 8))),
    )
    assert len(a) == len(b) == 20 and not set(_ids(a)) & set(_ids(b))
    assert set(_ids(a)) | set(_ids(b)) <= train and test.isdisjoint(_ids(a) + _ids(b))


@pytest.mark.parametrize("holdout", [1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_split_or_holdout_is_a_one_line_error(tmp_path, holdout):
    from stepadapt.data import held_out

    _write(tmp_path, range(4))
    with pytest.raises(StepadaptError, match=r"^unknown split 'validation'; use 'train' or 'test'$"):
        load_dataset(str(tmp_path), "validation")
    with pytest.raises(StepadaptError, match="unknown split 'val'"):
        load_dataset("fashion-mnist", "val")  # said before looking for the files
    with pytest.raises(StepadaptError, match=r"holdout must be a fraction in \[0, 1\), got"):
        load_dataset(str(tmp_path), "test", holdout=holdout)
    with pytest.raises(StepadaptError, match=r"holdout must be a fraction in \[0, 1\)"):
        held_out(str(tmp_path), holdout)
