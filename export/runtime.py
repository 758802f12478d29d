"""onnxruntime sessions: which device, which threads, no spinning.

Its own module, importing onnxruntime and nothing heavy: Triton's expert models load it in every
stub process, where pulling in torch and diffusers would cost seconds and memory per instance.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from stepadapt import StepadaptError, first_line

GRAPH_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA where asked for or (``auto``) installed,
    CPU always last (onnxruntime runs what CUDA cannot there)."""
    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise StepadaptError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise StepadaptError(
            "device cuda asked for, but this onnxruntime has no CUDA provider (onnxruntime-gpu)"
        )
    return ["CPUExecutionProvider"]


def session(
    path: str | os.PathLike, threads: int | None = None, level: str = "all", device: str = "auto"
) -> ort.InferenceSession:
    """A session on ``device`` (see :func:`providers`). Its CPU worker threads do not spin between
    runs: a router holds one session per expert, and a pool spinning after its run steals the cores
    from the next expert's run (measured 2-3 x slower steps with spinning; docs/benchmarks.md)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = GRAPH_LEVELS[level]
    chosen = providers(device)
    try:
        sess = ort.InferenceSession(str(path), so, providers=chosen)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise StepadaptError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu without the CUDA/cuDNN libraries it needs falls back to the CPU, with a log line
        raise StepadaptError(
            f"device cuda asked for, but onnxruntime could not start its CUDA provider for {path} "
            "(CUDA or cuDNN libraries missing?)"
        )
    return sess


def timestep_type(onnx_record: dict | None) -> str:
    """The ONNX ``timestep`` input's element type, from a manifest's ONNX record: float32 since
    sigma-space solvers (Euler, Heun, LMS, Karras sigmas) land between training timesteps; int64 in
    exports made before."""
    spec = str((onnx_record or {}).get("inputs", {}).get("timestep", "int64[B]"))
    return "float32" if spec.startswith("float32") else "int64"


def timestep_feed(sess: ort.InferenceSession, t: np.ndarray) -> np.ndarray:
    """``t`` as the session's ``timestep`` input wants it (an int64 export gets rounded timesteps)."""
    kind = next(i.type for i in sess.get_inputs() if i.name == "timestep")
    if kind == "tensor(float)":
        return np.asarray(t, dtype=np.float32)
    return np.rint(np.asarray(t, dtype=np.float64)).astype(np.int64)
