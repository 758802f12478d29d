"""Exported bundle -> Triton model repository, in one of two layouts.

``fused`` (default): the experts run inside the router's process, so a step
costs no hop; concurrent requests are stepped together as one batch.
```
generate/        front.py: the endpoint; hands each request to router (numpy only)
router/          router.py + manifest.json + <expert>.onnx; dynamic batching over requests
generate_stream/ router.py, decoupled (one message per step), experts in process
```
``bls``: each expert is its own Triton model and every step is a BLS call to
it; the layout for a full Triton with GPU backends (TensorRT, onnxruntime).
```
expert_<name>/config.pbtxt            python backend + onnxruntime, KIND_CPU, dynamic batching
expert_<name>/configs/gpu.pbtxt       full Triton on GPU (--model-config-name gpu)
expert_<name>/1/{model.py,model.onnx}
generate/, generate_stream/           router.py + manifest.json, BLS per step
```
Router overhead per layout is measured by ``stepadapt bench`` (docs/benchmarks.md).

The endpoints' inputs are the same in both layouts and for every bundle: ``seed``,
``num_images``, ``steps``, ``sampler``, ``eta``, ``jump``, and for a class-conditional
bundle ``class_labels`` (INT32 [N], one per image) and ``guidance_scale`` (FP32 [1], 1 =
no guidance by default); all optional in the configs, so an unconditional request is
unchanged and labels sent to an unconditional bundle get the router's own 400
(``stepadapt.serving.condition``), not Triton's "unexpected input". An expert that
takes labels (its ONNX export's ``class_labels``) declares one more input, INT64 per row.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import stepadapt.export as export_package
from stepadapt.export import MAX_BATCH
from stepadapt.export.runtime import timestep_type
from stepadapt.serving.condition import CLASS_LABELS, GUIDANCE, takes_labels

import stepadapt
from stepadapt import Notice, StepadaptError
from stepadapt.bundle import Bundle, ExpertSpec
from stepadapt.conditioning import Conditioning
from stepadapt.io import atomic_dir

MODELS_SRC = Path(__file__).parent / "triton_models"
# Where each part of the stepadapt package lives in this checkout or install -> its place in lib/.
LIBRARY = {
    Path("stepadapt"): Path(stepadapt.__file__).parent,
    Path("stepadapt/export"): Path(export_package.__file__).parent,
    Path("stepadapt/serving"): Path(__file__).parent,
}


def copy_library(model_dir: Path) -> None:
    """The package's Python files into ``model_dir/lib`` (no weights, no caches), where the model
    files look first: the repository runs on a Triton whose Python has no stepadapt installed."""
    for rel, src in LIBRARY.items():
        dst = model_dir / "lib" / rel
        dst.mkdir(parents=True)
        for f in src.glob("*.py"):
            shutil.copy(f, dst / f.name)


LAYOUTS = ("fused", "bls")
ROUTER = "router"  # the fused layout's model that runs the sampling loop behind the endpoints


@dataclass
class RepositoryOptions:
    threads: int = 1  # onnxruntime threads per expert session
    instances: int = 1  # expert instances (bls) or router instances (fused), KIND_CPU
    max_batch: int = MAX_BATCH  # images per expert batch, also the most images one request may ask for
    queue_delay_us: int = 0  # extra wait for batching; on a saturated CPU 0 measured best (docs/results.md)
    router_instances: int = 2  # bls routers, and generate_stream: requests run at once (each alone)
    front_instances: int = 8  # fused: requests the endpoint accepts at once (each waits on the router)
    layout: str = "fused"
    max_requests: int = 16  # fused: requests the router steps together in one batch
    max_queue: int = 16  # requests waiting at the endpoint beyond those running; more are refused at once
    queue_timeout_s: float = 60.0  # a request still waiting after this is refused
    max_seconds: float = 600.0  # a request still running after this is stopped with an error
    device: str = "auto"  # onnxruntime's: CUDA where onnxruntime-gpu is installed, else CPU


def _params(d: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in d.items()
    )


def queue_policy(o: RepositoryOptions) -> str:
    """A bounded queue for an endpoint: overload is refused quickly and clearly, not queued for minutes."""
    us = int(o.queue_timeout_s * 1e6)
    return f"""dynamic_batching {{
  default_queue_policy {{
    max_queue_size: {o.max_queue} timeout_action: REJECT
    default_timeout_microseconds: {us} allow_timeout_override: true
  }}
}}"""


def _timestep_type(e: ExpertSpec) -> str:
    return "TYPE_FP32" if timestep_type(e.onnx) == "float32" else "TYPE_INT64"


def _labels_input(null_label: int | None, reshape: str = "") -> str:
    """An expert's ``class_labels`` input (one per row, like ``timestep``), where it takes one."""
    if null_label is None:
        return ""
    return f',\n  {{ name: "{CLASS_LABELS}" data_type: TYPE_INT64 dims: [ 1 ]{reshape} }}'


