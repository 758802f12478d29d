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
    r = runner.invoke(app, ["sample", "--steps", "0", "--base", str(tmp_path / "missing")])
    assert r.exit_code == 2
