"""Structural pruning of a diffusers U-Net to a MAC budget with torch-pruning's DepGraph.

Widths can only move in steps of C / num_groups (GroupNorm keeps its group
count), so the MAC curve over the pruning ratio is a staircase: we search the
ratio until the MACs land within the tolerance or on the nearest reachable step.

Conditional U-Nets (class embeddings, cross-attention over text) prune the same way, traced with their
condition; attention keeps its heads and loses the same head dims in each, and the widths the condition
fixes (the text embedding's, the number of classes) are never pruned.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D

from stepadapt import StepadaptError
from stepadapt.conditioning import conditioning_of
from stepadapt.devices import device_of
from stepadapt.models import UNET_CLASSES

History = list[list]  # torch-pruning's pruning history: [module name, is_out, idxs], JSON-able
UNet = UNet2DModel | UNet2DConditionModel


def example_inputs(model: UNet) -> tuple | dict[str, torch.Tensor]:
    """One image's inputs, with the condition the model takes: DepGraph traces them and the MACs
    counted include the class embedding and the cross-attention's key/value projections of the text."""
    c, s, device = model.config.in_channels, model.config.sample_size, device_of(model)
    x, t = torch.randn(1, c, s, s, device=device), torch.tensor([1], device=device)
    cond = conditioning_of(model.config)
    if cond.unconditional:
        return x, t
    extra = cond.examples(1, torch.Generator().manual_seed(0))  # not the global RNG: x already draws
    return {"sample": x, "timestep": t, **{k: v.to(device) for k, v in extra.items()}}


def count_macs(model: torch.nn.Module, inputs: tuple | dict | None = None) -> tuple[int, int]:
    """(MACs, params) for one image, counted by torch-pruning (module MACs: the attention products
    inside ``scaled_dot_product_attention`` are not counted, for any model alike)."""
    # Keyword inputs make torch-pruning print a batch-size warning per call; the batch is 1 here.
    with contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(model, inputs or example_inputs(model))
    return int(macs), int(params)


def attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """q/k/v projections -> head count, self- and cross-attention alike: torch-pruning then removes
    the same head dims from every head, so heads x head_dim stays a product across q, k, v and out."""
    heads = {}
    for m in model.modules():
        if isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v):
                if lin is not None:
                    heads[lin] = m.heads
    return heads


def channel_groups(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """Output-channel groups besides the heads: a GEGLU projection is [hidden | gate], chunked in two
    and multiplied, so unit i of each half goes together. Without the grouping torch-pruning ranks
    all 2 x inner outputs as one and the chunk coupling then removes nearly twice the ratio."""
    return {m.proj: 2 for m in model.modules() if isinstance(m, GEGLU)}


def condition_widths(model: torch.nn.Module) -> dict[str, int]:
    """The widths the condition fixes, which pruning must leave alone: a cross-attention's key/value
    input (the text encoder's embedding width) and a class embedding's number of classes."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            for proj in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
                if getattr(m, proj, None) is not None:
                    widths[f"{name}.{proj}"] = getattr(m, proj).in_features
        elif isinstance(m, torch.nn.Embedding):
            widths[name] = m.num_embeddings
    return widths


def _kept_fixed(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers whose outputs pruning must not narrow: the output conv (the image's channels) and a
    projection of the text embeddings (its output is every cross-attention's key/value input)."""
    return [model.conv_out] + [m for m in (getattr(model, "encoder_hid_proj", None),) if m is not None]


def _fix_attention(m: Attention) -> None:
    """Set what diffusers' processors and helpers read of an Attention from its pruned layers.
    ``AttnProcessor2_0`` takes the head dim from the key's width and ``heads``; ``AttnProcessor``
    scales by ``scale``, which follows the pruned head dim so both processors compute the same."""
    inner, kv = m.to_q.out_features, m.to_k.out_features if m.to_k is not None else m.to_q.out_features
    if inner % m.heads or kv != inner:  # the processors view q and k as heads x (key width / heads)
        raise StepadaptError(
            f"pruning left {m.heads} heads of q width {inner}, k width {kv}: not heads x head dim"
        )
    m.inner_dim, m.query_dim = inner, m.to_q.in_features
    m.inner_kv_dim = kv
    m.cross_attention_dim = m.to_k.in_features if m.to_k is not None else m.query_dim
    if m.to_out is not None:
        m.out_dim = m.to_out[0].out_features
    add_out = getattr(m, "to_add_out", None)
    m.out_context_dim = add_out.out_features if add_out is not None else m.query_dim
    if m.scale_qk:
        m.scale = (inner // m.heads) ** -0.5


def fix_diffusers_attributes(model: torch.nn.Module) -> torch.nn.Module:
    """Update the static channel counts diffusers asserts on, or reads, in forward()."""
    for m in model.modules():
        if isinstance(m, Downsample2D) and m.conv is not None and hasattr(m.conv, "in_channels"):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Upsample2D) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Attention):
            _fix_attention(m)
        elif isinstance(m, Transformer2DModel) and m.is_input_continuous:
            m.in_channels = m.norm.num_channels
            m.inner_dim = m.proj_in.weight.shape[0]
            m.out_channels = m.proj_out.weight.shape[0]
    return model


def _check_condition_widths(before: dict[str, int], model: torch.nn.Module) -> None:
    after = condition_widths(model)
    changed = [f"{k} {v} -> {after.get(k)}" for k, v in before.items() if after.get(k) != v]
    if changed:
        raise StepadaptError(f"pruning changed widths the condition fixes: {', '.join(changed)}")


def prune_once(
    base: UNet,
    ratio: float,
    importance: tp.importance.Importance,
    *,
    global_pruning: bool = False,
    grads: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[UNet, History]:
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
        ignored_layers=_kept_fixed(model),
        num_heads=attention_heads(model),
        out_channel_groups=channel_groups(model),
        prune_head_dims=True,
        prune_num_heads=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # RandomImportance draws from the global CPU RNG
        pruner.step()
    fix_diffusers_attributes(model)
    _check_condition_widths(condition_widths(base), model)
    model.zero_grad(set_to_none=True)
    history = [[n, bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
    return model, history


@dataclass
class PruneResult:
    model: UNet
    ratio: float
    macs: int
    params: int
    history: History
    within_tolerance: bool


def prune_to_macs(
    base: UNet,
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


def apply_history(model: UNet, history: History) -> UNet:
    """Prune ``model`` in place by replaying a recorded pruning history."""
    if history:
        try:
            with torch.enable_grad():  # DepGraph traces through autograd, also when called under no_grad
                dg = tp.DependencyGraph().build_dependency(model, example_inputs(model))
            dg.load_pruning_history([(n, o, idx) for n, o, idx in history])
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
            raise StepadaptError(f"pruning history does not fit the base model: {e}") from None
    return fix_diffusers_attributes(model)


def unet_class(config: dict) -> type[UNet]:
    """The diffusers class a base config builds. A clean config (:func:`stepadapt.models.clean_config`)
    has no ``_class_name``; only ``UNet2DConditionModel`` takes ``cross_attention_dim``."""
    name = config.get("_class_name") or (
        "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel"
    )
    if name not in UNET_CLASSES:
        raise StepadaptError(f"base config is a {name}, not one of {', '.join(UNET_CLASSES)}")
    return UNET_CLASSES[name]


def replay(base_config: dict, history: History) -> UNet:
    """Rebuild a pruned expert's structure from the base config and its pruning history."""
    with torch.random.fork_rng(devices=[]):
        model = unet_class(base_config).from_config(base_config).eval()
    return apply_history(model, history)
