"""Fine-tune a bundle's experts: each alone on its own interval, or together on shared weights.

``separate`` (the default) trains each expert alone on its own interval with
its share of the iterations (split by interval length). ``shared`` trains all
pruned experts at once as slices of one full-width network (stepadapt.shared):
every update reaches every expert at its own timesteps; on the shipped 0.69 M
base it measured worse than ``separate`` at the same fine-tuning images (the
experts interfere in a network with little to spare; docs/results.md).
``specialize`` hands that fraction of the iterations to a separate phase after
the shared one. An expert the base meets the budget of
(empty pruning history) *is* the base: it is never trained and keeps the base's
weights.

Each phase trains in ``BUNDLE/finetune/<shared|name>/`` with its own resumable
checkpoint; when it finishes, the EMA weights replace the pruned ones in the
bundle (atomically) and the experts' ONNX/TensorRT exports are dropped from the
manifest, since they no longer match the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DModel

from stepadapt import StepadaptError
from stepadapt import distributed as dist
from stepadapt.bundle import Bundle, ExpertSpec
from stepadapt.shared import SharedExperts
from stepadapt.train import CHECKPOINT_NAME, DEFAULT_DISTILL, TrainConfig, TrainResult, train

MODES = ("shared", "separate")
DEFAULT_MODE = "separate"
SHARED_RUN = "shared"
DEFAULT_BATCH = 64
DEFAULT_LR = 5e-4


def finetune_config(iterations: int, **options: Any) -> TrainConfig:
    """The recovery recipe's defaults, which the CLI and the demo share; ``options`` override them."""
    defaults = {
        "batch_size": DEFAULT_BATCH, "lr": DEFAULT_LR, "warmup": min(100, iterations // 10),
        "distill": DEFAULT_DISTILL, "checkpoint_every": 250, "sample_every": 10**9,
    }  # fmt: skip
    return TrainConfig(**{**defaults, **options})


def iteration_budgets(experts: list[ExpertSpec], total: int) -> dict[str, int]:
    """Split ``total`` iterations over experts in proportion to their interval lengths."""
    if total < len(experts):
        raise StepadaptError(f"{total} iterations cannot cover {len(experts)} experts")
    span = sum(e.hi - e.lo for e in experts)
    return {e.name: max(1, round(total * (e.hi - e.lo) / span)) for e in experts}


def phase_iterations(mode: str, total: int, specialize: float) -> tuple[int, int]:
    """(shared, separate) iterations of a fine-tune of ``total``."""
    if mode not in MODES:
        raise StepadaptError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0.0 <= specialize <= 1.0:
        raise StepadaptError(f"specialize must be a fraction in [0, 1], got {specialize}")
    if mode == "separate":
        return 0, total
    separate = round(total * specialize)
    return total - separate, separate


def _run(bundle: Bundle, name: str) -> tuple:
    d = bundle.path / "finetune" / name
    return d, (d / CHECKPOINT_NAME).is_file()


def unet_experts(bundle: Bundle) -> list:
    """The U-Net experts (in timestep order): what shared weights can hold. They must tile one interval."""
    unets = [e for e in bundle.experts if e.kind == "unet"]
    if not unets or any(a.hi != b.lo for a, b in zip(unets, unets[1:], strict=False)):
        raise StepadaptError("shared fine-tuning needs the U-Net experts to tile one interval of timesteps")
    return unets


def shared_experts(bundle: Bundle, base: UNet2DModel, check: bool = True) -> SharedExperts:
    """The bundle's experts as slices of a copy of ``base``; ``check``: they must be slices of it now."""
    unets = unet_experts(bundle)
    shared = SharedExperts(
        copy.deepcopy(base), [e.lo for e in unets] + [unets[-1].hi], [bundle.structure(e.name) for e in unets]
    )
    if check:
        for i, e in enumerate(unets):
            own = bundle.load_expert(e.name).state_dict()
            cut = shared.export(i).state_dict()
            if any(not torch.allclose(own[k], cut[k], atol=1e-6) for k in own):
                raise StepadaptError(
                    f"expert {e.name}'s weights are not a slice of the given base (fine-tuned already, or "
                    "another base): shared fine-tuning starts from the base the bundle was pruned from; "
                    "prune again or use --mode separate"
                )
    return shared


def finetune_bundle(
    bundle: Bundle,
    data: torch.Tensor,
    template: TrainConfig,
    total_iterations: int,
    *,
    mode: str = DEFAULT_MODE,
    specialize: float = 0.0,
    experts: list[str] | None = None,
    teacher: UNet2DModel | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> dict[str, TrainResult]:
    """Fine-tune the pruned experts (``teacher``: the base, for distillation and as the shared start)."""
    n_shared, n_separate = phase_iterations(mode, total_iterations, specialize)
    pruned = [e for e in bundle.experts if bundle.is_pruned(e.name)]
    say = log if log and dist.is_main() else (lambda _: None)
    for e in bundle.experts:
        if e not in pruned:
            what = "the unpruned base" if e.kind == "unet" else f"a closed-form {e.kind} denoiser"
            say(f"expert {e.name} [{e.lo},{e.hi}) is {what}: kept as it is")
    if not pruned:
        return {}
    results: dict[str, TrainResult] = {}
    if n_shared > 0:
        if experts:
            raise StepadaptError("--expert picks experts for --mode separate; shared training trains all")
        if teacher is None:
            raise StepadaptError("shared fine-tuning needs the base the bundle was pruned from (--teacher)")
        spans = sorted((e.lo, e.hi) for e in pruned)
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
            raise StepadaptError(
                "shared fine-tuning trains one interval, but an unpruned expert sits between pruned ones "
                f"({', '.join(f'[{lo},{hi})' for lo, hi in spans)}): use --mode separate"
            )
        run_dir, started = _run(bundle, SHARED_RUN)
        shared = shared_experts(bundle, teacher, check=not (resume and started))
        cfg = TrainConfig.from_dict(
            {**template.to_dict(), "iterations": n_shared,
             "t_lo": min(e.lo for e in pruned), "t_hi": max(e.hi for e in pruned)}
        )  # fmt: skip
        say(f"shared: {len(pruned)} experts on one set of weights, t in [{cfg.t_lo},{cfg.t_hi}), "
            f"{n_shared} iterations")  # fmt: skip
        ema, res = train(
            shared, data, bundle.manifest.scheduler, cfg, run_dir, resume=resume and started,
            progress=progress, device=device, teacher=teacher,
        )  # fmt: skip
        if dist.is_main():
            for i, e in enumerate(unet_experts(bundle)):
                if e in pruned:
                    bundle.update_expert_weights(
                        e.name, ema.export(i), onnx=None, trt=None,
                        training=_record(cfg, res, teacher, mode="shared"),
                    )  # fmt: skip
        dist.barrier()
        results[SHARED_RUN] = res
    if n_separate == 0:
        return results
    chosen = [bundle.expert(n) for n in experts] if experts else pruned
    budgets = iteration_budgets(pruned, n_separate)
    for e in chosen:
        if e not in pruned:
            say(f"expert {e.name} is {'the unpruned base' if e.kind == 'unet' else 'closed form'}: "
                "nothing to fine-tune")  # fmt: skip
            continue
        cfg = TrainConfig.from_dict(
            {**template.to_dict(), "iterations": budgets[e.name], "t_lo": e.lo, "t_hi": e.hi,
             "seed": template.seed + bundle.experts.index(e)}
        )  # fmt: skip
        run_dir, started = _run(bundle, e.name)
        say(f"expert {e.name} [{e.lo},{e.hi}): {cfg.iterations} iterations")
        model = bundle.load_expert(e.name)
        ema, res = train(
            model, data, bundle.manifest.scheduler, cfg, run_dir, resume=resume and started,
            progress=progress, device=device, teacher=teacher,
        )  # fmt: skip
        if dist.is_main():  # under torchrun every process holds the same weights; one writes
            previous = e.training or {}
            record = _record(cfg, res, teacher, mode="separate")
            if previous.get("mode") == "shared":
                record["after"] = previous
            bundle.update_expert_weights(e.name, ema.cpu(), onnx=None, trt=None, training=record)
        dist.barrier()
        results[e.name] = res
    return results


def _record(cfg: TrainConfig, res: TrainResult, teacher, mode: str) -> dict:
    return {
        **cfg.to_dict(),
        "mode": mode,
        "final_loss": res.final_loss,
        "steps": res.steps,
        "world_size": dist.world_size(),
        "distilled": teacher is not None and cfg.distill > 0,
    }
