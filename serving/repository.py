"""Exported bundle -> Triton model repository, in one of two layouts.

``fused`` (default): the experts run inside the router's process, so a step
costs no hop; the router's step engine steps every request in flight together
(``scheduling="step"``; ``"lockstep"``: the requests that arrive together run as
one batch to the end, the layout before the engine, kept to measure against).
```
generate/        front.py: the endpoint; hands each request to router (numpy only)
router/          router.py + bundles/<name>/{manifest.json, <expert>.onnx}; the step engine
generate_stream/ router.py, decoupled (one message per step), experts in process
```
A fused repository may serve several bundles of one base (``bundles.json`` names them, the
default first); a request's ``budget`` picks one, and an SLO (``RepositoryOptions.slo``) lets
the engine serve a request with a cheaper one, or fewer steps, when it would miss it.
``bls``: each expert is its own Triton model and every step is a BLS call to
it; the layout for a full Triton with GPU backends (TensorRT, onnxruntime).
```
expert_<name>/config.pbtxt            python backend + onnxruntime, KIND_CPU, dynamic batching
expert_<name>/configs/gpu.pbtxt       full Triton on GPU (--model-config-name gpu)
expert_<name>/1/{model.py,model.onnx}
text_encoder/, vae_decoder/           a pipeline bundle's parts (part.py + model.onnx), batched
generate/, generate_stream/           router.py + manifest.json (+ tokenizer), BLS per step
```
Router overhead per layout is measured by ``stepadapt bench`` (docs/benchmarks.md).

The endpoints' inputs are the same in both layouts and for every bundle: ``seed``,
``num_images``, ``steps``, ``sampler``, ``eta``, ``jump``, ``budget`` (a served bundle's
name), and for a class-conditional
bundle ``class_labels`` (INT32 [N], one per image) and ``guidance_scale`` (FP32 [1], 1 =
no guidance by default); all optional in the configs, so an unconditional request is
unchanged and labels sent to an unconditional bundle get the router's own 400
(``stepadapt.serving.condition``), not Triton's "unexpected input". An expert that
takes labels (its ONNX export's ``class_labels``) declares one more input, INT64 per row.
Beside ``images`` every answer says what served it: ``served_bundle``, ``served_steps``,
``served_sampler`` and ``degraded`` (the SLO gave it less than it asked for).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import stepadapt.export as export_package
from stepadapt.export import MAX_BATCH
from stepadapt.export.runtime import timestep_type
from stepadapt.export.surround import NAMES
from stepadapt.serving.condition import CLASS_LABELS, GUIDANCE, TEXT, takes_labels, takes_text

import stepadapt
from stepadapt import Notice, StepadaptError
from stepadapt.admission import Slo
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
SCHEDULING = ("step", "lockstep")
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
    scheduling: str = "step"  # fused: the step engine, or lockstep batches (the layout before it)
    max_rows: int | None = None  # step engine: model rows per expert call (None: max_batch)
    slo: Slo | None = None  # step engine: the latency objective it keeps
    step_rows: int | None = None  # step engine: rows per step, most urgent first (None: every request)


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


def _condition_inputs(null_label: int | None, text_dim: int, reshape: str = "") -> str:
    """An expert's ``class_labels`` input (one per row, like ``timestep``) where it takes labels,
    its ``encoder_hidden_states`` (tokens x width per row) where it takes text."""
    out = ""
    if null_label is not None:
        out += f',\n  {{ name: "{CLASS_LABELS}" data_type: TYPE_INT64 dims: [ 1 ]{reshape} }}'
    if text_dim:
        out += f',\n  {{ name: "{TEXT}" data_type: TYPE_FP32 dims: [ -1, {text_dim} ] }}'
    return out


def expert_config(
    name: str,
    shape: tuple,
    lo: int,
    hi: int,
    o: RepositoryOptions,
    ttype: str = "TYPE_FP32",
    null_label: int | None = None,
    text_dim: int = 0,
) -> str:
    """A python-backend expert; ``null_label``: it takes class labels 0..null_label; ``text_dim``:
    it takes text embeddings that wide."""
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
  {{ name: "timestep" data_type: {ttype} dims: [ 1 ] }}{_condition_inputs(null_label, text_dim)}
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
    text_dim: int = 0,
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
{_condition_inputs(null_label, text_dim, " reshape: { shape: [ ] }")}
]
output [ {{ name: "eps" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
instance_group [ {{ kind: KIND_GPU count: 1 }} ]
"""


