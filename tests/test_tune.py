"""`stepadapt tune`: settings within a MAC budget per image are scored, the best lands in the manifest
and becomes the default of sample, evaluate and the endpoint."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.cli import app
from stepadapt.evaluate import load_target
from stepadapt.models import save_base
from stepadapt.solvers import Setting
from stepadapt.tune import Scorer, candidates, tune


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    d = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, d, ignore=shutil.ignore_patterns("triton-*", "onnx"))
    return d


def test_candidates_are_the_settings_within_the_budget(bundle):
    target = load_target(bundle)
    options = candidates(target, 3.0, ["ddim", "heun"], [2, 3, 4, 5, 6], jump=True)
    assert options and all(macs <= 3.0 for _, macs in options)
    for s, macs in options:
        assert macs == pytest.approx(target.macs_per_image(s.steps, s.sampler, s.jump))
    # Heun evaluates twice per step: it fits fewer steps into the same budget.
    assert max(s.steps for s, _ in options if s.sampler == "heun") < max(
        s.steps for s, _ in options if s.sampler == "ddim"
    )
    assert any(s.jump for s, _ in options) and not any(s.jump for s, _ in options if s.sampler == "heun")


@pytest.mark.slow
def test_tune_records_the_best_setting_and_reuses_stored_scores(bundle, tiny, tmp_path, monkeypatch):
    save_base(tiny, tmp_path / "base")
    store = tmp_path / "scores"
    kw = dict(base=tmp_path / "base", samplers=["ddim", "unipc"], steps=[2, 3], jump=False, n=4, seeds=(0,),
              store=store, command="test")  # fmt: skip
    rec = tune(bundle, 3.0, **kw)
    rows = rec["rows"]
    assert len(rows) == len(candidates(load_target(bundle), 3.0, ["ddim", "unipc"], [2, 3]))
    top = min(rows, key=lambda r: (r["kid"], r["macs_per_image"]))
    assert (rec["sampler"], rec["steps"], rec["jump"]) == (top["sampler"], top["steps"], False)
    assert rec["base_best"]["macs_per_image"] <= 3.0 and rec["base_best"]["sampler"] in ("ddim", "unipc")
    on_disk = Bundle.load(bundle).manifest.recommended
    assert on_disk["sampler"] == rec["sampler"] and on_disk["kid"] == rec["kid"] and "rows" not in on_disk
    # A second run scores nothing: every (weights, setting, n, seed, data) is stored.
    monkeypatch.setattr("stepadapt.tune.generate", lambda *a, **k: pytest.fail("scored again"))
    assert tune(bundle, 3.0, **kw)["kid"] == rec["kid"]
    # Other weights are other scores.
    assert Scorer(n=4, store=store)._key(load_target(tmp_path / "base"), Setting("ddim", 2), 0) != Scorer(
        n=4, store=store
    )._key(load_target(bundle), Setting("ddim", 2), 0)


def test_a_budget_nothing_fits_is_a_one_line_error(bundle):
    with pytest.raises(StepadaptError, match="no setting of .* costs at most 0.01"):
        tune(bundle, 0.01, samplers=["ddim"], steps=[2], n=4, seeds=(0,))


@pytest.mark.slow
def test_the_recommendation_is_the_default_of_sample_and_evaluate(bundle, tmp_path):
    b = Bundle.load(bundle)
    b.set_recommended({"sampler": "unipc", "steps": 3, "jump": True})
    runner = CliRunner()
    r = runner.invoke(app, ["sample", "--bundle", str(bundle), "--n", "2", "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert "unipc x3 +jump" in r.output
    given = ["--sampler", "unipc", "--steps", "3", "--jump"]
    r = runner.invoke(
        app, ["sample", "--bundle", str(bundle), "--n", "2", *given, "--out", str(tmp_path / "b.png")]
    )
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    r = runner.invoke(
        app, ["sample", "--bundle", str(bundle), "--n", "2", "--no-jump", "--out", str(tmp_path / "c.png")]
    )
    assert "unipc x3" in r.output and "+jump" not in r.output
    assert not np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "c.npz")["images"])
    where = ["--out", str(tmp_path / "e.json"), "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, ["evaluate", str(bundle), "--n", "3", "--kid-subsets", "2", *where])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["settings"]["sampler"] == "unipc" and report["settings"]["steps"] == 3
    assert report["results"][str(bundle)]["jump"] is True  # the bundle jumps; the base never does


@pytest.mark.parametrize(
    "bad, msg",
    [({"sampler": "warp", "steps": 3}, "unknown sampler 'warp'"),
     ({"sampler": "ddim", "steps": 0}, "recommended.steps"),
     ({"sampler": "ddim", "steps": 3, "jump": "yes"}, "recommended.jump"), ("unipc", "recommended")],
)  # fmt: skip
def test_a_bad_recommendation_in_a_manifest_is_refused_in_one_line(bundle, bad, msg):
    m = json.loads((bundle / "manifest.json").read_text())
    m["recommended"] = bad
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StepadaptError, match=msg) as e:
        Bundle.load(bundle)
    assert "\n" not in str(e.value)


def test_tune_dry_run_lists_settings_and_scores_nothing(bundle):
    r = CliRunner().invoke(app, ["tune", str(bundle), "--max-macs-per-image", "2", "--samplers", "ddim,heun",
                                 "--steps", "2,3", "--dry-run"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "ddim x2" in r.output and "settings within 2.0" in r.output
    assert Bundle.load(bundle).manifest.recommended is None
