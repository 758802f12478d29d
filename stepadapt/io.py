"""Atomic writes and pickle-free loading.

Everything the project writes goes through these helpers so that a crash or a
full disk never leaves a half-written file where a good one used to be.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from stepadapt import StepadaptError, first_line

_UMASK = os.umask(0)
os.umask(_UMASK)


STALE_SECONDS = 3600.0  # a temp sibling this old belongs to a writer that died, not a live one


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            _fsync(Path(d) / f)
        _fsync(Path(d))


def clean_stale(path: Path, max_age: float = STALE_SECONDS) -> None:
    """Remove the temp siblings of ``path`` (``.name.*.tmp`` / ``.old``) that crashed writers left."""
    import time

    now = time.time()
    for p in path.parent.glob(f".{path.name}.*"):
        if p.suffix not in (".tmp", ".old") or now - p.lstat().st_mtime <= max_age:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the kernel, libc or filesystem cannot; then the caller falls back to two renames.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; behave like open()
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)  # the rename itself must survive a power cut
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success swap it in for ``path``.

    An existing directory is exchanged with the new one in a single rename, so
    a reader always finds one complete version at ``path``; where the system
    cannot exchange, it is moved aside first (a moment with nothing there) and
    deleted only once the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() and exchange(tmp, path):
            _fsync(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old version now
            return
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "d")
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise StepadaptError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StepadaptError(f"{what} {path} is not valid JSON: {e}") from None


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """Save tensors and plain containers; loadable with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load with ``weights_only=True``: tensors and plain containers, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise StepadaptError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        msg = first_line(e)
        raise StepadaptError(f"{what} {path} is corrupt or unreadable: {msg}") from None


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` as safetensors, atomically; returns the file's sha256 (what a manifest
    records beside the path)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors writes a file of its own, 0600
    return sha256_file(path)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensors(tensors: dict[str, torch.Tensor], extra: Any = None) -> str:
    """Every byte of every tensor, its name, dtype and shape (and ``extra`` as JSON): the identity of
    weights or images wherever they were loaded from, so a bundle can tell its own base from another
    of the same architecture, and a memory-bank entry is reused only for the very same inputs."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for k, v in sorted(tensors.items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
