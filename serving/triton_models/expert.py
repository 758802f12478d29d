"""Triton python-backend model: one expert's ONNX in onnxruntime (CUDA where installed, else CPU).

Dynamic batching hands ``execute`` several requests at once (steps of
concurrent generations that landed on this expert); they run as one batch.
A malformed request gets its own error response; the others still run.
An expert of a class-conditional bundle also takes ``class_labels`` (INT64, one
per row, the null label included: the router's guided rows); the Gaussian beside
it takes none. An expert of a text bundle takes ``encoder_hidden_states`` (tokens x width per row).
"""

import sys
from pathlib import Path

# The stepadapt this repository was written with, copied beside it: a stock Triton needs only the
# packages stepadapt imports, not stepadapt itself (and an installed one cannot disagree with it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from stepadapt.export.runtime import timestep_feed
from stepadapt.serving.model_args import model_config, onnx_session
from stepadapt.serving.replies import error


class TritonPythonModel:
    def initialize(self, args):
        cfg, params = model_config(args)
        self.session = onnx_session(args, params)
        self.shape = tuple(int(d) for d in json.loads(params["sample_shape"]))
        self.lo, self.hi = (int(v) for v in json.loads(params["timesteps"]))
        inputs = {i.name for i in self.session.get_inputs()}
        self.labels, self.text = "class_labels" in inputs, "encoder_hidden_states" in inputs
        null = params.get("null_label")  # the repository writes it beside a labels input
        self.null_label = None if null is None else int(null)

    def _check(self, x, t, y, e):
        if x.shape[1:] != self.shape:
            return f"sample must be [B, {', '.join(map(str, self.shape))}], got {list(x.shape)}"
        if t.size != x.shape[0]:
            return f"timestep must have one value per sample ({x.shape[0]}), got {t.size}"
        if not np.isfinite(x).all():
            return "sample contains NaN or infinite values"
        if t.size and (t.min() < self.lo or t.max() >= self.hi):
            return f"timestep outside this expert's interval [{self.lo}, {self.hi})"
        if e is not None and (e.ndim != 3 or len(e) != x.shape[0] or not np.isfinite(e).all()):
            return (
                f"encoder_hidden_states must be [{x.shape[0]}, tokens, width] and finite, got {list(e.shape)}"
            )
        return None if y is None else self._check_labels(y, x.shape[0])

    def _check_labels(self, y, rows):
        if y.size != rows:
            return f"class_labels must have one value per sample ({rows}), got {y.size}"
        if y.size and self.null_label is not None and (y.min() < 0 or y.max() > self.null_label):
            return f"class label outside 0..{self.null_label} ({self.null_label}: no class)"
        return None

    def _labels(self, request):
        if not self.labels:
            return None
        return pb_utils.get_input_tensor_by_name(request, "class_labels").as_numpy().reshape(-1)

    def _text(self, request):
        if not self.text:
            return None
        e = pb_utils.get_input_tensor_by_name(request, "encoder_hidden_states").as_numpy()
        return e.astype(np.float32, copy=False)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # calls that stack: one token count of their text (every call alike without text)
        for i, r in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(r, "sample").as_numpy().astype(np.float32, copy=False)
            t = pb_utils.get_input_tensor_by_name(r, "timestep").as_numpy().reshape(-1).astype(np.float64)
            y, e = self._labels(r), self._text(r)
            problem = self._check(x, t, y, e)
            if problem:
                responses[i] = error(problem)
            else:
                groups.setdefault(None if e is None else e.shape[1:], []).append((i, x, t, y, e))
        for calls in groups.values():
            feed = {
                "sample": np.concatenate([c[1] for c in calls]),
                "timestep": timestep_feed(self.session, np.concatenate([c[2] for c in calls])),
            }
            if self.labels:
                feed["class_labels"] = np.concatenate([c[3] for c in calls]).astype(np.int64)
            if self.text:
                feed["encoder_hidden_states"] = np.concatenate([c[4] for c in calls])
            eps = self.session.run(["eps"], feed)[0]
            start = 0
            for i, x, *_ in calls:
                part = eps[start : start + len(x)]
                start += len(x)
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("eps", part)])
        return responses