def part_configs(part: str, bundle: Bundle, o: RepositoryOptions) -> tuple[str, str]:
    """The bls layout's text encoder or VAE decoder as a Triton model of its own: the python backend
    over its ONNX export (``config.pbtxt``) and onnxruntime's own backend for a full Triton on GPU
    (``configs/gpu.pbtxt``), dynamically batched, so concurrent requests' calls share a run."""
    name_in, name_out = NAMES[part]
    if part == "text_encoder":
        dims_in, type_in = "[ -1 ]", "TYPE_INT64"
        dims_out = f"[ -1, {bundle.manifest.conditioning.text_dim} ]"
    else:
        dims_in, type_in = "[ " + ", ".join(map(str, bundle.manifest.sample_shape)) + " ]", "TYPE_FP32"
        dims_out = "[ " + ", ".join(map(str, bundle.image_shape)) + " ]"
    io = f"""max_batch_size: {o.max_batch}
input [ {{ name: "{name_in}" data_type: {type_in} dims: {dims_in} }} ]
output [ {{ name: "{name_out}" data_type: TYPE_FP32 dims: {dims_out} }} ]
dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}
"""
    cpu = f"""name: "{part}"
backend: "python"
{io}instance_group [ {{ kind: KIND_CPU count: {o.instances} }} ]
{_params({"threads": str(o.threads), "device": o.device})}
"""
    gpu = f"""name: "{part}"
platform: "onnxruntime_onnx"
default_model_filename: "model.onnx"
{io}instance_group [ {{ kind: KIND_GPU count: 1 }} ]
"""
    return cpu, gpu


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
            ("budget", "TYPE_STRING"),
            ("prompt", "TYPE_STRING"),
            ("negative_prompt", "TYPE_STRING"),
        )  # fmt: skip
    ]
    extra = " allow_ragged_batch: true" if ragged else ""
    labels = f'  {{ name: "{CLASS_LABELS}" data_type: TYPE_INT32 dims: [ -1 ] optional: true{extra} }}'
    return ",\n".join([*scalars, labels])


def _outputs(shape: tuple, batched: bool = False) -> str:
    """The endpoints' outputs: the images and what served them (for a lockstep router, per request
    of its batch)."""
    c, h, w = shape
    one = "[ 1 ]"
    return ",\n".join([
        f'  {{ name: "images" data_type: TYPE_UINT8 dims: [ -1, {h}, {w}, {c} ] }}',
        f'  {{ name: "served_bundle" data_type: TYPE_STRING dims: {one} }}',
        f'  {{ name: "served_steps" data_type: TYPE_INT32 dims: {one} }}',
        f'  {{ name: "served_sampler" data_type: TYPE_STRING dims: {one} }}',
        f'  {{ name: "degraded" data_type: TYPE_BOOL dims: {one} }}',
        f'  {{ name: "prompt_truncated" data_type: TYPE_BOOL dims: {one} }}',
    ])  # fmt: skip


def front_config(shape: tuple, o: RepositoryOptions, conditioning: Conditioning | None = None) -> str:
    """The fused layout's endpoint: the same inputs and outputs as the bls router. For a
    class-conditional bundle it fills in the condition a request leaves out (front.py says why)."""
    lockstep = o.scheduling == "lockstep"
    params = {
        "targets": json.dumps([ROUTER] if lockstep else engines(o)),
        "target_batched": str(int(lockstep)),
        "target_decoupled": str(int(not lockstep)),
    }
    if lockstep and conditioning is not None and conditioning.classes:
        params["fill"] = json.dumps({CLASS_LABELS: [], GUIDANCE: [1.0]})
    return f"""name: "generate"
backend: "python"
max_batch_size: 0
input [
{_router_inputs()}
]
output [
{_outputs(shape)}
]
{queue_policy(o)}
instance_group [ {{ kind: KIND_CPU count: {o.front_instances} }} ]
{_params(params)}
"""


