"""Triton python-backend model: the ``generate`` endpoint in front of the batched router.

Clients send one request of scalars; Triton's dynamic batcher only batches
models whose tensors carry a batch axis. So this thin model (numpy only, many
instances, no torch) adds that axis and hands each request to ``router``,
where concurrent requests are stepped together as one batch. One hop per
request instead of one per step.

Triton does not cancel the request made here when the client cancels this one,
so while it waits the front looks at its own request and, on cancellation,
marks the router's request id (``stepadapt.serving.cancel``); the router
drops it at its next step. The bounded queue in front of this model (its
``dynamic_batching`` queue policy) is where overload is refused.
"""

import sys
from pathlib import Path

# The stepadapt this repository was written with, copied beside it: a stock Triton needs only the
# packages stepadapt imports, not stepadapt itself (and an installed one cannot disagree with it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from stepadapt.serving import cancel
from stepadapt.serving.replies import error, unrelay

INPUTS = ("seed", "num_images", "steps", "sampler", "eta", "jump")
POLL = 0.05  # seconds between looks at the client's cancellation while the router works


def _relay(resp):
    """The router's answer as this endpoint's: its images without the batch axis, or its error with
    the code it was sent with (``stepadapt.serving.replies``)."""
    if resp.has_error():
        code, msg = unrelay(resp.error().message())
        return error(msg, code)
    images = pb_utils.get_output_tensor_by_name(resp, "images").as_numpy()
    return pb_utils.InferenceResponse([pb_utils.Tensor("images", np.ascontiguousarray(images[0]))])


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.target = params.get("target", "router")

    def execute(self, requests):
        return asyncio.run(self._all(requests))

    async def _all(self, requests):
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _inputs(self, request):
        inputs = []
        for name in INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                continue
            a = t.as_numpy().reshape(-1)
            if a.size != 1:
                raise ValueError(f"input {name} must hold exactly one value, got {a.size}")
            inputs.append(pb_utils.Tensor(name, a.reshape(1, 1)))
        return inputs

    async def _one(self, request):
        try:
            inputs = self._inputs(request)
        except ValueError as e:
            return error(str(e))
        rid = cancel.new_id()
        call = asyncio.ensure_future(
            pb_utils.InferenceRequest(
                model_name=self.target, requested_output_names=["images"], inputs=inputs, request_id=rid
            ).async_exec()
        )
        try:
            marked = False
            while not call.done():
                await asyncio.wait([call], timeout=POLL)
                if not marked and not call.done() and request.is_cancelled():
                    cancel.mark(rid)
                    marked = True
            return _relay(call.result())
        finally:
            cancel.clear(rid)
