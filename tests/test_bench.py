"""`stepadapt bench --quick` end to end (real onnxruntime, real Triton): the report's schema and
that every figure is a positive finite number; never the values themselves."""

import copy
import json

import pytest
from stepadapt.benchmarks.bench import SECTIONS, check_report
from typer.testing import CliRunner

from stepadapt.cli import app
from stepadapt.models import DEFAULT_BASE

SHIPPED = DEFAULT_BASE.parent / "fashion-tiny-experts"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    args = ["bench", str(SHIPPED), "--quick", "--results", str(d / "results"),
            "--docs", str(d / "docs" / "benchmarks.md"), "--work", str(d / "work")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return d, json.loads((d / "results" / "bench-fashion-tiny-experts.json").read_text())


@pytest.mark.slow
def test_quick_bench_report_is_complete_and_sound(quick):
    _, report = quick
    assert check_report(report) == []
    assert set(SECTIONS) <= set(report)
    assert report["settings"]["quick"] is True and report["machine"]["cores"] >= 1
    arms = {c["arm"] for c in report["latency"]["cells"]}
    assert arms == {"base", "uniform", "experts"}
    cells = report["latency"]["cells"]
    assert {(c["backend"], c["batch"]) for c in cells} == {
        (b, n) for b in ("torch", "onnxruntime-t1") for n in (1, 8)
    }
    assert all(len(c["samples_ms"]) >= 3 for c in cells)
    assert [lv["concurrency"] for lv in report["serving"]["layouts"]["fused"]["levels"]] == [1, 4]
    assert all(lv["requests"] >= lv["concurrency"] for lv in report["serving"]["layouts"]["fused"]["levels"])
    experts = [t for t in report["flops"]["trajectory"] if t["arm"] == "experts"]
    assert all(0 < t["mac_ratio"] < 1 for t in experts)  # the shipped bundle is pruned
    load = report["load"]
    assert {(x["arm"], x["multiplier"]) for x in load["levels"]} == {
        (a, m)
        for a in ("base", "lockstep", "engine", "degrade")
        for m in report["settings"]["load"]["multipliers"]
    }
    assert all(x["sent"] >= 1 and 0 <= x["slo_attainment"] <= 1 for x in load["levels"])
    assert set(load["capacity_images_per_s"]) == {"base", "lockstep", "engine"}
    assert set(load["slo_ms"]) == {"base", "lockstep", "engine", "degrade"}


@pytest.mark.slow
def test_quick_bench_renders_the_page_and_plots(quick):
    d, report = quick
    page = (d / "docs" / "benchmarks.md").read_text()
    assert "## fashion-tiny-experts" in page and report["command"] in page
    assert "### Load (open loop)" in page
    for kind in ("latency", "serving", "load"):
        png = d / "docs" / "images" / f"bench-fashion-tiny-experts-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"images/{png.name}" in page


def test_check_report_names_what_is_wrong(quick):
    _, report = quick
    bad = copy.deepcopy(report)
    bad["latency"]["cells"][0]["median_ms"] = float("nan")
    bad["serving"]["layouts"]["fused"]["levels"][0]["images_per_s"] = -1.0
    del bad["machine"]
    problems = check_report(bad)
    assert "missing machine" in problems
    assert any(p.startswith("latency.cells[0].median_ms") for p in problems)
    assert any("levels[0].images_per_s" in p for p in problems)


def test_bench_refuses_unknown_sections(tmp_path):
    r = CliRunner().invoke(app, ["bench", str(SHIPPED), "--sections", "flops,speed", "--work", str(tmp_path)])
    assert r.exit_code != 0 and "unknown bench section" in r.output


def test_bench_backends_are_what_this_machine_has():
    """GPU backends join the default set only where CUDA is; asked for without one, or misspelled,
    they are refused in one line before anything is measured."""
    import torch
    from stepadapt.benchmarks.bench import CPU_BACKENDS, GPU_BACKENDS, BenchSettings, check_backends

    from stepadapt import StepadaptError

    defaults = BenchSettings().backends
    assert defaults[: len(CPU_BACKENDS)] == CPU_BACKENDS
    assert bool(set(defaults) & set(GPU_BACKENDS)) == torch.cuda.is_available()
    check_backends(("torch", "onnxruntime-t4", "onnxruntime-basic-t1"))
    with pytest.raises(StepadaptError, match="unknown bench backend 'onnxruntime-t0'"):
        check_backends(("onnxruntime-t0",))
    if not torch.cuda.is_available():
        with pytest.raises(StepadaptError, match="torch-cuda cannot run here: no CUDA device"):
            check_backends(("torch-cuda",))


def test_bench_refuses_a_backend_it_cannot_run(tmp_path):
    work = tmp_path / "work"
    args = ["bench", str(SHIPPED), "--backends", "torch,tensorflow", "--work", str(work)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "unknown bench backend 'tensorflow'" in " ".join(r.output.split())
    assert not work.exists()  # refused before any arm was prepared


def test_one_model_arms_are_bundles_drafted_like_any_other(tmp_path):
    """The base and uniform arms go through the bundle's drafts (their kind writes the files); the
    base is recognised as itself, so the experts' copy of it is not timed twice, and nothing else is."""
    from stepadapt.benchmarks.bench import _model_bundle, is_base

    from stepadapt.bundle import Bundle
    from stepadapt.models import load_base

    shipped = Bundle.load(SHIPPED)
    m = shipped.manifest
    b = _model_bundle(tmp_path / "base", m, "base", load_base(DEFAULT_BASE)[0], [])
    (e,) = Bundle.load(b.path).experts
    assert (e.name, e.timesteps, e.macs) == ("base", (0, m.num_train_timesteps), m.base_macs)
    assert is_base(b, e) and b.describe("base") == shipped.describe("g0")
    assert [is_base(shipped, x) for x in shipped.experts] == [x.macs == m.base_macs for x in shipped.experts]
    assert sum(is_base(shipped, x) for x in shipped.experts) == 1
