"""Timestep samplers for training: ``sample(batch, generator) -> (t, weight)``.

Every sampler draws only from its interval [lo, hi), so the same training loop
trains the base (the whole range) and each expert (its own group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepadapt import StepadaptError


@dataclass
class UniformSampler:
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi:
            raise StepadaptError(f"empty or negative timestep interval [{self.lo}, {self.hi})")

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(self.lo, self.hi, (batch,), generator=generator)
        return t, torch.ones(batch)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
