"""Structural pruning of a diffusers U-Net to a MAC budget with torch-pruning's DepGraph.

Widths can only move in steps of C / num_groups (GroupNorm keeps its group
count), so the MAC curve over the pruning ratio is a staircase: we search the
ratio until the MACs land within the tolerance or on the nearest reachable step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from stepadapt import StepadaptError
from stepadapt.devices import device_of

History = list[list]  # torch-pruning's pruning history: [module name, is_out, idxs], JSON-able


def example_inputs(model: UNet2DModel) -> tuple | dict[str, torch.Tensor]:
    """One image's inputs, with the condition the model takes: DepGraph traces them and the MACs
    counted include the class embedding (and cross-attention over the text, where there is one)."""
    from stepadapt.conditioning import CLASS_LABELS, conditioning_of

    c, s, device = model.config.in_channels, model.config.sample_size, device_of(model)
    x, t = torch.randn(1, c, s, s, device=device), torch.tensor([1], device=device)
    cond = conditioning_of({"_class_name": type(model).__name__, **model.config})
    if cond.unconditional:
        return x, t
    inputs = {"sample": x, "timestep": t}
    if cond.classes:
        inputs[CLASS_LABELS] = torch.zeros(1, dtype=torch.long, device=device)
    return inputs


def count_macs(model: torch.nn.Module, inputs: tuple | None = None) -> tuple[int, int]:
    """(MACs, params) for one image, counted by torch-pruning."""
    macs, params = tp.utils.count_ops_and_params(model, inputs or example_inputs(model))
    return int(macs), int(params)


def attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """q/k/v projections -> head count, so pruning shrinks head dims and keeps heads."""
    heads = {}
    for m in model.modules():
        if isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v):
                heads[lin] = m.heads
    return heads


def fix_diffusers_attributes(model: torch.nn.Module) -> torch.nn.Module:
    """Update the static channel counts diffusers asserts on in forward()."""
    for m in model.modules():
        if isinstance(m, Downsample2D) and m.conv is not None and hasattr(m.conv, "in_channels"):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Upsample2D) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Attention):
            m.inner_dim = m.to_q.out_features
            m.query_dim = m.to_q.in_features
    return model


def prune_once(
    base: UNet2DModel,
    ratio: float,
    importance: tp.importance.Importance,
    *,
    global_pruning: bool = False,
    grads: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[UNet2DModel, History]:
    """A pruned copy of ``base`` at channel ``ratio``; ``grads`` feed Taylor importance."""
    model = copy.deepcopy(base).eval()
    if grads:
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs(model),
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=[model.conv_out],
        num_heads=attention_heads(model),
        prune_head_dims=True,
        prune_num_heads=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # RandomImportance draws from the global CPU RNG
        pruner.step()
    fix_diffusers_attributes(model)
    model.zero_grad(set_to_none=True)
    history = [[n, bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
    return model, history


@dataclass
class PruneResult:
    model: UNet2DModel
    ratio: float
    macs: int
    params: int
    history: History
    within_tolerance: bool


def prune_to_macs(
    base: UNet2DModel,
    target_macs: float,
    importance_factory: Callable[[], tp.importance.Importance],
    *,
    global_pruning: bool = False,
    grads: dict[str, torch.Tensor] | None = None,
    tol: float = 0.02,
    max_iter: int = 14,
    seed: int = 0,
) -> PruneResult:
    """Bisect the pruning ratio until the pruned model's MACs meet ``target_macs``.

    When the staircase of GroupNorm-aligned widths has no step within ``tol``,
    returns the reachable model closest to the target (``within_tolerance`` False).
    """
    base_macs, base_params = count_macs(base)
    if base_macs <= target_macs * (1 + tol):  # the unpruned model already fits
        return PruneResult(copy.deepcopy(base).eval(), 0.0, base_macs, base_params, [], True)
    if target_macs <= 0:
        raise StepadaptError(f"MAC target must be positive, got {target_macs}")
    lo, hi = 0.0, 0.95
    best: PruneResult | None = None

    def attempt(r: float) -> PruneResult:
        m, h = prune_once(
            base, r, importance_factory(), global_pruning=global_pruning, grads=grads, seed=seed
        )
        macs, params = count_macs(m)
        return PruneResult(m, r, macs, params, h, abs(macs - target_macs) <= tol * target_macs)

    def better(a: PruneResult, b: PruneResult | None) -> bool:
        # Closest to the target on either side: in a multi-group plan the groups
        # pruned later are re-budgeted to pay back the difference.
        return b is None or abs(a.macs - target_macs) < abs(b.macs - target_macs)

    # MACs fall roughly with the square of the kept width: start there.
    r = min(max(1.0 - (target_macs / base_macs) ** 0.5, 0.01), 0.9)
    for _ in range(max_iter):
        res = attempt(r)
        if better(res, best):
            best = res
        if res.within_tolerance:
            return res
        if res.macs > target_macs:
            lo = r
        else:
            hi = r
        r = (lo + hi) / 2
        if hi - lo < 1e-3:
            break
    # Global pruning can make MACs non-monotone in the ratio (a layer's last
    # group goes at once): scan a coarse grid before settling for the nearest.
    for r in [i / 20 for i in range(1, 19)]:
        res = attempt(r)
        if better(res, best):
            best = res
        if res.within_tolerance:
            return res
    assert best is not None
    return best


def apply_history(model: UNet2DModel, history: History) -> UNet2DModel:
    """Prune ``model`` in place by replaying a recorded pruning history."""
    if history:
        try:
            with torch.enable_grad():  # DepGraph traces through autograd, also when called under no_grad
                dg = tp.DependencyGraph().build_dependency(model, example_inputs(model))
            dg.load_pruning_history([(n, o, idx) for n, o, idx in history])
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
            raise StepadaptError(f"pruning history does not fit the base model: {e}") from None
    return fix_diffusers_attributes(model)


def replay(base_config: dict, history: History) -> UNet2DModel:
    """Rebuild a pruned expert's structure from the base config and its pruning history."""
    with torch.random.fork_rng(devices=[]):
        model = UNet2DModel.from_config(base_config).eval()
    return apply_history(model, history)