def expert_config(
    name: str,
    shape: tuple,
    lo: int,
    hi: int,
    o: RepositoryOptions,
    ttype: str = "TYPE_FP32",
    null_label: int | None = None,
) -> str:
    """A python-backend expert; ``null_label``: it takes class labels 0..null_label."""
    c, h, w = shape
    params = {
        "threads": str(o.threads),
        "device": o.device,
        "sample_shape": json.dumps(list(shape)),
        "timesteps": json.dumps([lo, hi]),
    }
    if null_label is not None:
        params["null_label"] = str(null_label)
    return f"""name: "expert_{name}"
backend: "python"
max_batch_size: {o.max_batch}
input [
  {{ name: "sample" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }},
  {{ name: "timestep" data_type: {ttype} dims: [ 1 ] }}{_labels_input(null_label)}
]
output [ {{ name: "eps" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {o.instances} }} ]
{_params(params)}
"""


def expert_gpu_config(
    name: str,
    shape: tuple,
    o: RepositoryOptions,
    tensorrt: bool,
    ttype: str = "TYPE_FP32",
    null_label: int | None = None,
) -> str:
    """For a full Triton build with GPU backends: the same I/O on TensorRT or ONNX Runtime."""
    c, h, w = shape
    platform, filename = ("tensorrt_plan", "model.plan") if tensorrt else ("onnxruntime_onnx", "model.onnx")
    return f"""name: "expert_{name}"
platform: "{platform}"
default_model_filename: "{filename}"
max_batch_size: {o.max_batch}
input [
  {{ name: "sample" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }},
  {{ name: "timestep" data_type: {ttype} dims: [ 1 ] reshape: {{ shape: [ ] }} }}\
{_labels_input(null_label, " reshape: { shape: [ ] }")}
]
output [ {{ name: "eps" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
instance_group [ {{ kind: KIND_GPU count: 1 }} ]
"""


def _router_inputs(ragged: bool = False) -> str:
    """The endpoints' inputs, all optional. ``ragged``: the batched router, whose dynamic batcher
    must batch requests whose ``class_labels`` differ in length (one label per image)."""
    scalars = [
        f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] optional: true }}'
        for n, t in (
            ("seed", "TYPE_INT64"),
            ("num_images", "TYPE_INT32"),
            ("steps", "TYPE_INT32"),
            ("sampler", "TYPE_STRING"),
            ("eta", "TYPE_FP32"),
            ("jump", "TYPE_BOOL"),
            (GUIDANCE, "TYPE_FP32"),
        )  # fmt: skip
    ]
    extra = " allow_ragged_batch: true" if ragged else ""
    labels = f'  {{ name: "{CLASS_LABELS}" data_type: TYPE_INT32 dims: [ -1 ] optional: true{extra} }}'
    return ",\n".join([*scalars, labels])


def front_config(shape: tuple, o: RepositoryOptions, conditioning: Conditioning | None = None) -> str:
    """The fused layout's endpoint: the same inputs and outputs as the bls router. For a
    class-conditional bundle it fills in the condition a request leaves out (front.py says why)."""
    c, h, w = shape
    params = {"target": ROUTER}
    if conditioning is not None and conditioning.classes:
        params["fill"] = json.dumps({CLASS_LABELS: [], GUIDANCE: [1.0]})
    return f"""name: "generate"
backend: "python"
max_batch_size: 0
input [
{_router_inputs()}
]
output [ {{ name: "images" data_type: TYPE_UINT8 dims: [ -1, {h}, {w}, {c} ] }} ]
{queue_policy(o)}
instance_group [ {{ kind: KIND_CPU count: {o.front_instances} }} ]
{_params(params)}
"""


def batched_router_config(shape: tuple, o: RepositoryOptions) -> str:
    """The fused layout's router. Requests carry a batch axis of 1 so Triton's dynamic batcher can
    hand several to one call."""
    c, h, w = shape
    params = {
        "max_images": str(o.max_batch), "experts": "local", "threads": str(o.threads),
        "max_seconds": str(o.max_seconds), "device": o.device,
    }  # fmt: skip
    return f"""name: "{ROUTER}"
backend: "python"
max_batch_size: {o.max_requests}
input [
{_router_inputs(ragged=True)}
]
output [ {{ name: "images" data_type: TYPE_UINT8 dims: [ -1, {h}, {w}, {c} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {o.instances} }} ]
{_params(params)}
"""


