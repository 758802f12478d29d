"""Where a model runs and at what precision: the two choices every command that runs a model makes.

The rule everywhere else follows from :func:`device_of`: a function that runs a
model runs it where the model lives and moves its inputs there, so the caller
moves the model once and the data (and the CPU generators that draw noise and
timesteps) stay where they are. Results are then the same on any device, up to
the device's arithmetic.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Any

import torch

from stepadapt import StepadaptError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> str:
    """``auto`` -> cuda where torch sees a GPU, else cpu; ``cuda[:N]`` without one is refused."""
    check_device(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StepadaptError("--device cuda asked for, but no CUDA device is available")
    return name


def check_device(name: str) -> None:
    """A device name this project knows (whether it is there is :func:`resolve_device`'s question)."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise StepadaptError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s tensors live (CPU for one without any)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def resolve_precision(name: str, device: str | torch.device) -> str:
    """``auto`` -> bf16 on a GPU that has it, fp16 on an older GPU, fp32 on a CPU (where autocast
    is slower than fp32 on most CPUs). bf16/fp16 may be asked for on a CPU too (CPU autocast)."""
    if name not in PRECISIONS:
        raise StepadaptError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if has_native_bf16(device) else "fp16"


def has_native_bf16(device: str | torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0, Ampere, and later). torch's is_bf16_supported() also
    says yes where bf16 is only emulated (V100, T4), and there it is slower than fp16."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device if device.index is not None else None)[0] >= 8


def autocast(precision: str, device: str | torch.device) -> Any:
    """The forward passes' context: mixed precision (weights and optimizer stay fp32), or none."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling (bf16 has fp32's range and needs none); a disabled scaler is a no-op."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


DEVICE_HELP = "auto (CUDA where there is one), cpu or cuda."
PRECISION_HELP = (
    "Forward passes in mixed precision: auto (bf16 on a GPU that has it, else fp16 with loss scaling; "
    "fp32 on a CPU), fp32, bf16 or fp16. Weights, optimizer and EMA stay fp32."
)
