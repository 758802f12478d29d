"""Triton python-backend model: the router.

Runs stepadapt's own sampling loop (imported, not copied) with a Router whose
experts are BLS calls to ``expert_<name>``. ``generate`` answers once with the
images; ``generate_stream`` (decoupled) also sends one message per step.
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from stepadapt import StepadaptError
from stepadapt.sampling import Router, sample_images, validate_request
from stepadapt.schedule import SAMPLERS


def _error(msg):
    try:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INVALID_ARG))
    except (AttributeError, TypeError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


def _bls_expert(model_name):
    def call(x, t):
        req = pb_utils.InferenceRequest(
            model_name=model_name,
            requested_output_names=["eps"],
            inputs=[
                pb_utils.Tensor("sample", x.numpy().astype(np.float32)),
                pb_utils.Tensor("timestep", t.numpy().astype(np.int64).reshape(-1, 1)),
            ],
        )
        resp = req.exec()
        if resp.has_error():
            raise StepadaptError(f"{model_name}: {resp.error().message()}")
        return torch.from_numpy(pb_utils.get_output_tensor_by_name(resp, "eps").as_numpy().copy())

    return call


def _scalar(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise StepadaptError(f"input {name} must hold exactly one value, got {a.size}")
    v = a[0]
    return v.decode() if isinstance(v, bytes) else v.item()


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "manifest.json")) as f:
            manifest = json.load(f)
        self.max_images = int(params.get("max_images", "64"))
        self.scheduler = manifest["scheduler"]
        self.shape = tuple(manifest["sample_shape"])
        self.names = [e["name"] for e in manifest["experts"]]
        bounds = [e["timesteps"][0] for e in manifest["experts"]] + [manifest["experts"][-1]["timesteps"][1]]
        self.router = Router(bounds, [_bls_expert(f"expert_{n}") for n in self.names])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        torch.set_num_threads(1)

    def _run(self, request, callback=None):
        seed = int(_scalar(request, "seed", 0))
        n = int(_scalar(request, "num_images", 1))
        steps = int(_scalar(request, "steps", 50))
        sampler = str(_scalar(request, "sampler", "ddim")).lower()
        eta = float(_scalar(request, "eta", 0.0))
        if sampler not in SAMPLERS:
            raise StepadaptError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        validate_request(steps, n, eta, self.max_images, int(self.scheduler["num_train_timesteps"]))
        return sample_images(
            self.router, self.scheduler, self.shape, n, steps=steps, sampler=sampler, eta=eta,
            seed=seed, batch=self.max_images, callback=callback,
        )  # fmt: skip

    def execute(self, requests):
        if self.decoupled:
            for r in requests:
                self._stream(r)
            return None
        responses = []
        for r in requests:
            try:
                images = self._run(r)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("images", images)]))
            except StepadaptError as e:
                responses.append(_error(str(e)))
        return responses

    def _stream(self, request):
        sender = request.get_response_sender()

        def progress(i, t, x):
            expert = self.names[self.router.index(t)]
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("step", np.array([i + 1], dtype=np.int32)),
                        pb_utils.Tensor("timestep", np.array([t], dtype=np.int32)),
                        pb_utils.Tensor("expert", np.array([expert.encode()], dtype=np.object_)),
                    ]
                )
            )

        try:
            images = self._run(request, progress)
            sender.send(
                pb_utils.InferenceResponse([pb_utils.Tensor("images", images)]),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except StepadaptError as e:
            sender.send(_error(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
