import json
import shutil

import numpy as np
import pytest
import torch
from stepadapt.export import MAX_BATCH
from stepadapt.export.onnx import export_bundle, onnx_router
from stepadapt.export.stage import ExportOptions, export
from stepadapt.export.tensorrt import unavailable_reason
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.cli import app
from stepadapt.io import sha256_file
from stepadapt.sampling import sample_images


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("e") / "bundle"
    shutil.copytree(tiny_bundle, d)
    reports = export_bundle(Bundle.load(d), batches=(1, 3, 8))
    return d, reports


@pytest.mark.slow
def test_every_expert_exports_with_parity(exported):
    d, reports = exported
    b = Bundle.load(d)
    assert [r.name for r in reports] == [e.name for e in b.experts]
    for e, r in zip(b.experts, reports, strict=True):
        assert r.max_abs_err <= 1e-4
        assert e.onnx["opset"] == 17 and e.onnx["precision"] == "fp32"
        assert (d / e.onnx["path"]).is_file()


def test_onnxruntime_images_match_torch(exported):
    d, _ = exported
    b = Bundle.load(d)
    kw = dict(steps=8, seed=3)
    a = sample_images(b.router(), b.manifest.scheduler, b.manifest.sample_shape, 4, **kw)
    o = sample_images(onnx_router(b), b.manifest.scheduler, b.manifest.sample_shape, 4, **kw)
    assert a.shape == o.shape == (4, 32, 32, 1)
    assert np.abs(a.astype(int) - o.astype(int)).max() <= 2


def test_corrupt_onnx_is_caught_by_its_checksum(exported, tmp_path):
    d, _ = exported
    c = tmp_path / "c"
    shutil.copytree(d, c)
    f = c / "onnx" / "g1.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StepadaptError, match="ONNX file of expert g1 failed its checksum"):
        onnx_router(Bundle.load(c))


def test_failed_parity_leaves_the_bundle_untouched(tiny_bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    before = (d / "manifest.json").read_text()
    with pytest.raises(StepadaptError, match="expert g0: ONNX parity failed"):
        export_bundle(Bundle.load(d), atol=0.0)
    assert (d / "manifest.json").read_text() == before
    assert not (d / "onnx").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".onnx")]


def test_onnx_backend_without_export_says_what_to_run(tiny_bundle):
    with pytest.raises(StepadaptError, match="stepadapt export"):
        onnx_router(Bundle.load(tiny_bundle))


def test_bundle_without_experts_is_refused(tiny_bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    man = json.loads((d / "manifest.json").read_text())
    man["experts"] = []
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StepadaptError, match="no experts"):
        Bundle.load(d)


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT is available here")
def test_trt_export_without_tensorrt_is_one_clear_error(tiny_bundle):
    r = CliRunner().invoke(app, ["export", str(tiny_bundle), "--trt"])
    assert r.exit_code == 2
    assert "TensorRT" in r.output and "Traceback" not in r.output


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_trt_engine_parity(exported, tmp_path):
    from stepadapt.export.tensorrt import build_engine, parity

    d, _ = exported
    b = Bundle.load(d)
    e = b.experts[0]
    plan = build_engine(d / e.onnx["path"], tmp_path / "e.plan", max_batch=8)
    assert parity(plan, d / e.onnx["path"], e.lo, e.hi, b.manifest.sample_shape) < 1e-3
    assert torch.cuda.is_available()


# The export stage as a library call (stepadapt.export.stage), TensorRT injected.


def _fake_engine_builder(built: list[str]):
    """Writes a small 'engine' derived from its ONNX file, as build_engine writes a plan."""

    def build(onnx_path, plan_path, *, max_batch, timing_cache):
        assert max_batch == MAX_BATCH and timing_cache.name == "timing.cache"
        built.append(onnx_path.stem)
        plan_path.write_bytes(b"plan:" + onnx_path.read_bytes()[:64])
        return plan_path

    return build


def _fake_parity(errors: dict[str, float]):
    return lambda plan, onnx_path, lo, hi, shape: errors.get(plan.stem, 1e-5)


