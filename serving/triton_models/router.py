"""Triton python-backend model: the router (``router`` in the fused layout, ``generate`` in bls,
``generate_stream`` in both).

Runs stepadapt's own sampling loop (imported, not copied) with a Router whose
experts are either onnxruntime sessions in this process (``experts: local``,
the default layout: no hop per step) or BLS calls to ``expert_<name>``
(``experts: bls``: each expert its own Triton model, e.g. TensorRT on a GPU).

Given several requests at once (dynamic batching), the ones that ask for the
same solver, steps and jump run as one batch in lockstep, each with its own
scheduler (multi-step solvers keep per-request state); each still gets the
images it would get alone (``sample_together``). A request that leaves out
``sampler``, ``steps`` or ``jump`` gets the bundle's recommended setting
(``stepadapt tune``). ``generate_stream`` (decoupled) runs one request at a
time and sends a message per model evaluation.

A class-conditional bundle takes ``class_labels`` (one per image) and
``guidance_scale`` (``stepadapt.serving.condition``). Each request's condition
rides with its rows; classifier-free guidance wraps the Router
(``conditioning.guided``), so a step is still one Router call for all rows of
all batched requests, conditional and unconditional, and each expert runs once
per step. Experts that take labels get them (in process: the ONNX session asks
for them; bls: the call passes them); the Gaussian does not.

Between steps every request is looked at (``Watch``): cancelled by its client
(directly, or through the front's mark), past the server's time limit, or the
server stopping; such a request gets its error and its images stop costing
anything, while the rest of its batch steps on.
"""

import sys
from pathlib import Path

# The stepadapt this repository was written with, copied beside it: a stock Triton needs only the
# packages stepadapt imports, not stepadapt itself (and an installed one cannot disagree with it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import json
import os
import time
from collections import defaultdict

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from stepadapt.serving import cancel
from stepadapt.serving.condition import CLASS_LABELS, request_condition, takes_labels
from stepadapt.serving.replies import error

import stepadapt
from stepadapt import StepadaptError
from stepadapt.conditioning import conditioning_of, guided, take
from stepadapt.export.runtime import timestep_type
from stepadapt.kinds import DEFAULT, kind_of
from stepadapt.sampling import Router, sample_images, sample_together, validate_request, validate_setting
from stepadapt.solvers import Solver, resolve_setting

CHECK_EVERY = 0.05  # seconds between looks at one request (each asks Triton over IPC)


def _internal(e, relayed=False):
    """Our failure: a short line for the client, the details in the server log."""
    pb_utils.Logger.log_error(f"generate: {type(e).__name__}: {e}")
    return error(f"internal error ({type(e).__name__}); see the server log", "INTERNAL", relayed)


class Stopped(Exception):
    """A request given up on between steps; ``code`` is the Triton status it ends with."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


class Watch:
    """Whether one request should stop now, and why; asked before every step, looked up at most every
    CHECK_EVERY seconds so a fast step does not pay an IPC per request."""

    def __init__(self, request, max_seconds, cancelled=None):
        self.cancelled = cancelled or request.is_cancelled  # decoupled: the response sender's
        self.id = request.request_id()
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds
        self.stopped = None
        self._next = 0.0

    def check(self):
        now = time.monotonic()
        if self.stopped is None and now >= self._next:
            self._next = now + CHECK_EVERY
            if cancel.marked(cancel.SHUTDOWN):
                self.stopped = Stopped("UNAVAILABLE", "the server is shutting down")
            elif self.cancelled() or cancel.marked(self.id):
                self.stopped = Stopped("CANCELLED", "cancelled by the client")
            elif now > self.deadline:
                limit = f"{self.max_seconds:g}"
                self.stopped = Stopped("UNAVAILABLE", f"the request ran past the server's limit of {limit} s")
        return self.stopped


def _timesteps(t, dtype):
    """Fractional timesteps round for an int64 export, as onnxruntime's feed does in process."""
    return np.rint(t).astype(np.int64) if dtype == np.int64 else np.asarray(t, dtype=dtype)


