"""Fine-tune each expert of a bundle on its own timesteps (the one training loop, t in [lo, hi)).

Each expert trains in ``BUNDLE/finetune/<name>/`` with its own resumable
checkpoint; when it finishes, its EMA weights replace the pruned ones in the
bundle (atomically) and its ONNX/TensorRT exports are dropped from the
manifest, since they no longer match the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt import distributed as dist
from stepadapt.bundle import Bundle, ExpertSpec
from stepadapt.train import CHECKPOINT_NAME, TrainConfig, TrainResult, train


def iteration_budgets(experts: list[ExpertSpec], total: int) -> dict[str, int]:
    """Split ``total`` iterations over experts in proportion to their interval lengths."""
    if total < len(experts):
        raise StepadaptError(f"{total} iterations cannot cover {len(experts)} experts")
    span = sum(e.hi - e.lo for e in experts)
    return {e.name: max(1, round(total * (e.hi - e.lo) / span)) for e in experts}


def finetune_bundle(
    bundle: Bundle,
    data: torch.Tensor,
    template: TrainConfig,
    total_iterations: int,
    *,
    experts: list[str] | None = None,
    teacher: UNet2DModel | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> dict[str, TrainResult]:
    chosen = [bundle.expert(n) for n in experts] if experts else list(bundle.experts)
    budgets = iteration_budgets(list(bundle.experts), total_iterations)
    results = {}
    for i, e in enumerate(chosen):
        cfg = TrainConfig.from_dict(
            {
                **template.to_dict(),
                "iterations": budgets[e.name],
                "t_lo": e.lo,
                "t_hi": e.hi,
                "seed": template.seed + i,
            }
        )
        run_dir = bundle.path / "finetune" / e.name
        if log and dist.is_main():
            log(f"expert {e.name} [{e.lo},{e.hi}): {cfg.iterations} iterations")
        model = bundle.load_expert(e.name)
        ema, res = train(
            model, data, bundle.manifest.scheduler, cfg, run_dir,
            resume=resume and (run_dir / CHECKPOINT_NAME).is_file(), progress=progress,
            device=device, teacher=teacher,
        )  # fmt: skip
        if dist.is_main():  # under torchrun every process holds the same weights; one writes
            bundle.update_expert_weights(
                e.name, ema.cpu(), onnx=None, trt=None,
                training={**cfg.to_dict(), "final_loss": res.final_loss, "steps": res.steps,
                          "world_size": dist.world_size(),
                          "distilled": teacher is not None and cfg.distill > 0},
            )  # fmt: skip
        dist.barrier()
        results[e.name] = res
    return results
