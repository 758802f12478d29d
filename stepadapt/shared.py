"""Weight-shared experts: every pruned expert is a slice of one full-width network.

Fine-tuning each expert alone splits the update budget (an expert sees only its
share of the iterations). Here every expert's parameters are *views* of the
base's tensors, gathered along the channels its pruning history kept, so one
optimiser step on a batch whose timesteps spread over all groups updates every
expert at once, and channels kept by several experts learn from all of their
timesteps (DDSM's slimmable network and ALTER's jointly trained masks, on
physical sub-networks). Afterwards each expert is cut out again as the separate
pruned model the bundle, ONNX and Triton already know.

The slice of a parameter is found without reading torch-pruning's internals:
a copy of the base whose tensors hold their own index along one dimension is
pruned by replaying the history, and the surviving values *are* the kept
indices. Pruning only ever selects slices, so this holds for every layer kind
it handles.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from stepadapt import StepadaptError
from stepadapt.prune import History, apply_history, replay

Slices = dict[str, tuple[torch.Tensor | None, ...]]  # parameter -> kept indices per dim (None: all)


def _kept_along(model: UNet2DModel, history: History, dim: int) -> dict[str, torch.Tensor]:
    enc = copy.deepcopy(model).cpu().float().eval()  # float32 holds indices exactly up to 2**24
    with torch.no_grad():
        for p in enc.parameters():
            if p.ndim > dim:
                shape = [1] * p.ndim
                shape[dim] = p.shape[dim]
                p.copy_(torch.arange(p.shape[dim], dtype=torch.float64).view(shape).expand_as(p))
    apply_history(enc, history)
    return {
        name: p.detach().movedim(dim, 0).reshape(p.shape[dim], -1)[:, 0].round().long()
        for name, p in enc.named_parameters()
        if p.ndim > dim
    }


def slice_map(base: UNet2DModel, history: History) -> Slices:
    """Which indices of each base tensor the pruned expert keeps, per dimension.

    Channel pruning touches at most the first two dimensions (out, in) of a
    weight; kernels are never cut.
    """
    full = dict(base.named_parameters())
    per_dim = [_kept_along(base, history, d) for d in (0, 1)]
    out: Slices = {}
    for name, p in full.items():
        idx = []
        for d in range(min(p.ndim, 2)):
            kept = per_dim[d][name]
            idx.append(None if len(kept) == p.shape[d] else kept)
        out[name] = tuple(idx)
    return out


def gather(tensor: torch.Tensor, idx: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """The expert's slice of a base tensor; differentiable, so gradients land in the base."""
    for d, kept in enumerate(idx):
        if kept is not None:
            tensor = tensor.index_select(d, kept.to(tensor.device))
    return tensor


class SharedExperts(torch.nn.Module):
    """A full-width base whose pruned slices are the experts, routed by timestep.

    Only the base's parameters are trainable state (``state_dict`` holds just
    them); the experts' skeletons carry structure. ``forward(x, t)`` returns a
    ``UNet2DOutput`` like the base, so the one training loop trains it as it
    trains any U-Net.
    """

    def __init__(self, base: UNet2DModel, boundaries: Sequence[int], histories: Sequence[History]):
        super().__init__()
        if len(boundaries) != len(histories) + 1:
            raise StepadaptError(f"{len(histories)} experts need {len(histories) + 1} boundaries")
        self.base = base
        self.boundaries = torch.tensor([int(b) for b in boundaries])
        cfg = dict(base.config)
        # Skeletons are kept out of the module tree: their own tensors are never used.
        self._skeletons = [replay(cfg, list(h)) for h in histories]
        self._slices = [slice_map(base, list(h)) for h in histories]

    @property
    def config(self):
        return self.base.config

    @property
    def num_experts(self) -> int:
        return len(self._skeletons)

    def expert_index(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = int(self.boundaries[0]), int(self.boundaries[-1])
        if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
            raise StepadaptError(f"timesteps outside [{lo}, {hi}): no expert covers them")
        return torch.bucketize(t.cpu(), self.boundaries[1:-1], right=True)

    def expert_parameters(self, i: int) -> dict[str, torch.Tensor]:
        return {n: gather(p, self._slices[i][n]) for n, p in self.base.named_parameters()}

    def forward_expert(self, i: int, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        skeleton = self._skeletons[i].to(x.device).train(self.training)  # dropout as in the base
        return torch.func.functional_call(skeleton, self.expert_parameters(i), (x, t), cond).sample

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> UNet2DOutput:
        """``cond``: the rows' condition as keyword inputs (class labels), as a diffusers U-Net."""
        owner = self.expert_index(t)
        out = None  # allocated in the experts' dtype (bf16/fp16 under autocast), not x's
        for i in owner.unique().tolist():
            sel = (owner == i).to(x.device)
            y = self.forward_expert(i, x[sel], t[sel], **{k: v[sel] for k, v in cond.items()})
            if out is None:
                out = x.new_empty(x.shape, dtype=y.dtype)
            out = out.index_put((sel,), y.to(out.dtype))
        return UNet2DOutput(sample=torch.empty_like(x) if out is None else out)

    def export(self, i: int) -> UNet2DModel:
        """Expert ``i`` as a stand-alone pruned model (a copy; later training does not move it)."""
        model = copy.deepcopy(self._skeletons[i]).cpu()
        with torch.no_grad():
            params = self.expert_parameters(i)
            for name, p in model.named_parameters():
                p.copy_(params[name].detach().cpu())
        return model.eval()
