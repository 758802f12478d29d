"""What a python-backend model of the repository reads of Triton's ``initialize`` arguments: its
config, its ``parameters`` (strings, as the repository writes them) and, for the models that run an
ONNX export, the onnxruntime session of its ``model.onnx``.

Numpy- and Triton-free: the front imports it too.
"""

from __future__ import annotations

import json
import os
from typing import Any


def model_config(args: dict) -> tuple[dict[str, Any], dict[str, str]]:
    """The model's config and its parameters."""
    cfg = json.loads(args["model_config"])
    return cfg, {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def onnx_session(args: dict, params: dict[str, str]) -> Any:
    """The model's ``model.onnx`` in onnxruntime, with the threads and device its parameters name."""
    from stepadapt.export.runtime import session

    path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
    return session(path, int(params.get("threads", "1")), device=params.get("device", "auto"))
