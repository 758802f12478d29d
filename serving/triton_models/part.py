"""Triton python-backend model: one part of a latent text-to-image pipeline beside the U-Net experts
in the bls layout -- the text encoder (``input_ids`` -> ``last_hidden_state``) or the VAE decoder
(``latents`` -> ``images``) -- as its ONNX export in onnxruntime (CUDA where installed, else CPU).

Dynamic batching hands ``execute`` the calls of several requests at once; those of one shape run as
one batch. A malformed call gets its own error response; the others still run.
"""

import sys
from pathlib import Path

# The stepadapt this repository was written with, copied beside it (see expert.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))


import numpy as np
import triton_python_backend_utils as pb_utils
from stepadapt.serving.model_args import model_config, onnx_session
from stepadapt.serving.replies import error

from stepadapt import first_line


class TritonPythonModel:
    def initialize(self, args):
        cfg, params = model_config(args)
        self.session = onnx_session(args, params)
        self.input, self.output = cfg["input"][0]["name"], cfg["output"][0]["name"]
        self.dtype = np.int64 if cfg["input"][0]["data_type"] == "TYPE_INT64" else np.float32

    def _read(self, request):
        x = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
        if self.dtype == np.float32 and not np.isfinite(x).all():
            raise ValueError(f"{self.input} contains NaN or infinite values")
        return x.astype(self.dtype, copy=False)

    def execute(self, requests):
        responses = [None] * len(requests)
        by_shape = {}
        for i, r in enumerate(requests):
            try:
                x = self._read(r)
            except ValueError as e:
                responses[i] = error(str(e))
                continue
            by_shape.setdefault(x.shape[1:], []).append((i, x))
        for calls in by_shape.values():
            try:
                outs = self._run([x for _, x in calls])
            except Exception:  # noqa: BLE001 - one bad call (ids past the vocabulary) must not fail the rest
                outs = []
                for _, x in calls:
                    try:
                        outs += self._run([x])
                    except Exception as e:  # noqa: BLE001 - its own error, the others answered
                        outs.append(e)
            for (i, _), out in zip(calls, outs, strict=True):
                responses[i] = (
                    error(f"{self.input}: {first_line(out)}")
                    if isinstance(out, Exception)
                    else pb_utils.InferenceResponse([pb_utils.Tensor(self.output, out)])
                )
        return responses

    def _run(self, xs):
        """One session run for the calls ``xs``; each call's rows of the output."""
        out = self.session.run([self.output], {self.input: np.concatenate(xs)})[0]
        bounds = np.cumsum([0] + [len(x) for x in xs])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
