"""The export stage as a library function: ONNX for every expert, optionally TensorRT engines.

The CLI, the demo and a notebook all call :func:`export`, so the parity rules (how close an
engine must stay to its ONNX file) and the manifest records it writes exist once. TensorRT
itself is injected (``engine_builder``, ``engine_parity``): the engine is NVIDIA's, what the
bundle records about it is ours, and that part is testable on a machine without a GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stepadapt.export import MAX_BATCH
from stepadapt.export.onnx import FP32_ATOL, OPSET, ExportReport, export_bundle
from stepadapt.export.surround import export_surround

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.io import sha256_file
from stepadapt.options import Options, option

# The U-Net's attention exports as scaled_dot_product_attention, which needs opset 14;
# torch.onnx (2.13) writes nothing newer than 23.
MIN_OPSET, MAX_OPSET = 14, 23

# An engine is compared with onnxruntime, not PyTorch, and TensorRT may pick fp16/TF32 kernels
# for fp32 layers, so it is held to this multiple of the fp32 ONNX tolerance (10x: 1e-3 at the
# default atol, what engines of the tiny and the MNIST U-Nets meet).
TRT_ATOL_FACTOR = 10.0


@dataclass(frozen=True)
class ExportOptions(Options):
    """What ``stepadapt export`` is asked; every rule about these values is checked here."""

    bundle: Path = option(help="Bundle directory.", argument=True)
    opset: int = option(OPSET, help="ONNX opset.")
    atol: float = option(FP32_ATOL, help="Max abs error allowed vs PyTorch (fp32).")
    trt: bool = option(False, help="Also build TensorRT engines (needs TensorRT + GPU).", flags=("--trt",))
    trt_atol_factor: float = option(
        TRT_ATOL_FACTOR,
        help="A TensorRT engine may differ from onnxruntime by this multiple of atol "
        "(its fp16/TF32 kernels are not fp32).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bundle, Path):
            raise StepadaptError(f"export: bundle must be a path, got {self.bundle!r}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int):
            raise StepadaptError(f"export: opset must be an integer, got {self.opset!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise StepadaptError(f"export: opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {self.opset}")
        if not _positive(self.atol):
            raise StepadaptError(f"export: atol must be a positive number, got {self.atol!r}")
        if not isinstance(self.trt, bool):
            raise StepadaptError(f"export: trt must be true or false, got {self.trt!r}")
        if not _positive(self.trt_atol_factor) or self.trt_atol_factor < 1:
            raise StepadaptError(
                f"export: trt_atol_factor must be >= 1 (an engine is not held tighter than its ONNX "
                f"file), got {self.trt_atol_factor!r}"
            )

    @property
    def trt_atol(self) -> float:
        """The max abs error an engine may have against onnxruntime."""
        return self.atol * self.trt_atol_factor


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


class EngineBuilder(Protocol):
    """Builds a serialized engine at ``plan_path`` from ``onnx_path`` (tensorrt.build_engine)."""

    def __call__(
        self, onnx_path: Path, plan_path: Path, *, max_batch: int, timing_cache: Path | None
    ) -> Path: ...


class EngineParity(Protocol):
    """Max abs difference between an engine and onnxruntime on t in [lo, hi) (tensorrt.parity)."""

    def __call__(
        self, plan_path: Path, onnx_path: Path, lo: int, hi: int, shape: tuple[int, ...]
    ) -> float: ...


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote: an ONNX report per expert, and each expert's TensorRT manifest
    record (``path``, ``sha256``, ``max_abs_err``, ``max_batch``) when engines were built."""

    onnx: list[ExportReport]
    trt: dict[str, dict[str, Any]] = field(default_factory=dict)


def export(
    options: ExportOptions,
    *,
    log: Callable[[str], None] | None = None,
    engine_builder: EngineBuilder | None = None,
    engine_parity: EngineParity | None = None,
) -> ExportResult:
    """Export the bundle's experts to ONNX, then (``options.trt``) to parity-checked engines.

    TensorRT is checked for before any ONNX work, so a machine without it fails in a second,
    not after minutes of exporting. Engines are built into a staging directory and moved in,
    with one manifest update, only when every expert passes: a refused engine leaves the
    bundle's engines and ``trt`` records as they were (the new ONNX files stay, they passed).
    """
    bundle = Bundle.load(options.bundle)
    if options.trt and not bundle.manifest.conditioning.unconditional:
        raise StepadaptError(
            "TensorRT engines of conditional experts are not built yet: serve the ONNX exports"
        )
    if options.trt and (engine_builder is None or engine_parity is None):
        from stepadapt.export.tensorrt import require

        require()
    reports = export_bundle(bundle, opset=options.opset, atol=options.atol, log=log)
    export_surround(bundle, options.opset, options.atol, log)  # a pipeline's text encoder and VAE decoder
    if not options.trt:
        return ExportResult(reports)
    if engine_builder is None or engine_parity is None:
        from stepadapt.export import tensorrt

        engine_builder = engine_builder or tensorrt.build_engine
        engine_parity = engine_parity or tensorrt.parity
    records = _build_engines(bundle, options, engine_builder, engine_parity, log)
    return ExportResult(reports, records)


def _build_engines(
    bundle: Bundle,
    options: ExportOptions,
    builder: EngineBuilder,
    parity: EngineParity,
    log: Callable[[str], None] | None,
) -> dict[str, dict[str, Any]]:
    out_dir = bundle.path / "trt"
    try:
        stage = Path(tempfile.mkdtemp(prefix=".trt.", dir=bundle.path))
    except OSError as e:
        raise StepadaptError(f"cannot write into bundle {bundle.path}: {e.strerror}") from None
    records: dict[str, dict[str, Any]] = {}
    plans: dict[str, Path] = {}
    try:
        for e in bundle.experts:
            onnx_path = bundle.path / e.onnx["path"]
            plan = builder(onnx_path, stage / f"{e.name}.plan", max_batch=MAX_BATCH,
                           timing_cache=out_dir / "timing.cache")  # fmt: skip
            err = float(parity(plan, onnx_path, e.lo, e.hi, bundle.manifest.sample_shape))
            if not math.isfinite(err) or err > options.trt_atol:
                raise StepadaptError(
                    f"expert {e.name}: TensorRT parity failed "
                    f"(max abs error {err:.2e} > {options.trt_atol:.0e})"
                )
            records[e.name] = {"path": f"trt/{e.name}.plan", "sha256": sha256_file(plan),
                               "max_abs_err": err, "max_batch": MAX_BATCH}  # fmt: skip
            plans[e.name] = plan
            if log:
                log(f"  {e.name}: trt ok, max abs err {err:.2e}")
        out_dir.mkdir(exist_ok=True)
        for name, plan in plans.items():
            os.replace(plan, out_dir / f"{name}.plan")
        bundle.update_experts({name: {"trt": r} for name, r in records.items()})
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return records
