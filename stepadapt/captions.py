"""Captions: the text beside each training image of a text-to-image model.

Two sources, row for row with :func:`stepadapt.data.load_dataset`'s images:

- an image folder with captions, in the Hugging Face ``imagefolder`` convention -- a
  ``metadata.jsonl`` (one JSON object per line with ``file_name``, relative to the file, and
  ``text``) in the folder or in each split folder -- or a ``.txt`` beside each image (``a.png`` +
  ``a.txt``); the metadata wins where both exist;
- Fashion-MNIST, captioned from its labels by a few templates per class ("a photo of an ankle
  boot"), the template chosen by a hash of the image's index, so every command sees the same text.

Captions are data, not model inputs: a text encoder turns them into embeddings once
(:mod:`stepadapt.text`), and training and pruning index those by row.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from stepadapt import StepadaptError
from stepadapt.data import (
    DEFAULT_HOLDOUT,
    FASHION_CLASSES,
    _check_split,
    _kind,
    fashion_mnist_labels,
    folder_split,
    load_dataset,
    paired,
)

METADATA = "metadata.jsonl"
# What each Fashion-MNIST class is called in a sentence, with its article.
FASHION_PHRASES = (
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
    "a sneaker", "a bag", "an ankle boot",
)  # fmt: skip
TEMPLATES = ("a photo of {}", "{}", "a picture of {}", "a black and white photo of {}")
assert len(FASHION_PHRASES) == len(FASHION_CLASSES)


def class_prompt(label: int, template: int = 0) -> str:
    """The prompt that asks for Fashion-MNIST class ``label`` (the first template by default)."""
    if not 0 <= label < len(FASHION_PHRASES):
        raise StepadaptError(f"Fashion-MNIST has classes 0..{len(FASHION_PHRASES) - 1}, not {label}")
    return TEMPLATES[template % len(TEMPLATES)].format(FASHION_PHRASES[label])


def fashion_captions(labels: torch.Tensor, split: str = "train") -> list[str]:
    """One caption per labelled image: its class phrase in a template picked by the image's index."""
    out = []
    for i, y in enumerate(labels.tolist()):
        h = int.from_bytes(hashlib.sha256(f"{split}:{i}".encode()).digest()[:4], "big")
        out.append(class_prompt(int(y), h))
    return out


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StepadaptError(f"{path}: not UTF-8 text (byte {e.start}); save captions as UTF-8") from None


def _metadata(root: Path) -> dict[Path, str]:
    """``file -> text`` from every ``metadata.jsonl`` under ``root`` (each names files relative to
    itself); a malformed line is a one-line error naming the file and the line."""
    out: dict[Path, str] = {}
    for meta in sorted(root.rglob(METADATA)):
        for n, line in enumerate(_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise StepadaptError(
                    f"{meta}:{n}: each line must be a JSON object with 'file_name' and 'text'"
                ) from None
            if not isinstance(name, str) or not isinstance(text, str):
                raise StepadaptError(f"{meta}:{n}: 'file_name' and 'text' must be strings")
            out[(meta.parent / name).resolve()] = text
    return out


def folder_captions(files: list[Path], root: Path) -> list[str]:
    """The caption of each of ``files``: from the metadata under ``root``, else its ``.txt``."""
    meta = _metadata(root)
    out = []
    for f in files:
        text = meta.get(f.resolve())
        if text is None:
            txt = f.with_suffix(".txt")
            if not txt.is_file():
                raise StepadaptError(
                    f"{f} has no caption: list it in a {METADATA} (file_name, text) or write {txt.name}"
                )
            text = _text(txt).strip()
        out.append(text)
    return out


def load_captions(source: str, split: str = "train", holdout: float = DEFAULT_HOLDOUT) -> list[str]:
    """The captions of one split, row for row with :func:`load_dataset`'s images (no limit)."""
    _check_split(split)
    kind = _kind(source)
    if kind == "fashion":
        return fashion_captions(fashion_mnist_labels(split), split)
    if kind == "folder":
        train, test = folder_split(source, holdout)
        return folder_captions(test if split == "test" and test else train, Path(source))
    raise StepadaptError(
        f"{source} has no captions: a text-to-image model needs an image folder with {METADATA} or "
        ".txt captions, or fashion-mnist (captioned from its labels)"
    )


def load_captioned(
    source: str | os.PathLike,
    split: str = "train",
    size: int = 32,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
) -> tuple[torch.Tensor, list[str]]:
    """Images and their captions, the same rows :func:`load_dataset` gives (same ``limit``)."""
    source = str(source)
    x = load_dataset(source, split, size, channels, holdout=holdout)
    return paired(x, load_captions(source, split, holdout), source, "captions", limit, seed)
