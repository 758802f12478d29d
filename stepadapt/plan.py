"""The Plan: timestep groups and each group's MAC budget, as JSON.

Groups are contiguous intervals [lo, hi) covering [0, T) exactly once. Budgets
are fractions of the base model's MACs; the mean that matters is over the
timesteps a sampler actually visits (e.g. 50 DDIM steps), since that is what an
image costs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stepadapt import StepadaptError
from stepadapt.difficulty import snr_profile
from stepadapt.io import read_json, write_json
from stepadapt.kinds import DEFAULT, GAUSSIAN, KINDS, kind_of
from stepadapt.solvers import Solver

PLAN_FORMAT = "stepadapt-plan"
# 4: the Gaussian choice names its kind, form and rank, or why there is none; 3: the Gaussian choice is
# typed and names its fit; 2: groups have a kind
PLAN_VERSION = 4
MIN_RATIO = 0.05
TEXT_FLOOR = 0.4  # analyze's default --floor for a text-conditioned base (stepadapt.analyze.default_floor)


@dataclass
class Group:
    name: str
    lo: int
    hi: int
    snr_db: tuple[float, float]  # (at hi-1, at lo): low to high
    difficulty: float  # mean normalised difficulty over [lo, hi)
    visit_share: float  # fraction of the sampler's steps that land here
    macs_ratio: float  # budget as a fraction of the base MACs
    kind: str = DEFAULT  # a name in stepadapt.kinds.KINDS


@dataclass
class GaussianChoice:
    """Which Gaussian expert, where, and why; and the one fit every later stage uses: analyze fits
    it to the training images, judges where it starts on held-out ones, and saves it beside the
    plan (``weights``, relative to the plan's directory) so prune builds the bundle from that fit.

    ``rule`` "none" says why there is no Gaussian expert (``why``): a text-conditional base, or
    none that pays for these images."""

    rule: str  # "auto": from where its eps error is within ``tolerance`` of the base's; "given"; "none"
    start: int | None  # its first timestep (T: auto found none, and the plan has no Gaussian group)
    tolerance: float | None = None
    tolerance_from: int | None = None  # auto: where the tolerance held (the budget may start it later)
    eps_mse: dict[str, list[float]] = field(default_factory=dict)  # per t: [base, Gaussian] on held-out
    data: str = ""  # the data as given
    data_sha256: str = ""  # data.fingerprint of its training part (and labels), which the fit saw
    weights: str | None = None
    weights_sha256: str | None = None
    kind: str = GAUSSIAN.name  # the expert kind: gaussian or class-gaussian
    rank: int | None = None  # directions with their own variance; None: the full covariance
    classes: int = 0  # class-gaussian: one Gaussian per class, and the pooled one for the null class
    explained: float | None = None  # the training variance its rank keeps (the least of any class's)
    # auto on unconditional data: the eps error of each form on held-out images at timestep "t"
    compared: dict[str, float] = field(default_factory=dict)
    why: str = ""  # how its kind, form and rank were chosen; or, rule "none", why there is none

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianChoice:
        if "from" in d:  # plan version 2 kept the start as "from" and no fit
            d = {**{k: v for k, v in d.items() if k != "from"}, "start": d["from"]}
        try:
            choice = cls(**d)
        except TypeError as e:
            raise StepadaptError(f"malformed plan: gaussian: {e}") from None
        if choice.rule != "none" and choice.kind not in KINDS:
            raise StepadaptError(f"malformed plan: gaussian: unknown kind {choice.kind!r}")
        return choice

    def describe(self) -> str:
        """One line: kind, form and rank (what the table beside the plan shows)."""
        if self.rule == "none":
            return f"no Gaussian expert: {self.why}"
        form = "full covariance" if self.rank is None else f"rank {self.rank}"
        if self.explained is not None and self.rank is not None:
            form += f" ({self.explained:.0%} of the variance)"
        per = f", {self.classes} classes" if self.classes else ""
        return f"{kind_of(self.kind).label} expert, {form}{per}" + (f": {self.why}" if self.why else "")


@dataclass
class Plan:
    num_train_timesteps: int
    base_macs: int
    measure: str
    partition: str
    allocation: str  # "tdc" or "budget"
    sampler: str
    steps: int
    groups: list[Group]
    budget: float | None = None
    tdc_k: float | None = None
    profile: list[float] = field(default_factory=list)  # normalised difficulty per t
    damage: list[list[list[float]]] | None = None  # measure "damage": per group, [MACs ratio, damage] tried
    gaussian: GaussianChoice | None = None  # how the Gaussian expert's interval was chosen
    floor: float = MIN_RATIO  # budget: the smallest share of the base's MACs a U-Net group may get

    @property
    def boundaries(self) -> list[int]:
        return [g.lo for g in self.groups] + [self.groups[-1].hi]

    def fixed_ratios(self) -> dict[int, float]:
        """The groups whose size is not the allocator's to choose (the Gaussian's is set by the image)."""
        return {i: g.macs_ratio for i, g in enumerate(self.groups) if not kind_of(g.kind).sized_by_budget}

    def mean_ratio(self, ratios: list[float] | None = None) -> float:
        r = ratios if ratios is not None else [g.macs_ratio for g in self.groups]
        return float(sum(g.visit_share * x for g, x in zip(self.groups, r, strict=True)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise StepadaptError(f"not a stepadapt plan (format {d.get('format')!r})")
        if d.get("version") not in (1, 2, 3, PLAN_VERSION):
            raise StepadaptError(f"unsupported plan version {d.get('version')}")
        kinds = {g.get("kind", DEFAULT) for g in d.get("groups", []) if isinstance(g, dict)}
        if not kinds <= KINDS.keys():
            raise StepadaptError(f"plan has groups of unknown kind {sorted(kinds - KINDS.keys())}")
        body = {k: v for k, v in d.items() if k not in ("format", "version")}
        try:
            body["groups"] = [Group(**{**g, "snr_db": tuple(g["snr_db"])}) for g in body["groups"]]
            plan = cls(**body)
            if isinstance(plan.gaussian, dict):
                plan.gaussian = GaussianChoice.from_dict(plan.gaussian)
        except (TypeError, KeyError) as e:
            raise StepadaptError(f"malformed plan: {e}") from None
        check_coverage(plan.boundaries, plan.num_train_timesteps)
        if not isinstance(plan.floor, (int, float)) or not MIN_RATIO <= plan.floor <= 1:
            raise StepadaptError(f"malformed plan: floor must be in [{MIN_RATIO}, 1], got {plan.floor!r}")
        fixed = {g.kind for g in plan.groups if not kind_of(g.kind).sized_by_budget}
        if plan.gaussian is not None and fixed and fixed != {plan.gaussian.kind}:
            raise StepadaptError(
                f"malformed plan: its Gaussian group is a {', '.join(sorted(fixed))} expert, its fit a "
                f"{plan.gaussian.kind} one"
            )
        return plan

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        return cls.from_dict(read_json(path, "plan"))


def check_coverage(boundaries: list[int], T: int) -> None:
    """Groups must tile [0, T): start at 0, end at T, strictly increasing."""
    if not boundaries or boundaries[0] != 0 or boundaries[-1] != T:
        raise StepadaptError(f"groups must cover [0, {T}) exactly: boundaries {boundaries}")
    for a, b in zip(boundaries, boundaries[1:], strict=False):
        if a >= b:
            raise StepadaptError(f"groups overlap or are empty at boundary {a} -> {b}")


def _uniform(n: int, difficulty: np.ndarray, snr_db: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Equal widths in t."""
    return np.linspace(0, len(difficulty), n + 1)