def _copy(bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    return d


@pytest.mark.slow
def test_export_stage_records_onnx_without_the_cli(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path)
    lines = []
    result = export(ExportOptions(bundle=d), log=lines.append)
    b = Bundle.load(d)
    assert [r.name for r in result.onnx] == [e.name for e in b.experts] and result.trt == {}
    assert all(e.onnx["opset"] == 17 and e.trt is None for e in b.experts)
    assert len(lines) == len(b.experts) and not (d / "trt").exists()


@pytest.mark.slow
def test_export_stage_records_injected_engines_in_the_manifest(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path)
    built = []
    result = export(
        ExportOptions(bundle=d, trt=True),
        engine_builder=_fake_engine_builder(built),
        engine_parity=_fake_parity({"g1": 2e-4}),
    )
    b = Bundle.load(d)  # verifies the weights' checksums and the manifest's schema
    assert built == [e.name for e in b.experts]
    for e in b.experts:
        assert e.trt == result.trt[e.name]
        assert e.trt["path"] == f"trt/{e.name}.plan" and e.trt["max_batch"] == MAX_BATCH
        assert e.trt["max_abs_err"] == (2e-4 if e.name == "g1" else 1e-5)
        plan = b.verify_file(e.trt["path"], e.trt["sha256"], f"TensorRT plan of expert {e.name}")
        assert plan.read_bytes().startswith(b"plan:") and e.trt["sha256"] == sha256_file(plan)
    assert not [p for p in d.iterdir() if p.name.startswith(".trt")]


@pytest.mark.slow
def test_export_stage_refuses_an_engine_beyond_the_tolerance(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path)
    opts = ExportOptions(bundle=d, trt=True, atol=1e-4)  # engines: 10x, 1e-3
    with pytest.raises(StepadaptError, match=r"^expert g1: TensorRT parity failed \(max abs error 2\.00e-03"):
        export(opts, engine_builder=_fake_engine_builder([]), engine_parity=_fake_parity({"g1": 2e-3}))
    b = Bundle.load(d)
    assert all(e.trt is None for e in b.experts)
    assert all(e.onnx for e in b.experts)  # the ONNX files passed their own check and stay
    assert not list(d.glob("trt/*.plan"))
    assert not [p for p in d.iterdir() if p.name.startswith(".trt")]


@pytest.mark.slow
def test_export_stage_refuses_a_non_finite_engine_error(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path)
    with pytest.raises(StepadaptError, match="expert g0: TensorRT parity failed"):
        export(ExportOptions(bundle=d, trt=True), engine_builder=_fake_engine_builder([]),
               engine_parity=_fake_parity({"g0": float("nan")}))  # fmt: skip
    assert all(e.trt is None for e in Bundle.load(d).experts)


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT is available here")
def test_export_stage_without_tensorrt_fails_before_any_onnx(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path)
    before = (d / "manifest.json").read_text()
    with pytest.raises(StepadaptError, match="TensorRT"):
        export(ExportOptions(bundle=d, trt=True))
    assert (d / "manifest.json").read_text() == before and not (d / "onnx").exists()


def test_export_options_round_trip_through_json(tmp_path):
    o = ExportOptions(bundle=tmp_path / "b", opset=18, atol=2e-4, trt=True, trt_atol_factor=20.0)
    assert ExportOptions.from_json(o.to_json()) == o
    assert ExportOptions(bundle=str(tmp_path / "b")).bundle == tmp_path / "b"
    assert ExportOptions(bundle=tmp_path).trt_atol == pytest.approx(1e-3)
    assert ExportOptions.help("atol") == "Max abs error allowed vs PyTorch (fp32)."


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(atol=0.0), "atol must be a positive number"),
        (dict(atol=float("nan")), "atol must be a positive number"),
        (dict(opset=11), r"opset must be in \[14, 23\]"),
        (dict(opset=17.0), "opset must be an integer"),
        (dict(trt="yes"), "trt must be true or false"),
        (dict(trt_atol_factor=0.5), "trt_atol_factor must be >= 1"),
    ],
)
def test_export_options_refuse_bad_values_in_one_line(tmp_path, bad, match):
    with pytest.raises(StepadaptError, match=match) as e:
        ExportOptions(bundle=tmp_path, **bad)
    assert "\n" not in str(e.value)


def test_export_options_from_json_refuse_unknown_keys():
    with pytest.raises(StepadaptError, match="unknown option"):
        ExportOptions.from_dict({"bundle": "b", "fp16": True})
