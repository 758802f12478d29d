"""torch.distributed glue for ``torchrun``: one process per device, DDP on the model.

Nothing here starts processes; ``torchrun`` does, and sets RANK / WORLD_SIZE /
MASTER_ADDR. Without it every helper answers as a world of one, so the same
training code runs alone or distributed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group ``torchrun`` described; gloo on CPU, nccl on GPUs."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: str | torch.device) -> torch.device:
    """Under torchrun with GPUs each process owns cuda:LOCAL_RANK."""
    device = torch.device(device)
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (in-memory exchange between our own processes), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_param_spread(model: torch.nn.Module) -> float:
    """Largest difference of any parameter between ranks; 0 when DDP kept them in step."""
    if not dist.is_initialized():
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())