def _router_model(
    name: str,
    shape: tuple,
    params: dict[str, str],
    count: int,
    *,
    batch: int = 0,
    policy: str = "",
    stream: bool = False,
) -> str:
    """A router model's config: the endpoints' inputs and outputs (with a batch axis and ragged
    labels where ``batch``: Triton's dynamic batcher then hands it several requests at once), the
    stream's per-step outputs where ``stream``, ``policy`` lines (decoupled, queueing)."""
    stream_out = (
        """  { name: "step" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "timestep" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "expert" data_type: TYPE_STRING dims: [ 1 ] },
"""
        if stream
        else ""
    )
    return f"""name: "{name}"
backend: "python"
max_batch_size: {batch}
input [
{_router_inputs(ragged=batch > 0)}
]
output [
{stream_out}{_outputs(shape, batched=batch > 0)}
]
{policy}instance_group [ {{ kind: KIND_CPU count: {count} }} ]
{_params(params)}
"""


def _local(o: RepositoryOptions) -> dict[str, str]:
    """A router's parameters with its experts in process (the fused layout)."""
    return {"max_images": str(o.max_batch), "max_seconds": str(o.max_seconds), "experts": "local",
            "threads": str(o.threads), "device": o.device}  # fmt: skip


def batched_router_config(shape: tuple, o: RepositoryOptions) -> str:
    """The fused layout's lockstep router. Requests carry a batch axis of 1 so Triton's dynamic
    batcher can hand several to one call."""
    policy = f"dynamic_batching {{ max_queue_delay_microseconds: {o.queue_delay_us} }}\n"
    return _router_model(ROUTER, shape, _local(o), o.instances, batch=o.max_requests, policy=policy)


def engines(o: RepositoryOptions) -> list[str]:
    """The step engines' model names: ``instances`` of them (``router``, ``router_1``, ...).

    Models, not instances of one model: ``execute`` of a decoupled model returns at once, so Triton
    finds its first instance free every time and never uses a second (measured: 128 of 128
    requests to instance 0). The front spreads requests over these models instead; on a CPU,
    where a step's Python runs on one core, two engines use the cores that one cannot."""
    return [ROUTER] + [f"{ROUTER}_{i}" for i in range(1, o.instances)]


def step_router_config(shape: tuple, o: RepositoryOptions, name: str = ROUTER) -> str:
    """A step-engine router of the fused layout: decoupled, so ``execute`` hands a request to the
    engine and returns, and the engine answers it when it finishes."""
    params = {**_local(o), "scheduling": "step", "max_rows": str(o.max_rows or o.max_batch)}
    if o.slo is not None:
        params["slo"] = o.slo.to_json()
    if o.step_rows is not None:
        params["step_rows"] = str(o.step_rows)
    return _router_model(name, shape, params, 1, policy="model_transaction_policy { decoupled: true }\n")


def router_config(name: str, shape: tuple, o: RepositoryOptions, decoupled: bool) -> str:
    """The bls layout's routers and ``generate_stream`` (one request at a time each)."""
    params = (
        _local(o)
        if o.layout == "fused"
        else {"max_images": str(o.max_batch), "max_seconds": str(o.max_seconds)}
    )
    policy = ("model_transaction_policy { decoupled: true }\n" if decoupled else "") + queue_policy(o) + "\n"
    return _router_model(name, shape, params, o.router_instances, policy=policy, stream=decoupled)


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


def served_names(bundles: Bundle | Mapping[str, Bundle]) -> dict[str, Bundle]:
    """Bundles by the name a request's ``budget`` gives: a single bundle is named by its directory."""
    if isinstance(bundles, Bundle):
        return {Path(bundles.path).resolve().name: bundles}
    return dict(bundles)


