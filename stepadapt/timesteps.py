"""Timestep samplers for training, behind one interface.

``sample(batch, generator) -> (t, weight)`` draws timesteps from the sampler's
interval [lo, hi) only, so the same loop trains the base (the whole range) and
each expert (its own group). ``weight`` multiplies the per-sample loss: it is
all ones unless a sampler claims an unbiased objective (``loss-moment``).

After each optimizer step the loop calls ``update(t, losses, probe_before,
probe_after)`` with the unweighted per-sample losses of the batch. A sampler
that wants to see what the update did (``adaptive``) names ``probes(generator)``
timesteps; the loop measures the loss there before and after the step with the
same images and the same noise, so the difference is the update's effect and
not sampling noise.

Every draw uses the caller's ``torch.Generator`` and every piece of state is a
tensor or a number in ``state_dict()``, so a resumed run continues bit-for-bit.

The samplers are registered by name (``TIMESTEP_SAMPLERS``, ``sampler_class``);
each class says what it needs from a training run (``options``,
``needs_visits``, ``needs_probes``), so the caller builds and drives any of them
without asking which one it has.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stepadapt import StepadaptError


class TimestepSampler:
    """Uniform over [lo, hi): the reference every other sampler is compared with."""

    name = "uniform"
    options: tuple[str, ...] = ()  # training options (TrainConfig fields) it takes, by the same name
    needs_visits = False  # its support is the timesteps a DDIM schedule of ``visit_steps`` steps visits
    needs_probes = False  # it learns from probe losses measured before and after each update

    def __init__(self, lo: int, hi: int) -> None:
        if not 0 <= lo < hi:
            raise StepadaptError(f"empty or negative timestep interval [{lo}, {hi})")
        self.lo, self.hi = int(lo), int(hi)

    @property
    def n(self) -> int:
        return self.hi - self.lo

    def probabilities(self) -> torch.Tensor:
        """p(t) over lo..hi-1 as the sampler would draw now (for plots and tests)."""
        return torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(self.lo, self.hi, (batch,), generator=generator)
        return t, torch.ones(batch)

    def probes(self, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def update(
        self,
        t: torch.Tensor,
        losses: torch.Tensor,
        probe_before: torch.Tensor | None = None,
        probe_after: torch.Tensor | None = None,
    ) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CurriculumSampler(TimestepSampler):
    """Easy-to-hard curriculum (Kim et al. 2024, arXiv 2403.10348).

    The interval is cut into ``clusters`` contiguous pieces; for an epsilon
    predictor the noisiest (highest t) is the easiest, so stage s draws
    uniformly from the s highest clusters. The stage advances when the smoothed
    batch loss has not improved for ``patience`` updates; the last stage is
    plain uniform. Adding a cluster changes what the loss measures, so the
    plateau detector restarts at each stage.
    """

    name = "curriculum"
    options = ("clusters", "patience")

    def __init__(self, lo: int, hi: int, clusters: int = 20, patience: int = 200, smoothing: float = 0.9):
        super().__init__(lo, hi)
        if clusters < 1 or patience < 1:
            raise StepadaptError("curriculum needs at least one cluster and a patience of at least 1")
        self.clusters = min(int(clusters), self.n)
        self.patience = int(patience)
        self.smoothing = float(smoothing)
        # edges[i] is the lower end of the i-th easiest cluster; edges[0] is the top cluster
        cuts = torch.linspace(self.lo, self.hi, self.clusters + 1).round().long()
        self.edges = cuts[:-1].flip(0)
        self.stage = 1
        self._smooth = math.nan
        self._best = math.inf
        self._since = 0

    def range(self) -> tuple[int, int]:
        return int(self.edges[self.stage - 1]), self.hi

    def probabilities(self) -> torch.Tensor:
        a, _ = self.range()
        p = torch.zeros(self.n, dtype=torch.float64)
        p[a - self.lo :] = 1.0 / (self.hi - a)
        return p

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.range()
        return torch.randint(a, b, (batch,), generator=generator), torch.ones(batch)

    def update(self, t, losses, probe_before=None, probe_after=None) -> None:
        v = float(losses.float().mean())
        s = self.smoothing
        self._smooth = v if math.isnan(self._smooth) else s * self._smooth + (1 - s) * v
        if self._smooth < self._best:
            self._best, self._since = self._smooth, 0
        else:
            self._since += 1
        if self._since >= self.patience and self.stage < self.clusters:
            self.stage += 1
            self._smooth, self._best, self._since = math.nan, math.inf, 0

    def state_dict(self) -> dict:
        return {"stage": self.stage, "smooth": self._smooth, "best": self._best, "since": self._since}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self._smooth, self._best = float(state["smooth"]), float(state["best"])
        self._since = int(state["since"])


class LossMomentSampler(TimestepSampler):
    """Importance sampling from improved DDPM (Nichol & Dhariwal 2021).

    p_t is proportional to sqrt(E[L_t^2]) over the last ``history`` losses seen
    at t, mixed with a little uniform mass; each draw is weighted 1/(N p_t), so
    E_p[w L] equals the uniform mean of L: the objective is unchanged, only its
    variance drops. Until every t has a full history it samples uniformly.
    """

    name = "loss-moment"

    def __init__(self, lo: int, hi: int, history: int = 10, uniform_mix: float = 0.001):
        super().__init__(lo, hi)
        if history < 1 or not 0.0 <= uniform_mix <= 1.0:
            raise StepadaptError("loss-moment needs history >= 1 and a uniform mix in [0, 1]")
        self.history = int(history)
        self.uniform_mix = float(uniform_mix)
        self._losses = torch.zeros(self.n, self.history, dtype=torch.float64)
        self._count = torch.zeros(self.n, dtype=torch.long)

    def warm(self) -> bool:
        return bool((self._count >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warm():
            return super().probabilities()
        p = self._losses.pow(2).mean(dim=1).sqrt()
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1.0 / self.n)
        return p * (1 - self.uniform_mix) + self.uniform_mix / self.n

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.warm():
            return super().sample(batch, generator)
        p = self.probabilities()
        idx = torch.multinomial(p, batch, replacement=True, generator=generator)
        return idx + self.lo, (1.0 / (self.n * p[idx])).float()

    def update(self, t, losses, probe_before=None, probe_after=None) -> None:
        for ti, li in zip((t - self.lo).tolist(), losses.double().tolist(), strict=True):
            k = int(self._count[ti])
            self._losses[ti, k % self.history] = li
            self._count[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": self._losses.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._losses.copy_(state["losses"])
        self._count.copy_(state["count"])


class AdaptiveSampler(TimestepSampler):
    """A learned timestep policy (after Kim et al. 2024, arXiv 2411.09998).

    The policy is a Beta(a, b) density over the interval, discretised on its
    timesteps and mixed with ``explore`` uniform mass so no timestep starves.
    It is trained by REINFORCE: the reward of an update is how much it lowered
    the loss at a few probe timesteps (same images, same noise before and
    after). Every ``reselect_every`` updates the loop measures all
    ``candidates`` evenly spaced timesteps instead; from the last records the
    ``probes`` candidates whose loss changes best explain the mean change over
    all candidates are chosen by greedy least squares, and their regression
    coefficients weigh the reward, so a few probes stand in for the whole loss.
    """

    name = "adaptive"
    needs_probes = True

    def __init__(
        self,
        lo: int,
        hi: int,
        lr: float = 0.05,
        explore: float = 0.1,
        candidates: int = 16,
        probes: int = 4,
        reselect_every: int = 40,
        records: int = 8,
        entropy: float = 0.01,
    ):
        super().__init__(lo, hi)
        self.explore = float(explore)
        self.entropy = float(entropy)
        self.reselect_every = int(reselect_every)
        self.n_probes = min(int(probes), int(candidates), self.n)
        k = min(int(candidates), self.n)
        self.candidates = torch.linspace(self.lo, self.hi - 1, k).round().long().unique()
        self.theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # log a, log b: uniform
        self._opt = torch.optim.Adam([self.theta], lr=lr)
        self._records = torch.zeros(0, len(self.candidates), dtype=torch.float64)
        self.max_records = int(records)
        self.selected = torch.linspace(0, len(self.candidates) - 1, self.n_probes).round().long()
        self.coef = torch.full((self.n_probes,), 1.0 / self.n_probes, dtype=torch.float64)
        self._step = 0
        self._baseline = 0.0
        self._scale = 0.0

    def _log_probs(self) -> torch.Tensor:
        a, b = self.theta.clamp(-3.0, 4.0).exp()
        u = (torch.arange(self.n, dtype=torch.float64) + 0.5) / self.n
        logpdf = (a - 1) * u.log() + (b - 1) * (1 - u).log()
        p = torch.softmax(logpdf, 0) * (1 - self.explore) + self.explore / self.n
        return p.log()

    def probabilities(self) -> torch.Tensor:
        with torch.no_grad():
            return self._log_probs().exp()

    def mean_timestep(self) -> float:
        p = self.probabilities()
        return float((p * torch.arange(self.lo, self.hi, dtype=torch.float64)).sum())

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.multinomial(self.probabilities(), batch, replacement=True, generator=generator)
        return idx + self.lo, torch.ones(batch)

    def _full_probe(self) -> bool:
        """This update measures every candidate (the records the probe selection learns from)."""
        return self._step % self.reselect_every == 0

    def probes(self, generator: torch.Generator) -> torch.Tensor:
        return self.candidates.clone() if self._full_probe() else self.candidates[self.selected]

    def _reselect(self) -> None:
        """Greedy forward selection: which probes' loss changes predict the mean change best."""
        X, y = self._records, self._records.mean(dim=1)
        if len(X) < self.n_probes:
            return
        chosen: list[int] = []
        for _ in range(self.n_probes):
            best, best_err = None, math.inf
            for j in range(X.shape[1]):
                if j in chosen:
                    continue
                cols = X[:, chosen + [j]]
                sol = torch.linalg.lstsq(cols, y.unsqueeze(1)).solution
                err = float((cols @ sol - y.unsqueeze(1)).pow(2).sum())
                if err < best_err:
                    best, best_err = j, err
            chosen.append(best)
        sel = torch.tensor(sorted(chosen))
        self.selected = sel
        self.coef = torch.linalg.lstsq(X[:, sel], y.unsqueeze(1)).solution.squeeze(1)

    def update(self, t, losses, probe_before=None, probe_after=None) -> None:
        if probe_before is None or probe_after is None:
            raise StepadaptError("the adaptive sampler needs probe losses before and after each update")
        decrease = (probe_before - probe_after).double()
        if self._full_probe():
            self._records = torch.cat([self._records, decrease.unsqueeze(0)])[-self.max_records :]
            self._reselect()
            reward = float(decrease.mean())
        else:
            reward = float((self.coef * decrease).sum())
        self._step += 1
        # advantage: reward against a running baseline, scaled by its running spread
        adv = reward - self._baseline
        self._baseline = 0.9 * self._baseline + 0.1 * reward
        self._scale = 0.9 * self._scale + 0.1 * adv * adv
        adv = adv / (math.sqrt(self._scale) + 1e-12)
        logp = self._log_probs()
        objective = adv * logp[t - self.lo].mean() - self.entropy * (logp.exp() * logp).sum()
        self._opt.zero_grad()
        (-objective).backward()
        self._opt.step()

    def state_dict(self) -> dict:
        return {
            "theta": self.theta.detach().clone(),
            "optimizer": self._opt.state_dict(),
            "records": self._records.clone(),
            "selected": self.selected.clone(),
            "coef": self.coef.clone(),
            "step": self._step,
            "baseline": self._baseline,
            "scale": self._scale,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self._opt.load_state_dict(state["optimizer"])
        self._records = state["records"].clone()
        self.selected, self.coef = state["selected"].clone(), state["coef"].clone()
        self._step = int(state["step"])
        self._baseline, self._scale = float(state["baseline"]), float(state["scale"])


class VisitedSampler(TimestepSampler):
    """Uniform over the timesteps a fixed sampler schedule visits inside [lo, hi).

    When the serving step count is fixed (say 25 DDIM steps), an expert only
    ever sees those few timesteps; training on them alone spends every update
    where it counts. The expert is then untrained in between: serve it at that
    step count (or one whose timesteps are a subset, e.g. 25 of 50 "leading").
    """

    name = "visited"
    needs_visits = True

    def __init__(self, lo: int, hi: int, timesteps: torch.Tensor | list[int] | None = None):
        super().__init__(lo, hi)
        if timesteps is None:
            raise StepadaptError("the visited sampler needs the timesteps its schedule visits")
        t = torch.as_tensor(timesteps, dtype=torch.long).unique()
        self.support = t[(t >= self.lo) & (t < self.hi)]
        if len(self.support) == 0:
            raise StepadaptError(f"no visited timestep falls in [{lo}, {hi}): nothing to train on")

    def probabilities(self) -> torch.Tensor:
        p = torch.zeros(self.n, dtype=torch.float64)
        p[self.support - self.lo] = 1.0 / len(self.support)
        return p

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(len(self.support), (batch,), generator=generator)
        return self.support[i], torch.ones(batch)


TIMESTEP_SAMPLER_KINDS: dict[str, type[TimestepSampler]] = {
    c.name: c
    for c in (TimestepSampler, CurriculumSampler, AdaptiveSampler, LossMomentSampler, VisitedSampler)
}
TIMESTEP_SAMPLERS = tuple(TIMESTEP_SAMPLER_KINDS)  # the names, for help texts and validation


def sampler_class(name: str) -> type[TimestepSampler]:
    """The registry entry, so callers ask it (``.needs_probes``, ``.options``) instead of comparing names."""
    if name not in TIMESTEP_SAMPLER_KINDS:
        raise StepadaptError(
            f"unknown timestep sampler {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}"
        )
    return TIMESTEP_SAMPLER_KINDS[name]


def make_sampler(name: str, lo: int, hi: int, **options: Any) -> TimestepSampler:
    return sampler_class(name)(lo, hi, **options)
