"""Triton python-backend model: the ``generate`` endpoint in front of the router.

Clients send one request of scalars over HTTP or gRPC; HTTP cannot call a decoupled model, and
the fused layout's router is one (its step engine answers each request when it finishes, while
others run on). So this thin model (numpy only, many instances, no torch) hands each request to
a router and relays its answer: one hop per request instead of one per step. With several step
engines (``router``, ``router_1``, ...: ``repository.engines`` says why models, not instances)
each request goes to the one that holds the fewest (``cancel.load``: join the shortest queue;
at random, two engines on two cores were measured unevenly loaded). For a lockstep
router (``serve --scheduling lockstep``) it adds the batch axis Triton's dynamic batcher needs.

Triton does not cancel the request made here when the client cancels this one,
so while it waits the front looks at its own request and, on cancellation,
marks the router's request id (``stepadapt.serving.cancel``); the router
drops it at its next step. The bounded queue in front of this model (its
``dynamic_batching`` queue policy) is where overload is refused.

Triton's dynamic batcher puts requests of a model with optional inputs in one
batch only if they carry the same inputs. So for a class-conditional bundle the
front fills in the condition a request leaves out (``fill``: no labels, which the
router refuses in its own words, and guidance scale 1), and requests with and
without a guidance scale still share the router's steps.
"""

import sys
from pathlib import Path

# The stepadapt this repository was written with, copied beside it: a stock Triton needs only the
# packages stepadapt imports, not stepadapt itself (and an installed one cannot disagree with it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import asyncio
import json
import random

import numpy as np
import triton_python_backend_utils as pb_utils
from stepadapt.serving import cancel
from stepadapt.serving.model_args import model_config
from stepadapt.serving.replies import error, unrelay

SCALARS = ("seed", "num_images", "steps", "sampler", "eta", "jump", "guidance_scale", "budget", "prompt",
           "negative_prompt")  # fmt: skip
PER_IMAGE = ("class_labels",)  # one value per image: any length, checked by the router
TYPES = {"class_labels": np.int32, "guidance_scale": np.float32}  # of the inputs ``fill`` may name
POLL = 0.05  # seconds between looks at the client's cancellation while the router works
OUTPUTS = ("images", "served_bundle", "served_steps", "served_sampler", "degraded", "prompt_truncated")


def _relay(resp, batched):
    """The router's answer as this endpoint's: its outputs (without the batch axis of a lockstep
    router), or its error with the code it was sent with (``stepadapt.serving.replies``)."""
    if resp.has_error():
        code, msg = unrelay(resp.error().message())
        return error(msg, code)
    outs = []
    for name in OUTPUTS:
        t = pb_utils.get_output_tensor_by_name(resp, name)
        if t is not None:
            a = t.as_numpy()
            outs.append(pb_utils.Tensor(name, np.ascontiguousarray(a[0] if batched else a)))
    try:  # the router's response parameters (what served it), where this backend has them
        params = json.loads(resp.parameters() or "{}")
        return (
            pb_utils.InferenceResponse(outs, parameters=params)
            if params
            else pb_utils.InferenceResponse(outs)
        )
    except (AttributeError, TypeError, ValueError):
        return pb_utils.InferenceResponse(outs)


def _answer(responses):
    """The one answer of a decoupled router (its final message; an empty final flag is skipped)."""
    answer = None
    for r in responses:
        if answer is None and (r.has_error() or pb_utils.get_output_tensor_by_name(r, "images") is not None):
            answer = r
    return answer


class TritonPythonModel:
    def initialize(self, args):
        cfg, params = model_config(args)
        self.targets = json.loads(params.get("targets", '["router"]'))  # step engines: one per request
        self.batched = params.get("target_batched", "1") == "1"  # lockstep: a batch axis of 1
        self.decoupled = params.get("target_decoupled", "0") == "1"  # the step engine
        fill = json.loads(params.get("fill", "{}"))  # input -> its value where a request has none
        self.fill = {k: np.asarray(v, dtype=TYPES[k]).reshape(1, -1) for k, v in fill.items()}

    def execute(self, requests):
        return asyncio.run(self._all(requests))

    async def _all(self, requests):
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _inputs(self, request):
        """The request's inputs, with a lockstep router's batch axis of 1 (its ``class_labels``
        ragged: that router batches requests of different image counts)."""
        inputs = []
        for name in (*SCALARS, *PER_IMAGE):
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                if name in self.fill:
                    inputs.append(pb_utils.Tensor(name, self.fill[name]))
                continue
            a = t.as_numpy().reshape(-1)
            if name in SCALARS and a.size != 1:
                raise ValueError(f"input {name} must hold exactly one value, got {a.size}")
            inputs.append(pb_utils.Tensor(name, a.reshape(1, -1) if self.batched else a))
        return inputs

    async def _one(self, request):
        try:
            inputs = self._inputs(request)
        except ValueError as e:
            return error(str(e))
        rid = cancel.new_id()
        req = pb_utils.InferenceRequest(
            model_name=self._target(),
            requested_output_names=list(OUTPUTS),
            inputs=inputs,
            request_id=rid,
        )
        if self.decoupled:  # its responses arrive through a blocking iterator: drained off the loop
            loop = asyncio.get_running_loop()
            call = asyncio.ensure_future(self._decoupled(loop, req))
        else:
            call = asyncio.ensure_future(req.async_exec())
        try:
            marked = False
            while not call.done():
                await asyncio.wait([call], timeout=POLL)
                if not marked and not call.done() and request.is_cancelled():
                    cancel.mark(rid)
                    marked = True
            resp = call.result()
            if resp is None:
                return error("the router ended the request without an answer", "INTERNAL")
            return _relay(resp, self.batched)
        finally:
            cancel.clear(rid)

    def _target(self):
        """The least loaded engine (what each last said it holds), ties at random."""
        if len(self.targets) == 1:
            return self.targets[0]
        loads = {t: cancel.load(t) for t in self.targets}
        least = min(loads.values())
        return random.choice([t for t, n in loads.items() if n == least])

    @staticmethod
    async def _decoupled(loop, req):
        responses = await req.async_exec(decoupled=True)
        return await loop.run_in_executor(None, _answer, responses)