def _check_together(bundles: dict[str, Bundle], o: RepositoryOptions) -> None:
    """Bundles served side by side must be one base's: the same images, schedule and condition."""
    if not bundles:
        raise StepadaptError("nothing to serve: name at least one bundle")
    if len(bundles) > 1 and (o.layout != "fused" or o.scheduling != "step"):
        raise StepadaptError("several bundles are served by the fused layout's step engine only")
    if o.slo is not None and (o.layout != "fused" or o.scheduling != "step"):
        raise StepadaptError("an SLO is kept by the fused layout's step engine only (--scheduling step)")
    if o.scheduling not in SCHEDULING:
        raise StepadaptError(f"unknown scheduling {o.scheduling!r}; choose one of {', '.join(SCHEDULING)}")
    for name in bundles:
        if not name or "/" in name or name.startswith("."):
            raise StepadaptError(f"a served bundle's name must be a plain word, got {name!r}")
    (first, a), *rest = bundles.items()
    for name, b in rest:
        for what, x, y in (
            ("sample shape", a.manifest.sample_shape, b.manifest.sample_shape),
            ("noise schedule", a.manifest.scheduler, b.manifest.scheduler),
            ("conditioning", a.manifest.conditioning.describe(), b.manifest.conditioning.describe()),
        ):
            if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
                raise StepadaptError(
                    f"{name} and {first} differ in {what}: serve bundles of one base together"
                )


def _surround_files(bundle: Bundle) -> dict[str, Path]:
    """A pipeline bundle's tokenizer files and its text encoder's and VAE decoder's ONNX exports
    (verified), by where a router keeps them; none for a bare U-Net's bundle."""
    m = bundle.manifest
    if not m.pipeline:
        if m.conditioning.text_dim:
            raise StepadaptError(
                "this bundle is conditioned on text but has no text encoder (its base was a bare U-Net, "
                "not a pipeline directory): the endpoint cannot turn prompts into embeddings"
            )
        return {}
    files = {f"{p}.onnx": bundle.surround_onnx(p) for p in ("text_encoder", "vae_decoder") if p in _parts(m)}
    for name, sha in (m.pipeline.get("tokenizer") or {}).items():
        files[f"tokenizer/{name}"] = bundle.verify_file(
            f"pipeline/tokenizer/{name}", sha, f"tokenizer file {name}"
        )
    return files


def _parts(m) -> tuple[str, ...]:
    """The ONNX parts a pipeline bundle's server needs: the text encoder where it has text, the VAE
    decoder where it has a VAE."""
    return tuple(
        p for p, part in (("text_encoder", "text_encoder"), ("vae_decoder", "vae")) if part in m.pipeline
    )


def _bundle_files(bundle: Bundle) -> tuple[str, dict[str, list[Path]], Path | None, dict[str, Path]]:
    """What a router needs of a bundle: its manifest, its experts' ONNX files (verified; a large
    model's external data after its graph), the
    Gaussian's tensors for the analytic jump where it has one, and a pipeline's surround files."""
    surround = _surround_files(bundle)
    onnx = {}
    for e in bundle.experts:
        if not e.onnx:
            raise StepadaptError(
                f"expert {e.name} has no ONNX file: run 'stepadapt export {bundle.path}' first"
            )
        onnx[e.name] = [bundle.verify_file(e.onnx["path"], e.onnx["sha256"], f"ONNX file of expert {e.name}")]
        data = e.onnx.get("external_data")  # a model over 2 GiB: its weights beside, by the name it records
        if data:
            onnx[e.name].append(
                bundle.verify_file(data["path"], data["sha256"], f"ONNX data of expert {e.name}")
            )
    top = bundle.experts[-1]
    jump = (
        bundle.verify_file(top.weights, top.sha256, f"weights of expert {top.name}")
        if bundle.manifest.can_jump
        else None
    )
    return json.dumps(bundle.manifest.to_dict()), onnx, jump, surround


