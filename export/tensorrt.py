"""ONNX -> TensorRT engine (TensorRT 10/11 Python API), with a parity check.

PyPI's ``tensorrt`` wheels fetch their libraries from NVIDIA's own index at
install time, so on many machines TensorRT cannot be installed; then
:func:`require` raises one clear error and the tests skip with that reason.
Precision comes from the ONNX file itself (strongly typed network): an FP16
engine is built from an FP16 ONNX, as TensorRT 11 has no FP16 builder flag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from stepadapt.export import MAX_BATCH

from stepadapt import StepadaptError
from stepadapt.io import atomic_path

if TYPE_CHECKING:
    import torch


def unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA device are usable, else why not (one line)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or OSError from missing libnvinfer
        return f"TensorRT is not installed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is available"
    return None


def require() -> Any:
    """The ``tensorrt`` module, or one line saying why it cannot be used here."""
    reason = unavailable_reason()
    if reason:
        raise StepadaptError(f"{reason}; TensorRT export skipped (ONNX files are unaffected)")
    import tensorrt as trt

    return trt


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = MAX_BATCH,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: int = 2,
) -> Path:
    """Build and atomically write a serialized engine with a batch optimization profile."""
    trt = require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StepadaptError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(
        cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)
    _, c, h, w = network.get_input(0).shape
    profile = builder.create_optimization_profile()
    profile.set_shape("sample", (min_batch, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    profile.set_shape("timestep", (min_batch,), (opt_batch,), (max_batch,))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise StepadaptError(f"TensorRT failed to build an engine from {onnx_path}")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(engine))
    if cache_file:
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return Path(plan_path)


class TrtDenoiser:
    """A TensorRT engine as a ``(x, t) -> eps`` denoiser on the current CUDA stream."""

    def __init__(self, plan_path: str | os.PathLike):
        trt = require()
        import torch

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise StepadaptError(f"cannot deserialize TensorRT engine {plan_path}")
        self.context = self.engine.create_execution_context()
        # float32 in engines built from exports since fractional timesteps (int64 before)
        self.float_timestep = self.engine.get_tensor_dtype("timestep") == trt.DataType.FLOAT

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        if cond:
            raise StepadaptError("TensorRT engines of conditional experts are not built yet: serve ONNX")
        torch = self.torch
        x = x.float().cuda().contiguous()
        t = (t.float() if self.float_timestep else t.double().round().long()).cuda().contiguous()
        out = torch.empty_like(x)
        self.context.set_input_shape("sample", tuple(x.shape))
        self.context.set_input_shape("timestep", tuple(t.shape))
        for name, tensor in (("sample", x), ("timestep", t), ("eps", out)):
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise StepadaptError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu()


def parity(
    plan_path: str | os.PathLike,
    onnx_path: str | os.PathLike,
    lo: int,
    hi: int,
    shape: Sequence[int],
    seed: int = 0,
) -> float:
    """Max abs difference between the engine and onnxruntime at batches 1, 3, 8."""
    import torch
    from stepadapt.export.onnx import OnnxDenoiser

    trt_den, ort_den = TrtDenoiser(plan_path), OnnxDenoiser(onnx_path)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in (1, 3, 8):
        x = torch.randn(b, *shape, generator=g)
        t = torch.randint(lo, hi, (b,), generator=g)
        worst = max(worst, float(np.abs((trt_den(x, t) - ort_den(x, t)).numpy()).max()))
    return worst
