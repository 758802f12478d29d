"""Datasets as float tensors in [-1, 1], shape N x C x size x size.

Everything is loaded into memory: the datasets this tool targets (Fashion-MNIST,
CIFAR-sized folders) fit easily, and it keeps training sampling deterministic
from one torch.Generator.

Every dataset has a "train" and a "test" split that share no image (see
:func:`load_dataset`), so evaluation and the Gaussian cut-off are judged on
images no model was fitted to.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from stepadapt import Notice, StepadaptError

FASHION_MNIST_DIR = Path(os.environ.get("STEPADAPT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
FASHION_MNIST_LABELS = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
FASHION_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")
SPLITS = ("train", "test")
# Data with no held-out part of its own keeps this fraction back, chosen by hashing names (folders)
# or indices (.npz): evaluation and the Gaussian cut-off must not be judged on training images.
DEFAULT_HOLDOUT = 0.1
HOLDOUT_HELP = (
    "Share of a folder or .npz without its own test part held out, by the hash of each file's name."
)
TRAIN_DIR = "train"  # the Hugging Face imagefolder layout: train/ and test/ (or validation/)
HELD_OUT_DIRS = ("test", "validation")  # the first present is the held-out part
NPZ_TRAIN_KEYS = ("images", "train", "x_train")  # "images" first: what this tool has always read
NPZ_TEST_KEYS = ("test", "x_test", "validation", "x_val")
# An .npz's labels, beside its images: "labels" for the training (or only) array, else Keras' names.
NPZ_LABEL_KEYS = {"train": ("labels", "train_labels", "y_train"), "test": ("test_labels", "y_test", "y_val")}


def _read_idx(path: Path, magic: int, dims: int, what: str) -> tuple[bytes, tuple[int, ...]]:
    """An IDX file's bytes (optionally gzipped) and its ``dims`` sizes, checked against its magic
    number and its length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise StepadaptError(f"cannot read IDX file {path}: {e}") from None
    head = 4 + 4 * dims
    if len(raw) < head:
        raise StepadaptError(f"{path} is too short to be an IDX {what} file")
    found, *sizes = struct.unpack(f">{1 + dims}I", raw[:head])
    if found != magic:
        raise StepadaptError(f"{path} is not an IDX {what} file (magic {found}, expected {magic})")
    if len(raw) != head + int(np.prod(sizes)):
        raise StepadaptError(
            f"{path} is truncated: {len(raw) - head} bytes for {'x'.join(map(str, sizes))} {what}s"
        )
    return raw[head:], tuple(sizes)


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX3 ubyte file (optionally gzipped) into uint8 N x H x W."""
    raw, shape = _read_idx(Path(path), 2051, 3, "image")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX1 ubyte label file (optionally gzipped) into uint8 N."""
    raw, _ = _read_idx(Path(path), 2049, 1, "label")
    return np.frombuffer(raw, dtype=np.uint8)


def _to_model_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8/float N x C x H x W -> float in [-1, 1] at size x size (pad small, resize large)."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    h, w = x.shape[-2:]
    if h <= size and w <= size:
        # Pad (Fashion-MNIST 28 -> 32) with the background value so digits stay crisp.
        ph, pw = size - h, size - w
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()


def load_fashion_mnist(split: str = "train", size: int = 32) -> torch.Tensor:
    if split not in FASHION_MNIST_FILES:
        raise StepadaptError(f"unknown split {split!r}; use 'train' or 'test'")
    path = FASHION_MNIST_DIR / FASHION_MNIST_FILES[split]
    if not path.is_file():
        raise StepadaptError(
            f"Fashion-MNIST not found at {path}: install it with "
            "'apt-get install dataset-fashion-mnist' (or set STEPADAPT_FASHION_MNIST)"
        )
    arr = read_idx_images(path)
    return _to_model_range(torch.from_numpy(arr.copy()).unsqueeze(1), size)


def fashion_mnist_labels(split: str = "train") -> torch.Tensor:
    path = FASHION_MNIST_DIR / FASHION_MNIST_LABELS[split]
    if not path.is_file():
        raise StepadaptError(
            f"Fashion-MNIST labels not found at {path} (apt-get install dataset-fashion-mnist)"
        )
    return torch.from_numpy(read_idx_labels(path).astype(np.int64))


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def _image_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StepadaptError(f"no PNG/JPEG images found under {path}")
    return files