def router_config(name: str, shape: tuple, o: RepositoryOptions, decoupled: bool) -> str:
    c, h, w = shape
    stream_out = (
        """  { name: "step" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "timestep" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "expert" data_type: TYPE_STRING dims: [ 1 ] },
"""
        if decoupled
        else ""
    )
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    params = {"max_images": str(o.max_batch), "max_seconds": str(o.max_seconds)}
    if o.layout == "fused":
        params.update(experts="local", threads=str(o.threads), device=o.device)
    return f"""name: "{name}"
backend: "python"
max_batch_size: 0
input [
{_router_inputs()}
]
output [
{stream_out}  {{ name: "images" data_type: TYPE_UINT8 dims: [ -1, {h}, {w}, {c} ] }}
]
{policy}{queue_policy(o)}
instance_group [ {{ kind: KIND_CPU count: {o.router_instances} }} ]
{_params(params)}
"""


def _usable_engine(bundle: Bundle, e: ExpertSpec, o: RepositoryOptions) -> Path | None:
    """The expert's verified TensorRT plan if its batch profile holds the repository's batches; else
    None, said, and the GPU config runs the ONNX in onnxruntime instead (a request of more images
    than the engine's profile would be refused on the GPU)."""
    if not e.trt:
        return None
    engine_max = int(e.trt.get("max_batch", 32))  # engines built before the shared setting: 32
    if engine_max < o.max_batch:
        warnings.warn(Notice(
            f"expert {e.name}'s TensorRT engine takes at most {engine_max} images per batch, the repository "
            f"{o.max_batch}: its GPU config uses onnxruntime (serve --max-images {engine_max}, or re-export "
            "with --trt)"
        ), stacklevel=3)  # fmt: skip
        return None
    return bundle.verify_file(e.trt["path"], e.trt["sha256"], f"TensorRT plan of expert {e.name}")


def write_repository(
    bundle: Bundle, path: str | os.PathLike, options: RepositoryOptions | None = None
) -> Path:
    """Write the model repository for an exported bundle (atomically)."""
    o = options or RepositoryOptions()
    if o.layout not in LAYOUTS:
        raise StepadaptError(f"unknown repository layout {o.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if bundle.manifest.conditioning.text_dim:
        raise StepadaptError(
            "this bundle is conditioned on text embeddings, which the endpoint does not take yet "
            "(it takes class labels)"
        )
    shape = tuple(bundle.manifest.sample_shape)
    path = Path(path)
    onnx = {}
    for e in bundle.experts:
        if not e.onnx:
            raise StepadaptError(
                f"expert {e.name} has no ONNX file: run 'stepadapt export {bundle.path}' first"
            )
        onnx[e.name] = bundle.verify_file(e.onnx["path"], e.onnx["sha256"], f"ONNX file of expert {e.name}")
    manifest = json.dumps(bundle.manifest.to_dict())
    top = bundle.experts[-1]
    jump = (
        bundle.verify_file(top.weights, top.sha256, f"weights of expert {top.name}")
        if bundle.manifest.can_jump
        else None
    )  # what the router needs for the analytic jump

    def router(d: Path, config: str, local: bool) -> None:
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(config)
        shutil.copy(MODELS_SRC / "router.py", d / "1" / "model.py")
        copy_library(d)
        (d / "1" / "manifest.json").write_text(manifest)
        if jump is not None:
            shutil.copy(jump, d / "1" / "jump.safetensors")
        for name, src in onnx.items() if local else ():
            shutil.copy(src, d / "1" / f"{name}.onnx")

    with atomic_dir(path) as tmp:
        if o.layout == "fused":
            (tmp / "generate" / "1").mkdir(parents=True)
            front = front_config(shape, o, bundle.manifest.conditioning)
            (tmp / "generate" / "config.pbtxt").write_text(front)
            shutil.copy(MODELS_SRC / "front.py", tmp / "generate" / "1" / "model.py")
            copy_library(tmp / "generate")
            router(tmp / ROUTER, batched_router_config(shape, o), local=True)
            router(tmp / "generate_stream", router_config("generate_stream", shape, o, True), local=True)
            return path
        for e in bundle.experts:
            onnx_path = onnx[e.name]
            d = tmp / f"expert_{e.name}"
            (d / "1").mkdir(parents=True)
            (d / "configs").mkdir()
            null = bundle.manifest.conditioning.null_label if takes_labels(e.onnx) else None
            (d / "config.pbtxt").write_text(
                expert_config(e.name, shape, e.lo, e.hi, o, _timestep_type(e), null_label=null)
            )
            engine = _usable_engine(bundle, e, o)
            (d / "configs" / "gpu.pbtxt").write_text(
                expert_gpu_config(e.name, shape, o, bool(engine), _timestep_type(e), null_label=null)
            )
            shutil.copy(MODELS_SRC / "expert.py", d / "1" / "model.py")
            copy_library(d)
            shutil.copy(onnx_path, d / "1" / "model.onnx")
            if engine:
                shutil.copy(engine, d / "1" / "model.plan")
        for name, decoupled in (("generate", False), ("generate_stream", True)):
            router(tmp / name, router_config(name, shape, o, decoupled), local=False)
    return path
