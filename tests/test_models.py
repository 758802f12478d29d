import json

import pytest
import torch
import torch_pruning as tp

from stepadapt import StepadaptError
from stepadapt.models import DEFAULT_BASE, build_unet, count_params, load_base, save_base


def test_ddpm_cifar10_config_matches_the_published_model():
    m = build_unet("ddpm-cifar10")
    assert abs(count_params(m) - 35.7e6) / 35.7e6 < 0.01
    macs, _ = tp.utils.count_ops_and_params(m, (torch.randn(1, 3, 32, 32), torch.tensor([1])))
    assert abs(macs - 6.06e9) / 6.06e9 < 0.01


def test_tiny_is_small_enough_for_a_cpu():
    m = build_unet("tiny")
    macs, params = tp.utils.count_ops_and_params(m, (torch.randn(1, 1, 32, 32), torch.tensor([1])))
    assert macs <= 0.1e9
    assert params < 1e6


def test_unknown_config_is_refused():
    with pytest.raises(StepadaptError, match="unknown model config"):
        build_unet("huge")


def test_diffusers_dir_round_trip_is_exact(tmp_path, tiny):
    save_base(tiny, tmp_path / "m", {"beta_end": 0.02})
    loaded, sched = load_base(tmp_path / "m")
    assert sched["num_train_timesteps"] == 1000
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(tiny(x, t).sample, loaded(x, t).sample)
    assert not list((tmp_path).glob(".m.*")), "temporary dirs must not be left behind"


def test_overwriting_a_model_dir_is_atomic(tmp_path, tiny, monkeypatch):
    save_base(tiny, tmp_path / "m")
    other = build_unet("tiny", seed=1)

    def crash_half_way(self, directory, **kwargs):  # the weights are written, then the process dies
        real_save(self, directory, **kwargs)
        raise KeyboardInterrupt

    real_save = type(other).save_pretrained
    monkeypatch.setattr(type(other), "save_pretrained", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_base(other, tmp_path / "m")
    loaded, _ = load_base(tmp_path / "m")  # a delete-then-write would have lost the old model here
    assert torch.equal(loaded.conv_in.weight, tiny.conv_in.weight)
    monkeypatch.undo()
    save_base(other, tmp_path / "m")
    loaded, _ = load_base(tmp_path / "m")
    assert torch.equal(loaded.conv_in.weight, other.conv_in.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_model_dirs_give_clear_errors(tmp_path, tiny):
    with pytest.raises(StepadaptError, match="not found"):
        load_base(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepadaptError, match="no config.json"):
        load_base(tmp_path / "empty")
    save_base(tiny, tmp_path / "pickled")
    w = tmp_path / "pickled" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(StepadaptError, match="never pickles"):
        load_base(tmp_path / "pickled")
    save_base(tiny, tmp_path / "corrupt")
    w = tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(StepadaptError, match="cannot load model"):
        load_base(tmp_path / "corrupt")
    save_base(tiny, tmp_path / "badjson")
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(StepadaptError, match="not valid JSON"):
        load_base(tmp_path / "badjson")


@pytest.mark.skipif(not DEFAULT_BASE.is_dir(), reason="shipped base not present")
def test_shipped_base_loads_and_has_a_model_card():
    model, sched = load_base()
    assert model.config.in_channels == 1 and model.config.sample_size == 32
    assert (DEFAULT_BASE / "MODEL_CARD.md").is_file()
    cfg = json.loads((DEFAULT_BASE / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DModel"
    assert sched["beta_schedule"] == "linear"


def test_writes_are_fsynced_and_crashed_writers_temp_dirs_are_cleaned(tmp_path, tiny, monkeypatch):
    import os
    import time

    stale_dir, stale_file = tmp_path / ".m.abc123.tmp", tmp_path / ".m.def456.old"
    live = tmp_path / ".m.ghi789.tmp"  # a writer at work right now: not ours to delete
    for p in (stale_dir, live):
        p.mkdir()
        (p / "x").write_text("half")
    stale_file.write_text("half")
    hours_ago = time.time() - 2 * 3600
    for p in (stale_dir, stale_file):
        os.utime(p, (hours_ago, hours_ago))
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    save_base(tiny, tmp_path / "m")
    assert not stale_dir.exists() and not stale_file.exists() and live.is_dir()
    assert len(synced) >= 4  # the files, their directories and the parent after the rename
    assert load_base(tmp_path / "m")[0] is not None


def test_replacing_a_directory_never_leaves_the_path_empty(tmp_path, monkeypatch):
    """atomic_dir swaps old and new in one rename: spy on every rename it makes and look at the
    path after each; a move-aside-then-move-in would leave a moment with nothing there."""
    import os

    from stepadapt import io

    target = tmp_path / "bundle"
    with io.atomic_dir(target) as d:
        (d / "manifest.json").write_text("1")
    probe, probe2 = tmp_path / "p", tmp_path / "q"
    probe.mkdir(), probe2.mkdir()
    if not io.exchange(probe, probe2):
        pytest.skip("this filesystem cannot exchange two paths (renameat2 RENAME_EXCHANGE)")
    seen = []
    real = os.replace

    def spy(a, b):
        real(a, b)
        seen.append((target / "manifest.json").read_text() if target.exists() else None)

    monkeypatch.setattr(os, "replace", spy)
    for version in "23":
        with io.atomic_dir(target) as d:
            (d / "manifest.json").write_text(version)
        assert (target / "manifest.json").read_text() == version
    assert None not in seen
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]  # old versions gone
