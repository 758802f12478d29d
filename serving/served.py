"""One bundle inside a router process, and what a request asks of it.

A router model serves one bundle or several of the same base (``stepadapt serve BUNDLE...``: the
base at 1.0 x, experts at 0.5 x, ...). Each lives in ``<version>/bundles/<name>/`` (its manifest,
its experts' ONNX files in the fused layout, the Gaussian's tensors for the jump);
``<version>/bundles.json`` lists the names, the default first. A request picks one by its
``budget`` input; without one it gets the default.

Imported only inside Triton's python backend (the BLS experts need pb_utils).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from stepadapt.export.runtime import timestep_type
from stepadapt.serving.condition import (
    CLASS_LABELS,
    TEXT,
    prompt_condition,
    request_condition,
    takes_labels,
    takes_text,
)

from stepadapt import StepadaptError
from stepadapt.conditioning import Cond, conditioning_of, for_model, take
from stepadapt.kinds import DEFAULT, kind_of
from stepadapt.sampling import (
    Router,
    Trajectory,
    images_of,
    request_trajectory,
    validate_request,
    validate_setting,
)
from stepadapt.solvers import Setting, Solver, resolve_setting

BUNDLES = "bundles"
BUDGET = "budget"


def scalar(request, name, default):
    """A request's one-value input (text decoded), or ``default`` where it has none."""
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


def _timesteps(t, dtype):
    """Fractional timesteps round for an int64 export, as onnxruntime's feed does in process."""
    return np.rint(t).astype(np.int64) if dtype == np.int64 else np.asarray(t, dtype=dtype)


def _exec(model_name, inputs, output):
    """One BLS call's ``output`` (a copy: the response's memory goes with the response)."""
    req = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=[output], inputs=inputs)
    resp = req.exec()
    if resp.has_error():
        raise StepadaptError(f"{model_name}: {resp.error().message()}")
    return torch.from_numpy(pb_utils.get_output_tensor_by_name(resp, output).as_numpy().copy())


def bls_expert(model_name, dtype, labels, max_rows, text=False):
    """A denoiser ``(x, t, cond)`` that is a BLS call to ``model_name``; ``labels``: the expert takes
    ``class_labels`` (one per row, like ``timestep``), ``text``: the text embedding. Guidance doubles
    the rows of a full request, so rows beyond the expert's ``max_batch_size`` (``max_rows``) go in
    a second call."""

    def one(x, t, cond):
        inputs = [
            pb_utils.Tensor("sample", x.numpy().astype(np.float32, copy=False)),
            pb_utils.Tensor("timestep", _timesteps(t.numpy(), dtype).reshape(-1, 1)),
        ]
        if labels:
            y = cond[CLASS_LABELS].numpy().astype(np.int64).reshape(-1, 1)
            inputs.append(pb_utils.Tensor(CLASS_LABELS, y))
        if text:
            inputs.append(pb_utils.Tensor(TEXT, cond[TEXT].numpy().astype(np.float32, copy=False)))
        return _exec(model_name, inputs, "eps")

    def call(x, t, cond=None):
        cond = cond or {}
        if len(x) <= max_rows:
            return one(x, t, cond)
        parts = [slice(lo, lo + max_rows) for lo in range(0, len(x), max_rows)]
        return torch.cat([one(x[p], t[p], take(cond, p)) for p in parts])

    return call


@dataclass(frozen=True)
class Ask:
    """What one request asks for: its images (seed, count, condition) and how to sample them;
    ``truncated``: its prompt was cut to the tokenizer's limit (the answer says so)."""

    seed: int
    n: int
    setting: Setting
    cond: Cond
    truncated: bool = False


def _onnx_call(path, threads, device, dtype):
    """An onnxruntime session as a function of one tensor (a text encoder, a VAE decoder)."""
    from stepadapt.export.runtime import session

    sess = session(path, threads, device=device)
    name_in = sess.get_inputs()[0].name

    def call(x):
        return torch.from_numpy(sess.run(None, {name_in: x.detach().cpu().numpy().astype(dtype)})[0])

    return call


