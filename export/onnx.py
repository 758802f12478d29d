"""Experts -> ONNX, with an onnxruntime parity check against PyTorch for every file.

Inputs are ``sample`` [B, C, H, W] float32 and ``timestep`` [B] float32 (sigma-space
solvers land between training timesteps; exports before took int64, and still load), then the
condition the expert takes: ``class_labels`` [B] int64, ``encoder_hidden_states`` [B, L, E]
float32 (see :mod:`stepadapt.conditioning`); output ``eps``; the batch axis is dynamic so
Triton can batch steps of concurrent requests. The TorchScript-based exporter is used (``dynamo=False``): it
handles diffusers' U-Net without extra dependencies and its graphs pass parity.

A model over protobuf's 2 GiB (Stable Diffusion 1.5's fp32 U-Net is 3.4 GB) keeps its weights in one external
data file beside the graph, ``<name>.onnx.data``, which onnxruntime finds by the graph's path.
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


def external_data_path(path: Path) -> Path:
    """Where the weights of an ONNX file over 2 GiB live (see :func:`export_model`)."""
    return path.with_name(path.name + ".data")


def _gather_external_data(exported: Path, path: Path) -> None:
    """The exporter writes a model over 2 GiB as one file per tensor beside the graph; gather them
    into :func:`external_data_path` (page-aligned, one tensor in memory at a time) so that an export
    stays two files to move, checksum and serve."""
    from onnx.external_data_helper import load_external_data_for_tensor, set_external_data, uses_external_data

    proto = onnx.load(str(exported), load_external_data=False)
    data = external_data_path(path)
    with open(data, "wb") as sink:
        for tensor in proto.graph.initializer:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(exported.parent))
                sink.write(b"\0" * (-sink.tell() % 4096))
                set_external_data(tensor, data.name, offset=sink.tell(), length=len(tensor.raw_data))
                sink.write(tensor.raw_data)
                tensor.ClearField("raw_data")
    onnx.save_model(proto, str(path))


def export_model(model: Expert, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write ``model`` as ONNX to ``path`` (the caller makes the write atomic); a model over 2 GiB
    with its weights in :func:`external_data_path` of it."""
    path = Path(path)
    x, t = torch.randn(2, *sample_shape(model)), torch.tensor([1.0, 2.5])
    extra = conditioning(model).examples(2, torch.Generator().manual_seed(0))
    axes = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "eps": {0: "batch"}}
    axes.update({k: {0: "batch", 1: "tokens"} if k == TEXT else {0: "batch"} for k in extra})
    scratch = Path(tempfile.mkdtemp(prefix=".export.", dir=path.parent))  # a large model's tensor files
    try:
        exported = scratch / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape asserts
            torch.onnx.export(
                as_eps(model.eval()),
                (x, t, *extra.values()),
                str(exported),
                input_names=["sample", "timestep", *extra],
                output_names=["eps"],
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        external_data_path(path).unlink(missing_ok=True)
        if len(list(scratch.iterdir())) > 1:
            _gather_external_data(exported, path)
        else:
            os.replace(exported, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(path))
    return path


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
    reports, inputs_of = [], {}
    try:
        for e in bundle.experts:
            t0 = time.perf_counter()
            model = bundle.load_expert(e.name)
            inputs_of[e.name] = input_types(conditioning(model))  # not the model: SD 1.5's are GBs each
            path = export_model(model, stage / f"{e.name}.onnx", opset)
            # On CPU: the 1e-4 bound is about the export, not about a GPU's TF32 arithmetic.
            err = parity(model, OnnxDenoiser(path, threads=1, device="cpu"), e.lo, e.hi, batches)
            del model
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
            data = external_data_path(stage / r.path.name)
            if data.is_file():
                os.replace(data, external_data_path(r.path))
                external = {"path": f"onnx/{data.name}", "sha256": sha256_file(external_data_path(r.path))}
            else:
                external_data_path(r.path).unlink(missing_ok=True)
                external = None
            os.replace(stage / r.path.name, r.path)
            changes[r.name] = {
                "onnx": {
                    "path": f"onnx/{r.path.name}",
                    "sha256": sha256_file(r.path),
                    "opset": opset,
                    "precision": "fp32",
                    "max_abs_err": r.max_abs_err,
                    "inputs": inputs_of[r.name],
                    "outputs": {"eps": "float32[B,C,H,W]"},
                    **({"external_data": external} if external else {}),
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