def _hashed_out(name: str, holdout: float) -> bool:
    """Whether ``name`` is held out: sha256, not Python's salted hash(), so every command, machine
    and listing order sees the same split, and adding images never moves the ones already there."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") < holdout * 2**64


def _hash_split(names: list[str], holdout: float) -> list[bool]:
    """Which of ``names`` are held out; none when either part would be empty (a folder too small
    for ``holdout``), so a tiny dataset stays usable as all-training data instead of failing."""
    out = [_hashed_out(n, holdout) for n in names]
    return out if any(out) and not all(out) else [False] * len(names)


def folder_split(path: str | os.PathLike, holdout: float = DEFAULT_HOLDOUT) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of an image folder; the held-out list is empty when it has
    no held-out part (then every file is training data).

    A ``test/`` (else ``validation/``) subfolder is the held-out part, and ``train/`` (else the rest
    of the folder) the training part; without one, files are held out by the hash of their path
    relative to the training folder, a fraction ``holdout`` of them.
    """
    path = Path(path)
    _check_holdout(holdout)
    held_dir = next((path / d for d in HELD_OUT_DIRS if (path / d).is_dir()), None)
    train_dir = path / TRAIN_DIR if (path / TRAIN_DIR).is_dir() else path
    if held_dir is not None:
        train = _image_files(train_dir)
        if train_dir == path:
            train = [f for f in train if f.relative_to(path).parts[0] not in HELD_OUT_DIRS]
            if not train:
                raise StepadaptError(f"{path} has images only in {held_dir.name}/: nothing to train on")
        return train, _image_files(held_dir)
    files = _image_files(train_dir)
    out = _hash_split([f.relative_to(train_dir).as_posix() for f in files], holdout)
    test = [f for f, o in zip(files, out, strict=True) if o]
    return [f for f, o in zip(files, out, strict=True) if not o], test


def _read_images(files: list[Path], size: int) -> torch.Tensor:
    """``files`` center-cropped and resized; 1 channel when every image is grey (an RGB file whose
    channels are equal is grey too), else 3."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                out[i] = np.asarray(_center_square(im.convert("RGB")).resize((size, size), Image.BICUBIC))
        except (UnidentifiedImageError, OSError) as e:
            raise StepadaptError(f"cannot read image {f}: {e}") from None
    # JPEG's chroma rounding leaves grey pictures stored as RGB a level or two off grey.
    grey = bool((np.abs(out.astype(np.int16) - out[..., :1]) <= 2).all())
    x = torch.from_numpy(out[..., :1] if grey else out).permute(0, 3, 1, 2)
    return _to_model_range(x, size)


def load_image_folder(
    path: str | os.PathLike, size: int = 32, split: str = "train", holdout: float = DEFAULT_HOLDOUT
) -> torch.Tensor:
    """One part of an image folder (see :func:`folder_split`), sorted by path; "test" of a folder
    with no held-out part is its training images (:func:`held_out` tells the caller)."""
    _check_split(split)
    train, test = folder_split(path, holdout)
    return _read_images(test if split == "test" and test else train, size)


def native_size(source: str) -> int | None:
    """The side the data comes in, where it has one: an .npz of square images, or a folder whose
    images are all squares of one size (Fashion-MNIST: 32, padded, as the shipped base)."""
    if source in FASHION_NAMES:
        return 32
    p = Path(source)
    try:
        if p.is_dir():
            sizes = set()
            for f in _image_files(p):
                with Image.open(f) as im:
                    sizes.add(im.size)
            (w, h), *rest = sizes
            return w if not rest and w == h else None
        if p.suffix == ".npz" and p.is_file():
            with np.load(p, allow_pickle=False) as z:
                arr = z[_npz_keys(list(z.keys()), p)[0]]
            h, w = _nchw(arr, str(p)).shape[2:]
            return int(h) if h == w else None
    except (OSError, ValueError, StopIteration, UnidentifiedImageError, StepadaptError):
        return None  # load_dataset says what is wrong with it
    return None


def match_channels(x: torch.Tensor, channels: int, source: str) -> torch.Tensor:
    """Data for a model of ``channels``: grey repeated into RGB (said); RGB into grey refused (the
    colour would be thrown away without a word)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        warnings.warn(Notice(f"data {source}: greyscale images, repeated to 3 channels for an RGB model"),
                      stacklevel=2)  # fmt: skip
        return x.repeat(1, 3, 1, 1)
    raise StepadaptError(
        f"data {source} is RGB but the model is greyscale ({channels} channel): converting would throw "
        "its colour away; use an RGB model (train-base --channels 3) or greyscale data"
    )


