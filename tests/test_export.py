import json
import shutil

import numpy as np
import pytest
import torch
from stepadapt.export.onnx import export_bundle, onnx_router
from stepadapt.export.tensorrt import unavailable_reason
from typer.testing import CliRunner

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.cli import app
from stepadapt.sampling import sample_images


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("e") / "bundle"
    shutil.copytree(tiny_bundle, d)
    reports = export_bundle(Bundle.load(d), batches=(1, 3, 8))
    return d, reports


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