def _bls_call(model_name, dtype):
    """A pipeline part that is a Triton model of its own (the bls layout) as a function of one tensor."""
    from stepadapt.export.surround import NAMES

    name_in, name_out = NAMES[model_name]

    def call(x):
        x = x.detach().cpu().numpy().astype(dtype)
        return _exec(model_name, [pb_utils.Tensor(name_in, x)], name_out)

    return call


def load_surround(directory, manifest, params, local=True):
    """A pipeline bundle's tokenizer + text encoder and VAE decoder: the text encoder runs once per
    request, the decoder once per image, in this process (ONNX) where ``local``, else as BLS calls
    to the bls layout's ``text_encoder`` and ``vae_decoder`` models. (None, None) for a bare U-Net's."""
    records = manifest.get("surround_onnx") or {}
    if not records:
        return None, None
    from stepadapt.latents import LatentCodec
    from stepadapt.text import TextEncoder

    threads, device = int(params.get("threads", "1")), params.get("device", "auto")
    text = latent = None
    if "text_encoder" in records:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
        enc = (
            _onnx_call(os.path.join(directory, "text_encoder.onnx"), threads, device, np.int64)
            if local
            else _bls_call("text_encoder", np.int64)
        )
        text = TextEncoder(tokenizer, enc)
    if "vae_decoder" in records:
        dec = (
            _onnx_call(os.path.join(directory, "vae_decoder.onnx"), threads, device, np.float32)
            if local
            else _bls_call("vae_decoder", np.float32)
        )
        latent = LatentCodec(None, records["vae_decoder"]["scaling_factor"], decoder=dec)
    return text, latent


class ServedBundle:
    """One bundle as a router serves it: its Router (experts in this process, or BLS calls), the
    denoiser a step calls (guided where the bundle is class-conditional), its recommended setting
    and its analytic jump."""

    def __init__(self, name, directory, params, local):
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
        self.name = name
        self.max_images = int(params.get("max_images", "64"))
        self.scheduler = manifest["scheduler"]
        self.shape = tuple(manifest["sample_shape"])
        self.names = [e["name"] for e in manifest["experts"]]
        bounds = [e["timesteps"][0] for e in manifest["experts"]] + [manifest["experts"][-1]["timesteps"][1]]
        if local:
            from stepadapt.export.onnx import OnnxDenoiser

            threads, device = int(params.get("threads", "1")), params.get("device", "auto")
            experts = [
                OnnxDenoiser(os.path.join(directory, f"{n}.onnx"), threads, device) for n in self.names
            ]
        else:
            experts = [
                bls_expert(
                    f"expert_{e['name']}",
                    np.float32 if timestep_type(e.get("onnx")) == "float32" else np.int64,
                    takes_labels(e.get("onnx")),
                    self.max_images,
                    takes_text(e.get("onnx")),
                )
                for e in manifest["experts"]
            ]
        self.router = Router(bounds, experts)
        # MACs of one evaluation, averaged over the timestep axis: which bundle is the cheaper one
        T = bounds[-1] - bounds[0]
        self.macs = (
            sum(e.get("macs", 0) * (e["timesteps"][1] - e["timesteps"][0]) for e in manifest["experts"]) / T
        )
        self.conditioning = conditioning_of(manifest["base_config"])
        self.denoiser = for_model(self.router, self.conditioning)
        self.text, self.latent = load_surround(directory, manifest, params, local)
        self.recommended = manifest.get("recommended")
        self.jump_file = os.path.join(directory, "jump.safetensors")
        top = manifest["experts"][-1]
        self.jump_cut = top["timesteps"][0] if kind_of(top.get("kind", DEFAULT)).jumps else None
        self._jump = None

    def ask(self, request):
        """What ``request`` asks of this bundle, its recommendation where it is silent; a one-line
        error for what cannot be served."""
        seed = int(scalar(request, "seed", 0))
        n = int(scalar(request, "num_images", 1))
        scale = scalar(request, "guidance_scale", None)
        steps = scalar(request, "steps", None)
        sampler = scalar(request, "sampler", None)
        eta = scalar(request, "eta", None)
        jump = scalar(request, "jump", None)
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
        self.check(setting, n)
        prompt, negative = scalar(request, "prompt", None), scalar(request, "negative_prompt", None)
        if self.conditioning.text_dim or prompt is not None or negative is not None:
            cond, cut = prompt_condition(self.text, n, prompt, negative, scale, _labels(request))
            return Ask(seed, n, setting, cond, cut)
        return Ask(seed, n, setting, request_condition(self.conditioning, n, _labels(request), scale))

    @property
    def decode(self):
        """A latent bundle's decoder (latents -> images), None for a pixel one."""
        return self.latent.decode if self.latent is not None else None

    def images(self, x):
        """A finished trajectory's uint8 images (decoded by the VAE, once per image, where latent)."""
        return images_of(x, self.decode)

    def null_condition(self, n):
        """Rows the experts can run on without a request (calibration): the null class, the empty text."""
        c = self.conditioning
        if c.classes:
            return {"class_labels": torch.full((n,), c.null_label)}
        if c.text_dim and self.text is not None:
            return {"encoder_hidden_states": self.text.encode([""]).embeddings.expand(n, -1, -1)}
        return {}

    def check(self, setting, n):
        validate_request(setting.steps, n, self.max_images, int(self.scheduler["num_train_timesteps"]))
        validate_setting(setting, self.scheduler, self.jump_cut)

    def trajectory(self, ask: Ask, setting: Setting) -> Trajectory:
        """The request's trajectory at ``setting`` (its own, checked by ``ask``; or one admission
        offers it, checked here)."""
        if setting != ask.setting:
            self.check(setting, ask.n)
        return request_trajectory(
            setting.sampler, self.scheduler, self.shape, ask.n, ask.seed, setting.steps,
            jump=self.jump() if setting.jump else None, cond=ask.cond,
        )  # fmt: skip

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