def _nchw(arr: np.ndarray, what: str) -> np.ndarray:
    """N x H x W, N x H x W x C or N x C x H x W (C 1 or 3) as N x C x H x W; float arrays may
    have other channel counts as N x C x H x W (a latent model's latents, e.g. 4 x 64 x 64)."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    latents = arr.ndim == 4 and np.issubdtype(arr.dtype, np.floating) and arr.shape[-1] not in (1, 3)
    if arr.ndim != 4 or (arr.shape[1] not in (1, 3) and not latents):
        raise StepadaptError(f"{what} has shape {arr.shape}; expected N x H x W [x C]")
    return arr


def _npz_keys(names: list[str], path: Path) -> tuple[str, str | None]:
    """(training array, held-out array or None) of an .npz: ``train``/``test`` or Keras'
    ``x_train``/``x_test`` pairs, else the one array (``images`` or the first) split by index hash.
    Label arrays (:data:`NPZ_LABEL_KEYS`) are never images."""
    names = [n for n in names if n not in _all_label_keys()]
    if not names:
        raise StepadaptError(f"{path} holds no arrays")
    test = next((k for k in NPZ_TEST_KEYS if k in names), None)
    train = next((k for k in NPZ_TRAIN_KEYS if k in names), None)
    train = train or next((k for k in names if k not in NPZ_TEST_KEYS), None)
    if train is None:
        raise StepadaptError(
            f"{path} has a held-out array {test!r} but no training array ('train' or 'images')"
        )
    return train, test


def _npz_part(path: Path, split: str, holdout: float, key: str | None) -> tuple[np.ndarray, str]:
    """One part of an .npz as N x C x H x W, and its name for messages; ``key``: that array whole."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.keys())
            if key is not None:
                if key not in names:
                    raise StepadaptError(f"{path} has no array {key!r} (has {', '.join(names) or 'none'})")
                return _nchw(z[key], f"{path}:{key}"), f"{path}:{key}"
            train, test = _npz_keys(names, path)
            k = test if split == "test" and test is not None else train
            arr = _nchw(z[k], f"{path}:{k}")
    except (OSError, ValueError) as e:
        raise StepadaptError(f"cannot read {path}: {e}") from None
    if test is not None:
        return arr, f"{path}:{k}"
    out = np.array(_hash_split([str(i) for i in range(len(arr))], holdout), dtype=bool)
    return (arr[out] if split == "test" and out.any() else arr[~out]), f"{path}:{k}"


def load_npz(
    path: str | os.PathLike,
    size: int = 32,
    key: str | None = None,
    split: str = "train",
    holdout: float = DEFAULT_HOLDOUT,
) -> torch.Tensor:
    """One part of an .npz of images (see :func:`_npz_keys`; ``key``: that array whole, unsplit):
    N x H x W, N x H x W x C or N x C x H x W; uint8 or float in [-1, 1]. "test" of an .npz with
    no held-out part is its training images (:func:`held_out` tells the caller)."""
    _check_split(split)
    _check_holdout(holdout)
    arr, what = _npz_part(Path(path), split, holdout, key)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.uint8:
        return _to_model_range(t, size)
    t = t.float()
    if not torch.isfinite(t).all():
        raise StepadaptError(f"{what} contains NaN or infinite values")
    return _to_model_range((t + 1.0) / 2.0, size)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise StepadaptError(f"unknown split {split!r}; use 'train' or 'test'")


def _check_holdout(holdout: float) -> None:
    try:
        ok = not isinstance(holdout, bool) and 0 <= holdout < 1  # NaN fails the comparison too
    except TypeError:
        ok = False
    if not ok:
        raise StepadaptError(f"holdout must be a fraction in [0, 1), got {holdout!r}")


