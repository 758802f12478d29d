"""Exported bundle -> Triton model repository.

```
expert_<name>/config.pbtxt            python backend + onnxruntime, KIND_CPU, dynamic batching
expert_<name>/configs/gpu.pbtxt       full Triton on GPU (--model-config-name gpu)
expert_<name>/1/{model.py,model.onnx}
generate/config.pbtxt, 1/{model.py,manifest.json}
generate_stream/...                   the same router, decoupled (one message per step)
```
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stepadapt import StepadaptError
from stepadapt.bundle import Bundle
from stepadapt.io import atomic_dir

MODELS_SRC = Path(__file__).parent / "triton_models"


@dataclass
class RepositoryOptions:
    threads: int = 1  # onnxruntime threads per expert instance
    instances: int = 1  # expert instances (KIND_CPU)
    max_batch: int = 64  # images per expert batch, also the most images one request may ask for
    queue_delay_us: int = 0  # extra wait for batching; on a saturated CPU 0 measured best (docs/results.md)
    router_instances: int = 2  # concurrent generate requests per router model


def _params(d: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in d.items()
    )


def expert_config(name: str, shape: tuple, lo: int, hi: int, o: RepositoryOptions) -> str:
    c, h, w = shape
    params = {
        "threads": str(o.threads),
        "sample_shape": json.dumps(list(shape)),
        "timesteps": json.dumps([lo, hi]),
    }
    return f"""name: "expert_{name}"
backend: "python"
max_batch_size: {o.max_batch}
input [
  {{ name: "sample" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }},
  {{ name: "timestep" data_type: TYPE_INT64 dims: [ 1 ] }}
]
output [ {{ name: "eps" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {o.instances} }} ]
{_params(params)}
"""


def expert_gpu_config(name: str, shape: tuple, o: RepositoryOptions, tensorrt: bool) -> str:
    """For a full Triton build with GPU backends: the same I/O on TensorRT or ONNX Runtime."""
    c, h, w = shape
    platform, filename = ("tensorrt_plan", "model.plan") if tensorrt else ("onnxruntime_onnx", "model.onnx")
    return f"""name: "expert_{name}"
platform: "{platform}"
default_model_filename: "{filename}"
max_batch_size: {o.max_batch}
input [
  {{ name: "sample" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }},
  {{ name: "timestep" data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
output [ {{ name: "eps" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
instance_group [ {{ kind: KIND_GPU count: 1 }} ]
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
    return f"""name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "num_images" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "steps" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "sampler" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "eta" data_type: TYPE_FP32 dims: [ 1 ] optional: true }}
]
output [
{stream_out}  {{ name: "images" data_type: TYPE_UINT8 dims: [ -1, {h}, {w}, {c} ] }}
]
{policy}instance_group [ {{ kind: KIND_CPU count: {o.router_instances} }} ]
{_params({"max_images": str(o.max_batch)})}
"""


def write_repository(
    bundle: Bundle, path: str | os.PathLike, options: RepositoryOptions | None = None
) -> Path:
    """Write the model repository for an exported bundle (atomically)."""
    o = options or RepositoryOptions()
    shape = tuple(bundle.manifest.sample_shape)
    path = Path(path)
    with atomic_dir(path) as tmp:
        for e in bundle.experts:
            if not e.onnx:
                raise StepadaptError(
                    f"expert {e.name} has no ONNX file: run 'stepadapt export {bundle.path}' first"
                )
            onnx_path = bundle.verify_file(e.onnx["path"], e.onnx["sha256"], f"ONNX file of expert {e.name}")
            d = tmp / f"expert_{e.name}"
            (d / "1").mkdir(parents=True)
            (d / "configs").mkdir()
            (d / "config.pbtxt").write_text(expert_config(e.name, shape, e.lo, e.hi, o))
            (d / "configs" / "gpu.pbtxt").write_text(
                expert_gpu_config(e.name, shape, o, tensorrt=bool(e.trt))
            )
            shutil.copy(MODELS_SRC / "expert.py", d / "1" / "model.py")
            shutil.copy(onnx_path, d / "1" / "model.onnx")
            if e.trt:
                shutil.copy(bundle.path / e.trt["path"], d / "1" / "model.plan")
        for name, decoupled in (("generate", False), ("generate_stream", True)):
            d = tmp / name
            (d / "1").mkdir(parents=True)
            (d / "config.pbtxt").write_text(router_config(name, shape, o, decoupled))
            shutil.copy(MODELS_SRC / "generate.py", d / "1" / "model.py")
            (d / "1" / "manifest.json").write_text(json.dumps(bundle.manifest.to_dict()))
    return path