def _snr(n: int, difficulty: np.ndarray, snr_db: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Equal widths in SNR-dB (which falls monotonically with t), within the visited span."""
    T = len(difficulty)
    first, last = span
    levels = np.linspace(snr_db[first], snr_db[min(last, T - 1)], n + 1)[1:-1]
    return np.concatenate([[0], [np.searchsorted(-snr_db, -lv) for lv in levels], [T]])


def _mass(n: int, difficulty: np.ndarray, snr_db: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Equal shares of the summed difficulty."""
    cum = np.concatenate([[0.0], np.cumsum(difficulty)])
    targets = np.linspace(0, cum[-1], n + 1)[1:-1]
    return np.concatenate([[0], np.searchsorted(cum, targets), [len(difficulty)]])


# How the timesteps are cut into groups: name -> cuts(n, difficulty, snr_db, visited span).
PARTITIONS = {"uniform": _uniform, "snr": _snr, "mass": _mass}


def partition(
    kind: str, n: int, difficulty: np.ndarray, snr_db: np.ndarray, span: tuple[int, int] | None = None
) -> list[int]:
    """Boundaries [0, b1, ..., T] for ``n`` groups.

    ``span``: the first and last timestep the sampler visits. ``snr`` cuts equal SNR-dB widths within
    it: a cosine schedule's last few steps fall to -86 dB, and cutting the whole range evenly would
    spend groups on steps no sampler takes.
    """
    T = len(difficulty)
    if not 1 <= n <= T:
        raise StepadaptError(f"number of groups must be in [1, {T}], got {n}")
    if kind not in PARTITIONS:
        raise StepadaptError(f"unknown partition {kind!r}; choose one of {', '.join(PARTITIONS)}")
    cuts = PARTITIONS[kind](n, difficulty, snr_db, span if span is not None else (0, T - 1))
    b = [int(round(c)) for c in cuts]
    for i in range(1, len(b)):  # keep every group non-empty
        b[i] = max(b[i], b[i - 1] + 1)
    for i in range(len(b) - 2, -1, -1):
        b[i] = min(b[i], b[i + 1] - 1)
    check_coverage(b, T)
    return b


def visited_timesteps(sampler: str | Solver, steps: int, scheduler_cfg: dict) -> np.ndarray:
    """Where the model runs for ``steps`` steps of ``sampler``: one entry per model evaluation (Heun
    lists its corrector's timesteps too, PNDM its warm-up), fractional where the solver is so."""
    t = Solver.parse(sampler).evaluations(steps, scheduler_cfg).double().numpy()
    return t.astype(int) if np.all(t == np.round(t)) else t


def tdc_ratios(difficulties: list[float], k: float) -> list[float]:
    """TDC rule: the i-th easiest of N groups gets (i/N + (N-i)/N * k) of the base FLOPs."""
    n = len(difficulties)
    order = np.argsort(difficulties, kind="stable")  # easiest first
    r = [0.0] * n
    for rank, g in enumerate(order, start=1):
        r[g] = rank / n + (n - rank) / n * k
    return r


def budget_ratios(
    difficulties: list[float],
    shares: list[float],
    budget: float,
    fixed: dict[int, float] | None = None,
    saturate: bool = False,
    floor: float = MIN_RATIO,
) -> list[float]:
    """Ratios proportional to difficulty with a visit-weighted mean of ``budget``.

    ``fixed`` pins some groups (already pruned, with their achieved ratio); the
    rest are solved for, so the staircase of reachable widths in one group is
    paid back by the others. ``saturate``: where the pinned groups leave the
    rest no way to meet the budget, give them the nearest ratios that do
    (all at the floor, or all at the base) instead of refusing. ``floor``: no free group gets less
    (a text base decides what to draw at the noisy end, which the SNR profile ranks easiest).
    """
    fixed = fixed or {}
    d, w = np.asarray(difficulties), np.asarray(shares)
    free = [i for i in range(len(d)) if i not in fixed]
    need = budget - sum(w[i] * fixed[i] for i in fixed)

    def mean_at(c: float) -> float:
        return float(sum(w[i] * np.clip(c * d[i], floor, 1.0) for i in free))

    if not free:
        return [fixed[i] for i in range(len(d))]
    lo, hi = 0.0, 1.0 / max(d[free].min(), 1e-9)
    reach = (mean_at(lo), mean_at(hi))
    if reach[1] < need - 1e-9 or reach[0] > need + 1e-9:
        if not saturate:
            raise StepadaptError(
                f"budget {budget:.3f} is not reachable (free groups span {reach[0]:.3f}..{reach[1]:.3f})"
            )
        c = hi if reach[1] < need else lo
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_at(mid) < need else (lo, mid)
        c = (lo + hi) / 2
    return [fixed[i] if i in fixed else float(np.clip(c * d[i], floor, 1.0)) for i in range(len(d))]


def make_plan(
    difficulty: np.ndarray,
    snr_db: np.ndarray,
    base_macs: int,
    *,
    groups: int = 4,
    partition_kind: str = "snr",
    boundaries: list[int] | None = None,
    budget: float | None = 0.5,
    tdc_k: float = 0.5,
    sampler: str = "ddim",
    steps: int = 50,
    measure: str = "snr",
    scheduler_cfg: dict | None = None,
    gaussian_from: int | None = None,
    gaussian_macs: int = 0,
    gaussian_kind: str = GAUSSIAN.name,
    floor: float = MIN_RATIO,
) -> Plan:
    """Group the timesteps and give each group its MAC budget.

    ``budget=None`` uses the TDC rule with ``tdc_k``; otherwise ``budget`` is the
    target mean MACs per visited step as a fraction of the base.

    ``gaussian_from``: the closed-form Gaussian denoiser (``gaussian_macs`` per
    image, of ``gaussian_kind``) takes [gaussian_from, T) as the last group; the other
    ``groups - 1`` groups partition [0, gaussian_from) and share what is left of the budget.
    ``floor``: the smallest ratio the budget gives a U-Net group.
    """
    T = len(difficulty)
    visits = visited_timesteps(sampler, steps, scheduler_cfg or {})
    span = int(visits.min()), int(visits.max())
    if gaussian_from is not None and not 0 < gaussian_from < T:
        raise StepadaptError(f"the Gaussian expert must start inside (0, {T}), got {gaussian_from}")
    if boundaries is not None:
        b = [int(v) for v in boundaries]
        check_coverage(b, T)
        if gaussian_from is not None:  # the Gaussian group replaces every group above its start
            b = [v for v in b if v < gaussian_from] + [gaussian_from, T]
        partition_kind = "explicit"
    elif gaussian_from is not None:
        if groups < 2:
            raise StepadaptError("a plan with a Gaussian expert needs at least 2 groups (U-Net + Gaussian)")
        cut = gaussian_from
        inside = (min(span[0], cut - 1), min(span[1], cut - 1))
        b = partition(partition_kind, groups - 1, difficulty[:cut], snr_db[:cut], inside) + [T]
    else:
        b = partition(partition_kind, groups, difficulty, snr_db, span)
    kinds = [DEFAULT] * (len(b) - 1)
    if gaussian_from is not None:
        if kind_of(gaussian_kind).sized_by_budget:
            raise StepadaptError(f"{gaussian_kind!r} is not a closed-form expert kind")
        kinds[-1] = gaussian_kind
    shares = [float(np.mean((visits >= lo) & (visits < hi))) for lo, hi in zip(b, b[1:], strict=False)]
    diffs = [float(difficulty[lo:hi].mean()) for lo, hi in zip(b, b[1:], strict=False)]
    fixed = {i: gaussian_macs / base_macs for i, k in enumerate(kinds) if not kind_of(k).sized_by_budget}
    if budget is None and floor != MIN_RATIO:
        raise StepadaptError("--floor bounds what --budget gives each group; the TDC rule has no budget")
    if budget is None:  # the TDC rule ranks the U-Net groups among themselves
        unet = [i for i in range(len(kinds)) if i not in fixed]
        ranked = dict(zip(unet, tdc_ratios([diffs[i] for i in unet], tdc_k), strict=True))
        ratios, allocation = [fixed.get(i, ranked.get(i, 0.0)) for i in range(len(kinds))], "tdc"
    else:
        if not MIN_RATIO <= budget <= 1.0:
            raise StepadaptError(f"budget must be in [{MIN_RATIO}, 1], got {budget}")
        if not MIN_RATIO <= floor <= budget:
            raise StepadaptError(f"floor must be in [{MIN_RATIO}, budget {budget}], got {floor}")
        try:
            ratios, allocation = budget_ratios(diffs, shares, budget, fixed=fixed, floor=floor), "budget"
        except StepadaptError as e:
            if not fixed:
                raise
            raise StepadaptError(
                f"{e}: the Gaussian expert on [{gaussian_from}, {T}) serves "
                f"{sum(shares[i] for i in fixed):.0%} of the steps at its own small cost; lower the budget, "
                "start it later (--gaussian T) or turn it off (--gaussian off)"
            ) from None
    gs = [
        Group(
            name=f"g{i}",
            lo=lo,
            hi=hi,
            snr_db=(round(float(snr_db[hi - 1]), 2), round(float(snr_db[lo]), 2)),
            difficulty=round(diffs[i], 4),
            visit_share=shares[i],
            macs_ratio=round(ratios[i], 4),
            kind=kinds[i],
        )
        for i, (lo, hi) in enumerate(zip(b, b[1:], strict=False))
    ]
    return Plan(
        num_train_timesteps=T,
        base_macs=int(base_macs),
        measure=measure,
        partition=partition_kind,
        allocation=allocation,
        sampler=sampler,
        steps=steps,
        groups=gs,
        budget=budget,
        tdc_k=tdc_k if budget is None else None,
        floor=floor,
        profile=[round(float(v), 5) for v in difficulty],
    )


def uniform_plan(plan: Plan, scheduler_cfg: dict) -> Plan:
    """One group over all of [0, T) at ``plan``'s trajectory-mean MACs: the baseline
    every step-adaptive claim is measured against (Diff-Pruning style)."""
    T = plan.num_train_timesteps
    return make_plan(
        np.ones(T), snr_profile(scheduler_cfg), plan.base_macs, boundaries=[0, T], budget=plan.mean_ratio(),
        sampler=plan.sampler, steps=plan.steps, measure="uniform", scheduler_cfg=scheduler_cfg,
    )  # fmt: skip
