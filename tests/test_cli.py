import numpy as np
import pytest
from typer.testing import CliRunner

from stepadapt.cli import app
from stepadapt.models import build_unet, save_base

runner = CliRunner()


def test_help_lists_the_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("train-base", "sample", "demo"):
        assert cmd in r.output


def test_sample_writes_grid_and_npz(tmp_path, tiny):
    save_base(tiny, tmp_path / "m")
    out = tmp_path / "s.png"
    r = runner.invoke(
        app,
        ["sample", "--base", str(tmp_path / "m"), "--n", "3", "--steps", "3", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    imgs = np.load(out.with_suffix(".npz"))["images"]
    assert imgs.shape == (3, 32, 32, 1) and imgs.dtype == np.uint8
    assert out.stat().st_size > 0


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    r = runner.invoke(app, ["sample", "--base", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["sample", "--steps", "0", "--out", str(tmp_path / "x.png")])  # the shipped base
    assert r.exit_code == 2 and "steps must be" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_analyze_prune_info_and_routed_sample(tmp_path, tiny):
    save_base(tiny, tmp_path / "m")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    common = ["--base", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz")]
    r = runner.invoke(
        app, ["analyze", *common, "--groups", "3", "--budget", "0.6", "--proxy-size", "8",
              "--out", str(tmp_path / "plan.json")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    r = runner.invoke(
        app, ["prune", *common, "--plan", str(tmp_path / "plan.json"), "--proxy-size", "4",
              "--candidates", "taylor/global", "--out", str(tmp_path / "bundle")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    assert "g0" in r.output and "g2" in r.output and "trajectory mean" in r.output
    r = runner.invoke(
        app, ["sample", "--bundle", str(tmp_path / "bundle"), "--n", "2", "--steps", "4",
              "--out", str(tmp_path / "s.png")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 32, 32, 1)
    r = runner.invoke(app, ["prune", *common, "--plan", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "plan not found" in r.output


@pytest.mark.slow
def test_train_base_takes_channels_and_size_from_the_data_and_a_mismatch_is_refused(tmp_path):
    """An RGB folder of 16 x 16 images makes an RGB 16 x 16 model; that folder against a grey base is
    refused in one line (the colour would be lost), and grey data for the RGB model is said."""
    import json

    from PIL import Image

    from stepadapt import Notice

    rng = np.random.default_rng(0)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(rgb / f"{i}.png")
    with pytest.warns(Notice, match="training tiny at 16 x 16, the data's size"):
        args = ["--iterations", "2", "--batch-size", "4", "--checkpoint-every", "2"]
        r = runner.invoke(app, ["train-base", "--data", str(rgb), "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg["in_channels"] == cfg["out_channels"] == 3 and cfg["sample_size"] == 16
    save_base(build_unet("tiny"), tmp_path / "grey-base")
    r = runner.invoke(app, ["analyze", "--base", str(tmp_path / "grey-base"), "--data", str(rgb),
                            "--gaussian", "off", "--out", str(tmp_path / "p.json")])  # fmt: skip
    assert r.exit_code == 2 and "is RGB but the model is greyscale" in " ".join(r.output.split())
    assert not (tmp_path / "p.json").exists()
    with pytest.warns(Notice, match="repeated to 3 channels"):
        r = runner.invoke(app, ["analyze", "--base", str(tmp_path / "run" / "model"), "--data",
                                "fashion-mnist", "--gaussian", "off", "--proxy-size", "8",
                                "--out", str(tmp_path / "q.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train-base", "--data", str(rgb), "--size", "18", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "divisible by 4" in " ".join(r.output.split())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_device_choice_without_a_gpu(tmp_path, tiny):
    """auto falls back to the CPU; cuda asked for where there is none is one line, for torch and for
    onnxruntime alike (the GPU paths themselves run only where a GPU is lent)."""
    save_base(tiny, tmp_path / "m")
    base = ["sample", "--base", str(tmp_path / "m"), "--n", "1", "--steps", "2"]
    r = runner.invoke(app, [*base, "--device", "auto", "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, "--device", "cuda", "--out", str(tmp_path / "b.png")])
    assert r.exit_code == 2 and "no CUDA device" in " ".join(r.output.split())
    assert not (tmp_path / "b.png").exists()
    for cmd in ("analyze", "prune", "train-base", "finetune", "evaluate", "demo"):
        target = [str(tmp_path / "no-bundle")] if cmd in ("finetune", "evaluate") else []
        out = [] if cmd == "finetune" else ["--out", str(tmp_path / cmd)]
        r = runner.invoke(app, [cmd, *target, "--device", "cuda", *out])
        assert r.exit_code == 2 and "no CUDA device" in " ".join(r.output.split()), (cmd, r.output)


def test_bad_device_or_precision_names_are_refused_first(tmp_path):
    """In one line, before any data or model loads (none of these paths exists)."""
    r = runner.invoke(app, ["analyze", "--device", "gpu", "--base", str(tmp_path / "m"),
                            "--out", str(tmp_path / "p.json")])  # fmt: skip
    assert r.exit_code == 2 and "--device must be one of auto, cpu, cuda" in " ".join(r.output.split())
    for cmd in (["train-base", "--data", str(tmp_path / "none")], ["finetune", str(tmp_path / "none")]):
        r = runner.invoke(app, [*cmd, "--precision", "fp8"])
        assert r.exit_code == 2 and "--precision must be one of" in " ".join(r.output.split()), r.output
