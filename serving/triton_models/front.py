"""Triton python-backend model: the ``generate`` endpoint in front of the batched router.

Clients send one request of scalars; Triton's dynamic batcher only batches
models whose tensors carry a batch axis. So this thin model (numpy only, many
instances, no torch) adds that axis and hands each request to ``sampler``,
where concurrent requests are stepped together as one batch. One hop per
request instead of one per step.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS = ("seed", "num_images", "steps", "sampler", "eta")


def _error(msg, code="INVALID_ARG"):
    try:
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(msg, getattr(pb_utils.TritonError, code))
        )
    except (AttributeError, TypeError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.target = params.get("target", "sampler")

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        inputs = []
        for name in INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                continue
            a = t.as_numpy().reshape(-1)
            if a.size != 1:
                return _error(f"input {name} must hold exactly one value, got {a.size}")
            inputs.append(pb_utils.Tensor(name, a.reshape(1, 1)))
        resp = pb_utils.InferenceRequest(
            model_name=self.target, requested_output_names=["images"], inputs=inputs
        ).exec()
        if resp.has_error():
            msg = resp.error().message()
            internal = msg.startswith("internal error")
            return _error(msg, "INTERNAL" if internal else "INVALID_ARG")
        images = pb_utils.get_output_tensor_by_name(resp, "images").as_numpy()
        return pb_utils.InferenceResponse([pb_utils.Tensor("images", np.ascontiguousarray(images[0]))])