def _kind(source: str) -> str:
    """Which loader ``source`` needs (fashion, folder or npz), so that loading and :func:`held_out`
    refuse the same unknown sources with the same one-line error."""
    if source in FASHION_NAMES:
        return "fashion"
    p = Path(source)
    if p.is_dir():
        return "folder"
    if p.suffix == ".npz" and p.is_file():
        return "npz"
    if not p.exists():
        raise StepadaptError(
            f"dataset {source!r} not found: pass 'fashion-mnist', an image folder or an .npz file"
        )
    raise StepadaptError(f"unsupported dataset {source!r}: use an image folder or .npz")


def held_out(source: str, holdout: float = DEFAULT_HOLDOUT) -> bool:
    """Whether ``source`` keeps images out of training (under ``holdout``). Where it does not -- a
    holdout of 0, or too few images for the hash split to leave both parts something -- its "test"
    split is its training images, and a score on it measures memory, not generalisation."""
    _check_holdout(holdout)
    kind = _kind(source)
    if kind == "fashion":
        return True
    if kind == "folder":
        return bool(folder_split(source, holdout)[1])
    path = Path(source)
    try:
        with np.load(path, allow_pickle=False) as z:
            train, test = _npz_keys(list(z.keys()), path)
            n = 0 if test is not None else len(np.atleast_1d(z[train]))
    except (OSError, ValueError) as e:
        raise StepadaptError(f"cannot read {path}: {e}") from None
    return test is not None or any(_hash_split([str(i) for i in range(n)], holdout))


def load_dataset(
    source: str = "fashion-mnist",
    split: str = "train",
    size: int = 32,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
) -> torch.Tensor:
    """Load one split of a dataset by name or path; ``limit`` takes a deterministic random subset.

    "train" and "test" never share an image, so scores on "test" are not flattered by memory: a
    folder's ``train/`` and ``test/`` (or ``validation/``), an .npz's ``train`` and ``test`` arrays,
    Fashion-MNIST's own files, else ``holdout`` of the images kept back by hash (see
    :func:`folder_split`), the same in every command. Where nothing is held out, "test" is the
    training images; :func:`held_out` says so.

    ``channels``: what the model takes (None: the data's own); see :func:`match_channels`.
    """
    _check_split(split)
    _check_holdout(holdout)
    kind = _kind(source)
    if kind == "fashion":
        x = load_fashion_mnist(split, size)
    elif kind == "folder":
        x = load_image_folder(source, size, split, holdout)
    else:
        x = load_npz(source, size, split=split, holdout=holdout)
    if channels is not None:
        x = match_channels(x, channels, source)
    keep = subset(len(x), limit, seed)
    return x if keep is None else x[keep]