def load_bundles(version_dir, params, local):
    """The bundles of a router model, the default first."""
    with open(os.path.join(version_dir, f"{BUNDLES}.json")) as f:
        names = json.load(f)
    return {n: ServedBundle(n, os.path.join(version_dir, BUNDLES, n), params, local) for n in names}


def pick(bundles, request):
    """The bundle ``request``'s ``budget`` names (the default, first, where it names none)."""
    name = scalar(request, BUDGET, None)
    if name is None or not str(name).strip():
        return next(iter(bundles.values()))
    name = str(name).strip()
    if name not in bundles:
        raise StepadaptError(f"unknown budget {name!r}; this server serves {', '.join(bundles)}")
    return bundles[name]


def served_response(images, name, setting, degraded, batched=False, truncated=False):
    """The answer to a served request: ``images`` and what served them, as output tensors (a batch
    axis of 1 for a lockstep router). Output tensors, not response parameters: Triton 2.51's python
    backend sends none of a response's parameters (measured: the HTTP answer has no
    ``parameters``), so a header would not reach the client."""
    outs = [
        pb_utils.Tensor("images", images),
        pb_utils.Tensor("served_bundle", np.array([name.encode()], dtype=np.object_)),
        pb_utils.Tensor("served_steps", np.array([setting.steps], dtype=np.int32)),
        pb_utils.Tensor("served_sampler", np.array([setting.sampler.encode()], dtype=np.object_)),
        pb_utils.Tensor("degraded", np.array([bool(degraded)], dtype=np.bool_)),
        pb_utils.Tensor("prompt_truncated", np.array([bool(truncated)], dtype=np.bool_)),
    ]
    if batched:
        outs = [pb_utils.Tensor(o.name(), o.as_numpy()[None]) for o in outs]
    return pb_utils.InferenceResponse(outs)
