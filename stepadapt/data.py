"""Datasets as float tensors in [-1, 1], shape N x C x size x size.

Everything is loaded into memory: the datasets this tool targets (Fashion-MNIST,
CIFAR-sized folders) fit easily, and it keeps training sampling deterministic
from one torch.Generator.
"""

from __future__ import annotations

import gzip
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
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
FASHION_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX3 ubyte file (optionally gzipped) into uint8 N x H x W."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise StepadaptError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 16:
        raise StepadaptError(f"{path} is too short to be an IDX image file")
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    if magic != 2051:
        raise StepadaptError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
    if len(raw) != 16 + n * h * w:
        raise StepadaptError(f"{path} is truncated: {len(raw) - 16} bytes for {n}x{h}x{w} images")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


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


def load_image_folder(path: str | os.PathLike, size: int = 32) -> torch.Tensor:
    """Every PNG/JPEG under ``path`` (sorted), center-cropped and resized; 1 channel when every
    image is grey (an RGB file whose channels are equal is grey too), else 3."""
    files = _image_files(Path(path))
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
                arr = z["images" if "images" in z else next(iter(z.keys()))]
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
    """N x H x W, N x H x W x C or N x C x H x W (C 1 or 3) as N x C x H x W."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise StepadaptError(f"{what} has shape {arr.shape}; expected N x H x W [x C]")
    return arr


def load_npz(path: str | os.PathLike, size: int = 32, key: str | None = None) -> torch.Tensor:
    """An .npz of images: N x H x W, N x H x W x C or N x C x H x W; uint8 or float in [-1, 1]."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.keys())
            if not names:
                raise StepadaptError(f"{path} holds no arrays")
            k = key or ("images" if "images" in names else names[0])
            if k not in names:
                raise StepadaptError(f"{path} has no array {k!r} (has {', '.join(names)})")
            arr = z[k]
    except (OSError, ValueError) as e:
        raise StepadaptError(f"cannot read {path}: {e}") from None
    t = torch.from_numpy(np.ascontiguousarray(_nchw(arr, f"{path}:{k}")))
    if t.dtype == torch.uint8:
        return _to_model_range(t, size)
    t = t.float()
    if not torch.isfinite(t).all():
        raise StepadaptError(f"{path}:{k} contains NaN or infinite values")
    return _to_model_range((t + 1.0) / 2.0, size)


def load_dataset(
    source: str = "fashion-mnist",
    split: str = "train",
    size: int = 32,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Load a dataset by name or path; ``limit`` takes a deterministic random subset.

    ``channels``: what the model takes (None: the data's own); see :func:`match_channels`.
    """
    if source in FASHION_NAMES:
        x = load_fashion_mnist(split, size)
    else:
        p = Path(source)
        if p.is_dir():
            x = load_image_folder(p, size)
        elif p.suffix == ".npz" and p.is_file():
            x = load_npz(p, size)
        elif not p.exists():
            raise StepadaptError(
                f"dataset {source!r} not found: pass 'fashion-mnist', an image folder or an .npz file"
            )
        else:
            raise StepadaptError(f"unsupported dataset {source!r}: use an image folder or .npz")
    if channels is not None:
        x = match_channels(x, channels, source)
    if limit is not None and limit < len(x):
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:limit].sort().values]
    return x


def proxy_sets(
    source: str, n: int, size: int, channels: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint proxy sets: one to score importance, one held out to judge candidates.

    Fashion-MNIST takes them from its train and test splits; a folder or .npz
    is split in two.
    """
    if source in FASHION_NAMES:
        return (
            load_dataset(source, "train", size, channels, limit=n, seed=seed),
            load_dataset(source, "test", size, channels, limit=n, seed=seed),
        )
    x = load_dataset(source, "train", size, channels, limit=2 * n, seed=seed)
    if len(x) < 2:
        raise StepadaptError(f"{source} needs at least 2 images for the proxy sets")
    half = len(x) // 2
    return x[:half], x[half:]



def fingerprint(x: torch.Tensor) -> str:
    """The sha256 of a loaded dataset: what a plan and a bundle record of the images they were
    fitted to, so a later stage can tell the same data from other data."""
    from stepadapt.io import sha256_tensors

    return sha256_tensors({"images": x})