def subset(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """The rows ``limit`` keeps of ``n`` (a seeded random subset, in order), or None for all."""
    if limit is None or limit >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values


def class_names(source: str, holdout: float = DEFAULT_HOLDOUT) -> tuple[str, ...]:
    """The classes of labelled data, index order: Fashion-MNIST's ten, a folder's subfolders of its
    training part (sorted: the ImageFolder convention), an .npz's label values 0..max."""
    kind = _kind(source)
    if kind == "fashion":
        return FASHION_CLASSES
    if kind == "folder":
        train, _ = folder_split(source, holdout)
        root = _split_root(Path(source), "train")
        names = {f.relative_to(root).parts[0] for f in train if len(f.relative_to(root).parts) > 1}
        if not names or any(len(f.relative_to(root).parts) < 2 for f in train):
            raise StepadaptError(
                f"{source} is not labelled: a labelled folder has one subfolder per class (train/<class>/...)"
            )
        return tuple(sorted(names))
    y = load_labels(source, "train", holdout)
    return tuple(str(i) for i in range(int(y.max()) + 1))


def _split_root(path: Path, split: str) -> Path:
    held_dir = next((path / d for d in HELD_OUT_DIRS if (path / d).is_dir()), None)
    if split == "test" and held_dir is not None:
        return held_dir
    return path / TRAIN_DIR if (path / TRAIN_DIR).is_dir() else path


def load_labels(source: str, split: str = "train", holdout: float = DEFAULT_HOLDOUT) -> torch.Tensor:
    """The int64 labels of one split, row for row with :func:`load_dataset`'s images (no limit)."""
    _check_split(split)
    kind = _kind(source)
    if kind == "fashion":
        return fashion_mnist_labels(split)
    if kind == "folder":
        classes = {c: i for i, c in enumerate(class_names(source, holdout))}
        train, test = folder_split(source, holdout)
        files, part = (test, "test") if split == "test" and test else (train, "train")
        root = _split_root(Path(source), part)
        names = [f.relative_to(root).parts[0] for f in files]
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise StepadaptError(
                f"{source}: class {unknown[0]!r} of the held-out part is not a training class"
            )
        return torch.tensor([classes[n] for n in names], dtype=torch.long)
    return _npz_labels(Path(source), split, holdout)


def _npz_labels(path: Path, split: str, holdout: float) -> torch.Tensor:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.keys())
            train, test = _npz_keys(names, path)
            part = "test" if split == "test" and test is not None else "train"
            key = next((k for k in NPZ_LABEL_KEYS[part] if k in names), None)
            if key is None:
                raise StepadaptError(
                    f"{path} has no labels for its {part} images (an array named "
                    f"{' or '.join(repr(k) for k in NPZ_LABEL_KEYS[part])})"
                )
            y, n = np.asarray(z[key]), len(z[test if part == "test" else train])
    except (OSError, ValueError) as e:
        raise StepadaptError(f"cannot read {path}: {e}") from None
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise StepadaptError(f"{path}:{key} must be {n} non-negative integer labels, got {y.dtype} {y.shape}")
    y = torch.from_numpy(y.astype(np.int64))
    if test is not None:
        return y
    out = torch.tensor(_hash_split([str(i) for i in range(n)], holdout), dtype=torch.bool)
    return y[out] if split == "test" and out.any() else y[~out]


def _all_label_keys() -> set[str]:
    return {k for keys in NPZ_LABEL_KEYS.values() for k in keys}


def load_labelled(
    source: str = "fashion-mnist",
    split: str = "train",
    size: int = 32,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and their int64 labels, the same rows :func:`load_dataset` gives (same ``limit``)."""
    x = load_dataset(source, split, size, channels, holdout=holdout)
    return paired(x, load_labels(source, split, holdout), source, "labels", limit, seed)


def paired(x: torch.Tensor, rows, source: str, what: str, limit: int | None, seed: int) -> tuple:
    """Images and what goes with each (labels, captions), checked row for row and cut to the
    same ``limit`` rows :func:`load_dataset` would keep."""
    if len(rows) != len(x):
        raise StepadaptError(f"{source}: {len(rows)} {what} for {len(x)} images")
    keep = subset(len(x), limit, seed)
    if keep is None:
        return x, rows
    return x[keep], rows[keep] if isinstance(rows, torch.Tensor) else [rows[i] for i in keep.tolist()]


def proxy_sets(
    source: str, n: int, size: int, channels: int, seed: int = 0, holdout: float = DEFAULT_HOLDOUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint proxy sets: one to score importance, one to judge candidates.

    Both are training-time choices, so a folder or .npz gives both from its training part (split in
    two), leaving its held-out part unseen until evaluation. Fashion-MNIST takes them from its train
    and test files, as the shipped results were made.
    """
    if source in FASHION_NAMES:
        return (
            load_dataset(source, "train", size, channels, limit=n, seed=seed),
            load_dataset(source, "test", size, channels, limit=n, seed=seed),
        )
    x = load_dataset(source, "train", size, channels, limit=2 * n, seed=seed, holdout=holdout)
    if len(x) < 2:
        raise StepadaptError(f"{source} needs at least 2 training images for the proxy sets")
    half = len(x) // 2
    return x[:half], x[half:]


def fingerprint(x: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """The sha256 of a loaded dataset (and its labels, where used): what a plan and a bundle record
    of the images they were fitted to, so a later stage can tell the same data from other data."""
    from stepadapt.io import sha256_tensors

    if labels is not None and hasattr(labels, "tensors"):  # captions (conditioning.Prompts)
        return sha256_tensors({"images": x, **labels.tensors()})
    return sha256_tensors({"images": x} if labels is None else {"images": x, "labels": labels})
