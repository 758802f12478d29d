"""The demo: its options, each stage's options built from them, and one whole run on a small random
base, through a real tritonserver."""

from pathlib import Path

import numpy as np
import pytest
from stepadapt.serving.demo import SHIPPED_BUNDLE, DemoOptions, run_demo

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.models import save_base
from stepadapt.plan import Plan


def _small(tmp_path: Path) -> DemoOptions:
    # (a random base is worse than the Gaussian everywhere: the shipped base's demo has one, make demo)
    return DemoOptions(
        out=tmp_path / "out", base=tmp_path / "base", groups=2, n=4, finetune_iterations=3, kid_images=0,
        serve_shipped=False, gaussian=False, candidates=("taylor/global",), proxy_size=16, device="cpu",
        conditional=False,
    )  # fmt: skip


def test_demo_options_round_trip_and_make_each_stages_options(tmp_path):
    o = _small(tmp_path)
    assert DemoOptions.from_json(o.to_json()) == o
    a, p, f = o.analyze_options(), o.prune_options(), o.finetune_options()
    assert (a.out, a.base, a.groups, a.budget, a.proxy_size) == (o.out / "plan.json", o.base, 2, 0.5, 16)
    assert a.gaussian == "off" and DemoOptions().analyze_options().gaussian == "auto"
    assert (p.plan, p.out, p.base, p.candidates) == (a.out, o.out / "bundle", o.base, ("taylor/global",))
    assert p.memory_path == o.out / "memory.json" and not p.nested
    assert (f.bundle, f.iterations, f.teacher) == (p.out, 3, None)  # the teacher: the recorded base
    assert f.needs_teacher and f.mode == "separate"
    assert o.served_source == p.out and o.export_options().bundle == o.out / "served"
    s = o.serve_options(9000, 9001)
    assert (s.bundle, s.host, s.http_port, s.device) == (o.out / "served", "127.0.0.1", 9000, "cpu")
    assert DemoOptions().served_source == SHIPPED_BUNDLE
    for change, msg in [({"budget": 0.0}, "--budget must be in"), ({"n": 0}, "--n must be at least 1"),
                        ({"candidates": ("nope",)}, "bad candidate 'nope'"),
                        ({"device": "gpu"}, "--device must be one of")]:  # fmt: skip
        with pytest.raises(StepadaptError, match=msg):
            o.replace(**change)


@pytest.mark.slow
def test_the_demo_runs_every_stage_and_serves_what_it_made(tmp_path, tiny):
    """analyze -> prune -> fine-tune -> export -> serve, each the stage its command runs: every grid
    and the figure are written, the endpoint's images are onnxruntime's."""
    save_base(tiny, tmp_path / "base")
    logs = []
    result = run_demo(_small(tmp_path), log=logs.append)
    out = tmp_path / "out"
    for name in ("base_samples", "plan", "bundle_samples", "finetuned_samples", "onnxruntime_samples",
                 "endpoint_samples", "base_vs_experts"):  # fmt: skip
        assert (out / f"{name}.png").is_file(), name
    plan = Plan.load(out / "plan.json")
    assert abs(plan.mean_ratio() - 0.5) < 0.02 and plan.gaussian is None
    b = Bundle.load(out / "bundle")
    assert [e.name for e in b.experts] == [g.name for g in plan.groups]
    assert not any(e.parent for e in b.experts)  # each expert pruned from the base by default
    assert b.manifest.base["path"] == str(tmp_path / "base")
    assert all(e.training["mode"] == "separate" for e in b.experts if b.is_pruned(e.name))
    assert all(e.training["distilled"] for e in b.experts if b.is_pruned(e.name))
    served = Bundle.load(out / "served")  # nothing shipped asked for: the demo serves its own bundle
    assert [e.sha256 for e in served.experts] == [e.sha256 for e in b.experts]
    assert all(e.onnx for e in served.experts) and not (out / "bundle" / "onnx").exists()
    assert result["kid"] == {}  # kid_images=0 skips the KID stage
    assert result["endpoint_max_pixel_diff"] <= 2
    assert result["figure"] == out / "base_vs_experts.png" and 0 < result["macs_ratio"] < 1
    assert result["setting"] == result["base_setting"] == "ddim x50"
    assert any("serving" in line for line in logs) and any("[7/8] serve" in line for line in logs)
    assert "conditional" not in result


def test_the_shipped_bundle_is_what_the_demo_serves():
    b = Bundle.load(SHIPPED_BUNDLE)  # checksums verify
    assert abs(b.manifest.trajectory_macs_ratio() - 0.5) < 0.02
    assert all(e.training for e in b.experts if b.is_pruned(e.name))  # fine-tuned, not only pruned
    assert (SHIPPED_BUNDLE / "MODEL_CARD.md").is_file()
    pruned = next(e.name for e in b.experts if b.is_pruned(e.name))
    assert np.isfinite(b.load_expert(pruned).conv_in.weight.detach().numpy()).all()
