import numpy as np
from typer.testing import CliRunner

from stepadapt.cli import app
from stepadapt.models import save_base

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
    assert r.exit_code == 2 and "steps must be in" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.png").exists()


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
