"""Caption data: metadata.jsonl and .txt captions beside the images, Fashion-MNIST's templates, and
the Prompts rows a text encoder makes of them (each distinct caption encoded once)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepadapt import StepadaptError
from stepadapt.captions import FASHION_PHRASES, TEMPLATES, class_prompt, load_captioned, load_captions
from stepadapt.conditioning import Prompts, drop_rows, rows_cond
from stepadapt.data import fingerprint, load_dataset


def _images(d, names):
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.fromarray(np.full((8, 8), 20 * i, dtype=np.uint8)).save(d / n)


def test_metadata_and_txt_captions_are_row_for_row_with_the_images(tmp_path):
    _images(tmp_path / "train", ["a.png", "b.png", "c.png"])
    (tmp_path / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a coat"})
        + "\n"
        + json.dumps({"file_name": "b.png", "text": "a bag"})
    )
    (tmp_path / "train" / "c.txt").write_text("a dress\n")
    (tmp_path / "train" / "b.txt").write_text("ignored: the metadata wins\n")
    x, texts = load_captioned(tmp_path, "train", 8, 1)
    assert texts == ["a coat", "a bag", "a dress"]
    assert torch.equal(x, load_dataset(str(tmp_path), "train", 8, 1))
    sub, sub_texts = load_captioned(tmp_path, "train", 8, 1, limit=2, seed=1)
    by_pixel = {int(img[0, 0, 0].round(decimals=4) * 1e4): t for img, t in zip(x, texts, strict=True)}
    assert len(sub) == 2 and [by_pixel[int(img[0, 0, 0].round(decimals=4) * 1e4)] for img in sub] == sub_texts


def test_missing_or_malformed_captions_are_one_line_errors(tmp_path):
    _images(tmp_path / "f", ["a.png", "b.png"])
    (tmp_path / "f" / "a.txt").write_text("a coat")
    with pytest.raises(StepadaptError, match=r"b.png has no caption: .*metadata.jsonl.*b.txt"):
        load_captions(str(tmp_path / "f"))
    (tmp_path / "f" / "metadata.jsonl").write_text('{"file_name": "b.png"}\n')
    with pytest.raises(StepadaptError, match=r"metadata.jsonl:1: each line must be a JSON object with"):
        load_captions(str(tmp_path / "f"))
    (tmp_path / "f" / "metadata.jsonl").write_bytes(b'{"file_name": "b.png", "text": "caf\xe9"}\n')
    with pytest.raises(StepadaptError, match=r"metadata.jsonl: not UTF-8 text \(byte 35\)"):
        load_captions(str(tmp_path / "f"))
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(StepadaptError, match="has no captions"):
        load_captions(str(tmp_path / "x.npz"))


def test_fashion_mnist_captions_come_from_the_labels_by_templates():
    texts = load_captions("fashion-mnist", "test")
    assert len(texts) == 10_000 and texts == load_captions("fashion-mnist", "test")  # the same every time
    assert set(texts) <= {t.format(p) for t in TEMPLATES for p in FASHION_PHRASES}
    assert len(set(texts)) == len(TEMPLATES) * len(FASHION_PHRASES)
    assert class_prompt(9) == "a photo of an ankle boot"
    with pytest.raises(StepadaptError, match="classes 0..9"):
        class_prompt(10)


def test_prompts_rows_slice_drop_and_fingerprint():
    table = torch.randn(4, 5, 6)  # three captions and the empty prompt
    p = Prompts(torch.tensor([0, 1, 2, 1, 0]), table)
    assert p.null == 3 and p.shape == (5,) and len(p[1:3]) == 2
    assert torch.equal(rows_cond(p[torch.tensor([1, 4])])["encoder_hidden_states"], table[[1, 0]])
    dropped = drop_rows(p, 1.0, None, torch.Generator().manual_seed(0))
    assert (dropped.ids == 3).all()
    x = torch.zeros(5, 1, 2, 2)
    assert fingerprint(x, p) != fingerprint(x, Prompts(p.ids, table + 1))  # what the ids mean counts
    labels = torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(drop_rows(labels, 1.0, None, torch.Generator()), labels)  # no null class: kept
