"""Experts -> ONNX, with an onnxruntime parity check against PyTorch for every file.

Inputs are ``sample`` [B, C, H, W] float32 and ``timestep`` [B] float32 (sigma-space
solvers land between training timesteps; exports before took int64, and still load), then the
condition the expert takes: ``class_labels`` [B] int64, ``encoder_hidden_states`` [B, L, E]
float32 (see :mod:`stepadapt.conditioning`); output ``eps``; the batch axis is dynamic so
Triton can batch steps of concurrent requests. The TorchScript-based exporter is used (``dynamo=False``): it
handles diffusers' U-Net without extra dependencies and its graphs pass parity.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from stepadapt.export.runtime import session, timestep_feed

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.conditioning import TEXT, Cond, Conditioning
from stepadapt.io import sha256_file
from stepadapt.kinds import kind_of_model
from stepadapt.sampling import Router

OPSET = 17
FP32_ATOL = 1e-4
PARITY_BATCHES = (1, 3, 8)


Expert = torch.nn.Module  # any expert kind (stepadapt.kinds): it says how it exports


def sample_shape(model: Expert) -> tuple[int, int, int]:
    return kind_of_model(model).sample_shape(model)


def as_eps(model: Expert) -> torch.nn.Module:
    """Any expert as a module ``(sample, timestep, *condition) -> eps`` tensor."""
    return kind_of_model(model).as_eps(model)


def conditioning(model: Expert) -> Conditioning:
    return kind_of_model(model).conditioning(model)


def input_types(cond: Conditioning) -> dict[str, str]:
    """The ONNX inputs of an expert with this conditioning, as a manifest records them."""
    types = {"sample": "float32[B,C,H,W]", "timestep": "float32[B]"}
    if cond.classes:
        types["class_labels"] = "int64[B]"
    if cond.text_dim:
        types[TEXT] = f"float32[B,L,{cond.text_dim}]"
    return types


def export_model(model: Expert, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write ``model`` as ONNX to ``path`` (the caller makes the write atomic)."""
    x, t = torch.randn(2, *sample_shape(model)), torch.tensor([1.0, 2.5])
    extra = conditioning(model).examples(2, torch.Generator().manual_seed(0))
    axes = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "eps": {0: "batch"}}
    axes.update({k: {0: "batch", 1: "tokens"} if k == TEXT else {0: "batch"} for k in extra})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts
        torch.onnx.export(
            as_eps(model.eval()),
            (x, t, *extra.values()),
            str(path),
            input_names=["sample", "timestep", *extra],
            output_names=["eps"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return Path(path)


class OnnxDenoiser:
    """An onnxruntime session as a ``(x, t, cond) -> eps`` denoiser (torch in, torch out)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "auto"):
        self.path = Path(path)
        self.session = session(path, threads, device=device)
        self.condition = [i.name for i in self.session.get_inputs() if i.name not in ("sample", "timestep")]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        cond = cond or {}
        missing = [k for k in self.condition if k not in cond]
        if missing:
            raise StepadaptError(f"{self.path.name} needs {', '.join(missing)}")
        feed = {
            "sample": x.detach().float().cpu().numpy(),
            "timestep": timestep_feed(self.session, t.detach().cpu().numpy()),
        }
        for k in self.condition:
            v = cond[k].detach().cpu()
            feed[k] = (v.long() if k == "class_labels" else v.float()).numpy()
        return torch.from_numpy(self.session.run(["eps"], feed)[0])


def parity(
    model: Expert,
    denoiser: Callable[..., torch.Tensor],
    lo: int,
    hi: int,
    batches: Sequence[int] = PARITY_BATCHES,
    seed: int = 0,
) -> float:
    """Max abs difference between PyTorch and ``denoiser`` on random inputs, t in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    reference, cond = as_eps(model.eval()), conditioning(model)
    worst = 0.0
    for b in batches:
        x = torch.randn(b, *sample_shape(model), generator=g)
        t = torch.randint(lo, hi, (b,), generator=g)
        if b > 1:  # whole and fractional timesteps, as the solvers give them
            t = t.float() + (torch.arange(b) % 2) * torch.rand(b, generator=g).clamp(max=hi - 1 - t.float())
        extra = cond.examples(b, g)
        with torch.no_grad():
            ref = reference(x, t, *extra.values())
        worst = max(worst, float((denoiser(x, t, extra) - ref).abs().max()))
    return worst


@dataclass
class ExportReport:
    name: str
    path: Path
    max_abs_err: float
    seconds: float


def export_bundle(
    bundle: Bundle,
    opset: int = OPSET,
    atol: float = FP32_ATOL,
    batches: Sequence[int] = PARITY_BATCHES,
    log: Callable[[str], None] | None = None,
) -> list[ExportReport]:
    """Export every expert to ``bundle/onnx/<name>.onnx`` with a parity check each.

    All files are written to a temporary directory first; only when every
    expert passes are they moved in and the manifest updated, so a failure
    leaves the bundle as it was.
    """
    import time

    out_dir = bundle.path / "onnx"
    try:
        stage = Path(tempfile.mkdtemp(prefix=".onnx.", dir=bundle.path))
    except OSError as e:
        raise StepadaptError(f"cannot write into bundle {bundle.path}: {e.strerror}") from None
    reports, model_of = [], {}
    try:
        for e in bundle.experts:
            t0 = time.perf_counter()
            model = model_of[e.name] = bundle.load_expert(e.name)
            path = export_model(model, stage / f"{e.name}.onnx", opset)
            # On CPU: the 1e-4 bound is about the export, not about a GPU's TF32 arithmetic.
            err = parity(model, OnnxDenoiser(path, threads=1, device="cpu"), e.lo, e.hi, batches)
            if not np.isfinite(err) or err > atol:
                raise StepadaptError(
                    f"expert {e.name}: ONNX parity failed (max abs error {err:.2e} > {atol:.0e})"
                )
            reports.append(ExportReport(e.name, out_dir / path.name, err, time.perf_counter() - t0))
            if log:
                log(f"  {e.name}: onnx ok, max abs err {err:.2e} at batch {list(batches)}")
        out_dir.mkdir(exist_ok=True)
        changes = {}
        for r in reports:
            os.replace(stage / r.path.name, r.path)
            changes[r.name] = {
                "onnx": {
                    "path": f"onnx/{r.path.name}",
                    "sha256": sha256_file(r.path),
                    "opset": opset,
                    "precision": "fp32",
                    "max_abs_err": r.max_abs_err,
                    "inputs": input_types(conditioning(model_of[r.name])),
                    "outputs": {"eps": "float32[B,C,H,W]"},
                }
            }
        bundle.update_experts(changes)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return reports


def onnx_router(bundle: Bundle, threads: int | None = None, device: str = "auto") -> Router:
    """The bundle's experts as onnxruntime sessions behind a Router (checksums verified)."""
    experts = []
    for e in bundle.experts:
        if not e.onnx:
            raise StepadaptError(f"expert {e.name} has no ONNX export: run 'stepadapt export {bundle.path}'")
        path = bundle.verify_file(e.onnx["path"], e.onnx["sha256"], f"ONNX file of expert {e.name}")
        experts.append(OnnxDenoiser(path, threads, device))
    return Router(bundle.manifest.boundaries, experts)