def _bls_expert(model_name, dtype, labels, max_rows):
    """A denoiser ``(x, t, cond)`` that is a BLS call to ``model_name``; ``labels``: the expert takes
    ``class_labels`` (one per row, like ``timestep``). Guidance doubles the rows of a full request,
    so rows beyond the expert's ``max_batch_size`` (``max_rows``) go in a second call."""

    def one(x, t, cond):
        inputs = [
            pb_utils.Tensor("sample", x.numpy().astype(np.float32, copy=False)),
            pb_utils.Tensor("timestep", _timesteps(t.numpy(), dtype).reshape(-1, 1)),
        ]
        if labels:
            y = cond[CLASS_LABELS].numpy().astype(np.int64).reshape(-1, 1)
            inputs.append(pb_utils.Tensor(CLASS_LABELS, y))
        req = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=["eps"], inputs=inputs)
        resp = req.exec()
        if resp.has_error():
            raise StepadaptError(f"{model_name}: {resp.error().message()}")
        # A copy: the response's memory belongs to the response and goes with it.
        return torch.from_numpy(pb_utils.get_output_tensor_by_name(resp, "eps").as_numpy().copy())

    def call(x, t, cond=None):
        cond = cond or {}
        if len(x) <= max_rows:
            return one(x, t, cond)
        parts = [slice(lo, lo + max_rows) for lo in range(0, len(x), max_rows)]
        return torch.cat([one(x[p], t[p], take(cond, p)) for p in parts])

    return call