def write_repository(
    bundles: Bundle | Mapping[str, Bundle], path: str | os.PathLike, options: RepositoryOptions | None = None
) -> Path:
    """Write the model repository for exported bundles (atomically): one, or several of one base by
    the names requests ask for them by (the first the default)."""
    o = options or RepositoryOptions()
    if o.layout not in LAYOUTS:
        raise StepadaptError(f"unknown repository layout {o.layout!r}; choose one of {', '.join(LAYOUTS)}")
    served = served_names(bundles)
    _check_together(served, o)
    files = {name: _bundle_files(b) for name, b in served.items()}
    bundle = next(iter(served.values()))
    shape = bundle.image_shape  # what the endpoints answer: pixels, also of a latent bundle
    path = Path(path)

    def router(d: Path, config: str, local: bool) -> None:
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(config)
        shutil.copy(MODELS_SRC / "router.py", d / "1" / "model.py")
        copy_library(d)
        (d / "1" / "bundles.json").write_text(json.dumps(list(files)))
        for name, (manifest, onnx, jump, surround) in files.items():
            b = d / "1" / "bundles" / name
            b.mkdir(parents=True)
            (b / "manifest.json").write_text(manifest)
            if jump is not None:
                shutil.copy(jump, b / "jump.safetensors")
            for rel, src in surround.items():  # fused: the text encoder and VAE run in this process
                if local or rel.startswith("tokenizer/"):
                    (b / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, b / rel)
            for expert, (src, *data) in onnx.items() if local else ():
                shutil.copy(src, b / f"{expert}.onnx")
                for extra in data:
                    shutil.copy(extra, b / extra.name)

    with atomic_dir(path) as tmp:
        if o.layout == "fused":
            (tmp / "generate" / "1").mkdir(parents=True)
            front = front_config(shape, o, bundle.manifest.conditioning)
            (tmp / "generate" / "config.pbtxt").write_text(front)
            shutil.copy(MODELS_SRC / "front.py", tmp / "generate" / "1" / "model.py")
            copy_library(tmp / "generate")
            if o.scheduling == "step":
                for name in engines(o):
                    router(tmp / name, step_router_config(shape, o, name), True)
            else:
                router(tmp / ROUTER, batched_router_config(shape, o), True)
            router(tmp / "generate_stream", router_config("generate_stream", shape, o, True), local=True)
            return path
        _, onnx, _, surround = files[next(iter(files))]
        _bls_models(tmp, bundle, onnx, surround, o)
        for name, decoupled in (("generate", False), ("generate_stream", True)):
            router(tmp / name, router_config(name, shape, o, decoupled), local=False)
    return path


def _model_dir(d: Path, source: str, config: str, gpu_config: str, onnx: list[Path]) -> Path:
    """A bls layout model of its own: ``source`` as its python model, its configs (CPU, and GPU for a
    full Triton), the library, and its ONNX as ``model.onnx`` (external data beside it by the name
    the graph records)."""
    (d / "1").mkdir(parents=True)
    (d / "configs").mkdir()
    (d / "config.pbtxt").write_text(config)
    (d / "configs" / "gpu.pbtxt").write_text(gpu_config)
    shutil.copy(MODELS_SRC / source, d / "1" / "model.py")
    copy_library(d)
    graph, *data = onnx
    shutil.copy(graph, d / "1" / "model.onnx")
    for extra in data:
        shutil.copy(extra, d / "1" / extra.name)
    return d


def _bls_models(
    tmp: Path, bundle: Bundle, onnx: dict[str, list[Path]], surround: dict[str, Path], o: RepositoryOptions
) -> None:
    """The bls layout's experts, and a pipeline's text encoder and VAE decoder, each a Triton model."""
    sample = tuple(bundle.manifest.sample_shape)
    for e in bundle.experts:
        null = bundle.manifest.conditioning.null_label if takes_labels(e.onnx) else None
        text = bundle.manifest.conditioning.text_dim if takes_text(e.onnx) else 0
        cond = {"null_label": null, "text_dim": text}
        engine = _usable_engine(bundle, e, o)
        d = _model_dir(
            tmp / f"expert_{e.name}", "expert.py",
            expert_config(e.name, sample, e.lo, e.hi, o, _timestep_type(e), **cond),
            expert_gpu_config(e.name, sample, o, bool(engine), _timestep_type(e), **cond), onnx[e.name],
        )  # fmt: skip
        if engine:
            shutil.copy(engine, d / "1" / "model.plan")
    for part in NAMES:  # a pipeline's parts: Triton models named as their exports
        if f"{part}.onnx" in surround:
            _model_dir(tmp / part, "part.py", *part_configs(part, bundle, o), [surround[f"{part}.onnx"]])
