import json

import numpy as np
import pytest
import torch

from stepadapt import StepadaptError
from stepadapt.classifier import (
    CONFIG_NAME,
    DEFAULT_CLASSIFIER,
    WEIGHTS_NAME,
    ClassifierConfig,
    ClassifierOptions,
    build_classifier,
    class_accuracy,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from stepadapt.data import FASHION_MNIST_DIR, load_labelled
from stepadapt.io import sha256_file
from stepadapt.sampling import to_uint8

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def _shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 32 x 32 images of three classes a flip or a small shift cannot confuse: a
    horizontal bar, a vertical bar, a filled square (each moved a little, with noise)."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 40, (n, 32, 32), dtype=np.uint8)
    y = np.arange(n) % 3
    for i, c in enumerate(y):
        r, k = g.integers(-3, 4, 2) + 12
        if c == 0:
            x[i, r : r + 6, 4:28] = 255
        elif c == 1:
            x[i, 4:28, k : k + 6] = 255
        else:
            x[i, r : r + 10, k : k + 10] = 255
    return x, y


@pytest.fixture
def shapes_npz(tmp_path):
    path = tmp_path / "shapes.npz"
    (x, y), (xt, yt) = _shapes(48, 0), _shapes(30, 1)
    np.savez(path, images=x, labels=y, test=xt, test_labels=yt)
    return path


def _options(data, out, **kw) -> ClassifierOptions:
    kw = dict(widths=(8, 16), iterations=40, batch_size=16, lr=1e-2, threads=2, device="cpu") | kw
    return ClassifierOptions(out=out, data=str(data), **kw)


def test_trains_on_labelled_npz_and_round_trips(shapes_npz, tmp_path):
    lines = []
    result, path = train_classifier(_options(shapes_npz, tmp_path / "c"), lines.append)
    assert result.test_accuracy >= 0.9 and result.test_images == 30
    assert set(result.per_class) == {"0", "1", "2"}
    clf = load_classifier(path)
    assert clf.config.classes == ("0", "1", "2") and not clf.training
    x, y = load_labelled(str(shapes_npz), "test")
    # the accuracy measured before saving is the loaded model's: the same predictions
    assert class_accuracy(clf, to_uint8(x), y) == pytest.approx(result.test_accuracy)
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["sha256"] == sha256_file(path / WEIGHTS_NAME)
    assert ClassifierOptions.from_dict(meta["provenance"]["options"]) == _options(shapes_npz, tmp_path / "c")
    assert any("test accuracy" in line for line in lines)


def test_training_is_deterministic_and_keeps_a_card(shapes_npz, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "MODEL_CARD.md").write_text("card")
    _, a = train_classifier(_options(shapes_npz, tmp_path / "a", iterations=5))
    _, b = train_classifier(_options(shapes_npz, tmp_path / "b", iterations=5))
    assert sha256_file(a / WEIGHTS_NAME) == sha256_file(b / WEIGHTS_NAME)
    assert (a / "MODEL_CARD.md").read_text() == "card"


def test_save_load_gives_the_same_logits(tmp_path):
    clf = build_classifier(ClassifierConfig(classes=("a", "b"), channels=3, widths=(4, 8)), seed=1).eval()
    loaded = load_classifier(save_classifier(clf, tmp_path / "c"))
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(clf(x), loaded(x))
    img = to_uint8(x)
    assert torch.equal(predict(clf, img), predict(loaded, img))


@pytest.fixture
def saved(tmp_path):
    clf = build_classifier(ClassifierConfig(classes=("a", "b"), widths=(4, 8)))
    return save_classifier(clf, tmp_path / "c")


def _one_line_error(path, match: str) -> None:
    with pytest.raises(StepadaptError, match=match) as e:
        load_classifier(path)
    assert "\n" not in str(e.value)


def test_missing_parts_are_one_line_errors(saved, tmp_path):
    _one_line_error(tmp_path / "nowhere", "not found")
    (saved / WEIGHTS_NAME).unlink()
    _one_line_error(saved, "has no model.safetensors")
    (saved / CONFIG_NAME).write_text("{not json")
    _one_line_error(saved, "not valid JSON")
    (saved / CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    _one_line_error(saved, "not a stepadapt-classifier")


def test_corrupt_weights_and_shape_mismatch_are_one_line_errors(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    (saved / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes()[:100])
    _one_line_error(saved, "sha256")
    del meta["sha256"]  # a config without one: the weights' own format is then the check
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    _one_line_error(saved, "corrupt or unreadable")
    save_classifier(build_classifier(ClassifierConfig(classes=("a", "b"), widths=(4, 8))), saved)
    meta = json.loads((saved / CONFIG_NAME).read_text())
    meta["config"]["widths"] = [4, 12]
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    _one_line_error(saved, "does not fit its config")


def test_wrong_labels_and_images_are_errors(saved):
    clf = load_classifier(saved)
    img = np.zeros((4, 32, 32, 1), dtype=np.uint8)
    assert predict(clf, img).shape == (4,)
    with pytest.raises(StepadaptError, match="3 labels for 4 images"):
        class_accuracy(clf, img, [0, 1, 0])
    with pytest.raises(StepadaptError, match="labels must be in 0..1"):
        class_accuracy(clf, img, [0, 1, 2, 0])
    with pytest.raises(StepadaptError, match="uint8 N x 32 x 32 x 1"):
        predict(clf, img.astype(np.float32))
    with pytest.raises(StepadaptError, match="uint8 N x 32 x 32 x 1"):
        predict(clf, np.zeros((4, 28, 28, 1), dtype=np.uint8))


def test_bad_options_are_refused():
    with pytest.raises(StepadaptError, match="--iterations"):
        ClassifierOptions(iterations=0)
    with pytest.raises(StepadaptError, match="--widths"):
        ClassifierOptions(widths=())
    with pytest.raises(StepadaptError, match="--device"):
        ClassifierOptions(device="tpu")
    o = ClassifierOptions(widths=(8, 16), lr=1e-3)
    assert ClassifierOptions.from_json(o.to_json()) == o


@needs_fmnist
def test_shipped_classifier_scores_real_test_images():
    clf = load_classifier()
    assert clf.config.classes[0] == "T-shirt/top" and len(clf.config.classes) == 10
    assert (DEFAULT_CLASSIFIER / WEIGHTS_NAME).stat().st_size <= 1_000_000
    x, y = load_labelled("fashion-mnist", "test", limit=1000, seed=0)
    assert class_accuracy(clf, to_uint8(x), y) >= 0.9