def _scalar(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise StepadaptError(f"input {name} must hold exactly one value, got {a.size}")
    v = a[0]
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            raise StepadaptError(f"input {name} is not UTF-8 text") from None
    return v.item()


def _labels(request):
    """The request's class labels (any shape: a batch axis of 1 from the front), or None."""
    t = pb_utils.get_input_tensor_by_name(request, CLASS_LABELS)
    return None if t is None else t.as_numpy().reshape(-1)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "manifest.json")) as f:
            manifest = json.load(f)
        self.max_images = int(params.get("max_images", "64"))
        self.max_seconds = float(params.get("max_seconds", "600"))
        self.scheduler = manifest["scheduler"]
        self.shape = tuple(manifest["sample_shape"])
        self.names = [e["name"] for e in manifest["experts"]]
        bounds = [e["timesteps"][0] for e in manifest["experts"]] + [manifest["experts"][-1]["timesteps"][1]]
        if params.get("experts", "bls") == "local":
            from stepadapt.export.onnx import OnnxDenoiser

            threads, device = int(params.get("threads", "1")), params.get("device", "auto")
            paths = [os.path.join(version_dir, f"{n}.onnx") for n in self.names]
            experts = [OnnxDenoiser(p, threads, device) for p in paths]
        else:
            experts = [
                _bls_expert(
                    f"expert_{e['name']}",
                    np.float32 if timestep_type(e.get("onnx")) == "float32" else np.int64,
                    takes_labels(e.get("onnx")),
                    self.max_images,
                )
                for e in manifest["experts"]
            ]
        self.router = Router(bounds, experts)  # the stream names each step's expert from it
        self.conditioning = conditioning_of(manifest["base_config"])
        c = self.conditioning
        self.denoiser = guided(self.router, c.null_label) if c.classes else self.router
        self.recommended = manifest.get("recommended")
        self.jump_file = os.path.join(version_dir, "jump.safetensors")
        top = manifest["experts"][-1]
        self.jump_cut = top["timesteps"][0] if kind_of(top.get("kind", DEFAULT)).jumps else None
        self._jump = None
        pb_utils.Logger.log_info(f"{cfg['name']}: stepadapt from {os.path.dirname(stepadapt.__file__)}")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.batched = int(cfg.get("max_batch_size", 0)) > 0  # then every tensor has a leading 1
        torch.set_num_threads(1)

    def _parse(self, request):
        """(seed, n, setting, cond): what the request asks for, the bundle's recommendation where it is
        silent; ``cond`` its rows' condition (empty for an unconditional bundle)."""
        seed = int(_scalar(request, "seed", 0))
        n = int(_scalar(request, "num_images", 1))
        scale = _scalar(request, "guidance_scale", None)
        steps = _scalar(request, "steps", None)
        sampler = _scalar(request, "sampler", None)
        eta = _scalar(request, "eta", None)
        jump = _scalar(request, "jump", None)
        T = int(self.scheduler["num_train_timesteps"])
        sampler = None if sampler is None else str(sampler).strip() or None
        if sampler is not None:
            Solver.parse(sampler)  # an unknown solver or option is said first
        validate_request(50 if steps is None else int(steps), n, self.max_images, T)
        setting = resolve_setting(
            self.recommended, sampler,
            None if steps is None else int(steps), None if jump is None else bool(jump),
            None if eta is None or float(eta) == 0.0 else float(eta),
        )  # fmt: skip
        validate_request(setting.steps, n, self.max_images, T)
        validate_setting(setting, self.scheduler, self.jump_cut)
        return seed, n, setting, request_condition(self.conditioning, n, _labels(request), scale)

    def jump(self):
        """The analytic jump over the Gaussian expert's interval, loaded on first use."""
        if self._jump is None:
            if self.jump_cut is None or not os.path.isfile(self.jump_file):
                raise StepadaptError(
                    "jump asked for, but this bundle has no Gaussian expert on the noisy end"
                )
            from safetensors.torch import load_file
            from stepadapt.gaussian import GaussianDenoiser, GaussianJump

            g = GaussianDenoiser.from_tensors(load_file(self.jump_file), self.shape, self.scheduler)
            self._jump = GaussianJump(g, self.jump_cut)
        return self._jump

    def execute(self, requests):
        if self.decoupled:
            for r in requests:
                self._stream(r)
            return None
        responses = [None] * len(requests)
        groups = defaultdict(list)  # setting -> [(index, n, seed, cond, watch)]
        for i, r in enumerate(requests):
            try:
                seed, n, setting, cond = self._parse(r)
                groups[setting].append((i, n, seed, cond, Watch(r, self.max_seconds)))
            except StepadaptError as e:
                responses[i] = error(str(e), relayed=self.batched)
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
                responses[i] = _internal(e, self.batched)
        for setting, members in groups.items():
            for chunk in self._chunks(members):
                self._run(chunk, responses, setting)
        return responses

    def _run(self, chunk, responses, setting):
        """One lockstep batch; if it fails, each request is tried alone so only its culprit fails."""

        def stopped():
            return [w.check() is not None for *_, w in chunk]

        try:
            images = sample_together(
                self.denoiser, self.scheduler, self.shape, [(n, seed, cond) for _, n, seed, cond, _ in chunk],
                steps=setting.steps, sampler=setting.sampler, stopped=stopped,
                jump=self.jump() if setting.jump else None,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            if len(chunk) > 1:
                for member in chunk:
                    self._run([member], responses, setting)
                return
            ours = isinstance(e, StepadaptError)  # a message meant for the user, still our failure
            responses[chunk[0][0]] = (
                error(str(e), "INTERNAL", self.batched) if ours else _internal(e, self.batched)
            )
            return
        for (i, *_, watch), im in zip(chunk, images, strict=True):
            if im is None:
                responses[i] = error(str(watch.stopped), watch.stopped.code, self.batched)
            else:
                out = pb_utils.Tensor("images", im[None] if self.batched else im)
                responses[i] = pb_utils.InferenceResponse([out])

    def _chunks(self, members):
        """Consecutive runs of requests whose images together fit one batch."""
        chunk, total = [], 0
        for m in members:
            if chunk and total + m[1] > self.max_images:
                yield chunk
                chunk, total = [], 0
            chunk.append(m)
            total += m[1]
        if chunk:
            yield chunk

    def _stream(self, request):
        sender = request.get_response_sender()
        watch = Watch(request, self.max_seconds, sender.is_cancelled)

        def progress(i, t, x):
            if watch.check() is not None:
                raise watch.stopped
            expert = self.names[self.router.index(t)]
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("step", np.array([i + 1], dtype=np.int32)),
                        pb_utils.Tensor("timestep", np.array([round(t)], dtype=np.int32)),
                        pb_utils.Tensor("expert", np.array([expert.encode()], dtype=np.object_)),
                    ]
                )
            )

        try:
            seed, n, setting, cond = self._parse(request)
            images = sample_images(
                self.denoiser, self.scheduler, self.shape, n, steps=setting.steps, sampler=setting.sampler,
                seed=seed, batch=self.max_images, callback=progress,
                jump=self.jump() if setting.jump else None, cond=cond,
            )  # fmt: skip
            last = pb_utils.InferenceResponse([pb_utils.Tensor("images", images)])
        except Stopped as e:
            last = error(str(e), e.code)
        except StepadaptError as e:
            last = error(str(e))
        except Exception as e:  # noqa: BLE001
            last = _internal(e)
        try:
            sender.send(last, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001 - the client went away; nobody is left to tell
            pb_utils.Logger.log_warn(f"generate_stream: final message not delivered: {e}")
