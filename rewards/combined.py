"""Several rewards as one: a weighted sum of components, each optionally whitened and clipped.

For components c with raw scores r_c (each computed through ``call_reward``, so a failing
component raises a ``RewardError`` naming it):

    z_c   = (r_c − μ_c) / sqrt(σ²_c + eps)      if the component has ``normalize: true``, else r_c
    z_c   = clip(z_c, lo_c, hi_c)               if the component has ``clip: [lo, hi]``
    total = clip(Σ_c w_c · z_c, lo, hi)         (the composite's own ``clip``, if any)

A component may return None for a sample (TRL's "not mine to score", with ``allow_none``): the
sum runs over the components that scored it, as TRL's ``nansum`` does, and a sample no
component scored has total None.

μ_c, σ²_c are running statistics over every sample seen so far (population variance, merged
batch by batch with Chan's formula); a batch is whitened with the moments of the batches *before*
it and only then absorbed, so the first batch passes raw (whitening a batch by its own moments
would couple each sample's reward to the others'). ``combine(..., update=False)`` normalises
without updating (evaluation). The statistics are saved with ``state_dict`` and restored with
``load_state_dict`` so a resumed run normalises exactly like the uninterrupted one.

``score_components`` returns the raw score of every component by its unique name (the reward's
name, or ``label``; "length", "length_2" for repeats) and keeps it in ``last_components`` so a
trainer can log each component on its own; RCfD compares these raw components with the
demonstrations' (``rewards.DemoRewardCache``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.base import RewardFn, TRLView, call_reward
from rewards.registry import build, options

# keys of a component spec that belong to the composite, not to the reward's own options
COMPONENT_KEYS = ("name", "weight", "normalize", "clip", "label", "options")


class RunningMoments:
    """Running mean and (population) variance of a stream of numbers."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    def update(self, values: Sequence[float]) -> None:
        values = [v for v in values if math.isfinite(v)]  # a skipped step must not poison the statistics
        n = len(values)
        if n == 0:
            return
        batch_mean = math.fsum(values) / n
        batch_m2 = math.fsum((v - batch_mean) ** 2 for v in values)
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def normalize(self, values: Sequence[float], eps: float = 1e-8) -> list[float]:
        """(v − mean) / sqrt(var + eps) with the moments seen so far; before any, ``values`` as is
        (whitening a batch by its own moments would couple every sample to the others)."""
        if self.count == 0:
            return list(values)
        std = math.sqrt(self.var + eps)
        return [(v - self.mean) / std for v in values]

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def _clip(values: list[float], bounds: tuple[float, float] | None) -> list[float]:
    if bounds is None:
        return values
    lo, hi = bounds
    return [min(max(v, lo), hi) for v in values]


def _bounds(clip: Any, where: str) -> tuple[float, float] | None:
    if clip is None:
        return None
    if not isinstance(clip, (list, tuple)) or len(clip) != 2 or float(clip[0]) > float(clip[1]):
        raise ValueError(f"{where}: clip must be [lo, hi] with lo <= hi, got {clip!r}")
    return float(clip[0]), float(clip[1])


@dataclass
class Component:
    """One term of a ``CombinedReward``: a reward callable and how it enters the sum."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    normalize: bool = False
    clip: tuple[float, float] | None = None
    spec: dict[str, Any] = field(default_factory=dict)  # how it was built (cache fingerprints)

    def clipped(self, values: list[float]) -> list[float]:
        """Scores clipped to this component's ``clip`` (NaN stays NaN): the one place a component is clipped."""
        return _clip(values, self.clip)


class CombinedReward:
    """Weighted sum of reward components; also a reward callable itself."""

    def __init__(
        self,
        components: Sequence[Component],
        clip: Sequence[float] | None = None,
        eps: float = 1e-8,
        allow_non_finite: bool = False,
    ):
        if not components:
            raise ValueError("combined reward: no components")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"combined reward: component names must be unique, got {names}")
        self.components = list(components)
        self.clip = _bounds(clip, "combined reward")
        self.eps = float(eps)
        self.allow_non_finite = allow_non_finite  # the trainer sets it: it skips steps with NaN/inf rewards
        self.allow_none = False  # the trainer sets it: a None score drops that sample from the loss
        self.moments = {c.name: RunningMoments() for c in self.components if c.normalize}
        self.last_components: dict[str, list[float]] = {}
        self.last_total: list[float] = []

    @property
    def names(self) -> list[str]:
        """Component names, in the order of ``score_components`` and of demo rewards' columns."""
        return [c.name for c in self.components]

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.components]

    def raw_scores(
        self, prompts: Sequence[str], completions: Sequence[str], trl: TRLView | None = None, **columns: Any
    ) -> dict[str, list[float | None]]:
        """Every component's raw scores, without recording them (see ``score_components``)."""
        return {
            c.name: call_reward(
                c.name,
                c.fn,
                prompts,
                completions,
                allow_non_finite=self.allow_non_finite,
                allow_none=self.allow_none,
                trl=trl,
                **columns,
            )
            for c in self.components
        }

    def score_components(
        self, prompts: Sequence[str], completions: Sequence[str], trl: TRLView | None = None, **columns: Any
    ) -> dict[str, list[float | None]]:
        """Raw scores by component name; also kept in ``last_components``."""
        self.last_components = self.raw_scores(prompts, completions, trl=trl, **columns)
        return self.last_components

    def combine(
        self,
        components: dict[str, list[float]],
        update: bool = True,
        gather: Callable[[list[float]], list[float]] | None = None,
    ) -> list[float]:
        """The weighted total of raw component scores (whitened and clipped as configured).

        Whitening uses the moments from *before* this batch; with ``update`` they then absorb the
        batch -- all processes' scores when ``gather`` (every rank's list, concatenated) is given,
        so each rank keeps the same moments and 2 processes whiten as 1 does."""
        n = len(components[self.components[0].name])
        total: list[float | None] = [None] * n
        for c in self.components:
            values = list(components[c.name])
            scored = [i for i, v in enumerate(values) if v is not None]
            present = [values[i] for i in scored]
            if c.normalize:
                raw = present
                present = self.moments[c.name].normalize(present, self.eps)
                if update:
                    self.moments[c.name].update(gather(raw) if gather is not None else raw)
            for i, v in zip(scored, c.clipped(present)):
                total[i] = (total[i] or 0.0) + c.weight * v
        self.last_total = [None if t is None else _clip([t], self.clip)[0] for t in total]
        return self.last_total

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return self.combine(self.score_components(prompts, completions, **columns))

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {name: m.state_dict() for name, m in self.moments.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("moments", {})
        if set(saved) != set(self.moments):
            raise ValueError(
                f"combined reward: the checkpoint normalises {sorted(saved)}, "
                f"this reward normalises {sorted(self.moments)}"
            )
        for name, moments in saved.items():
            self.moments[name].load_state_dict(moments)

    def describe(self) -> list[dict[str, Any]]:
        """One dict per component: its name, weight, normalisation, clip and build spec."""
        return [
            {"name": c.name, "weight": c.weight, "normalize": c.normalize, "clip": c.clip, "spec": c.spec}
            for c in self.components
        ]

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.weight:g}·{c.name}" for c in self.components)
        return f"CombinedReward({parts})"


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"


def build_combined(
    specs: Sequence[str | dict[str, Any] | RewardFn],
    device: str | None = None,
    clip: Sequence[float] | None = None,
) -> CombinedReward:
    """A ``CombinedReward`` from component specs (what a recipe's ``reward:`` list holds).

    A spec is a registry name (``"sentiment"``), a callable (a custom reward, named by its
    ``__name__``), or a dict: ``name`` (registry name), optional ``weight`` (default 1),
    ``normalize`` (running whitening, default false), ``clip`` ([lo, hi]), ``label`` (the
    component's name, default the reward's), and the reward's own options, either inline or under
    ``options``. ``device`` goes to every reward that takes one and was not given one.
    """
    components: list[Component] = []
    taken: set[str] = set()
    for spec in specs:
        if callable(spec) and not isinstance(spec, dict):
            label = getattr(spec, "name", None) or getattr(spec, "__name__", None) or type(spec).__name__
            name = _unique(str(label), taken)
            components.append(Component(name=name, fn=spec, spec={"callable": str(label)}))
            taken.add(name)
            continue
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        if "name" not in spec:
            raise ValueError(f"reward component {spec!r}: no 'name'")
        reward_name = spec["name"]
        opts = {k: v for k, v in spec.items() if k not in COMPONENT_KEYS}
        opts.update(spec.get("options") or {})
        if device is not None and "device" not in opts and "device" in options(reward_name):
            opts["device"] = device
        fn = build(reward_name, **opts)
        name = _unique(str(spec.get("label") or reward_name), taken)
        taken.add(name)
        fingerprint = {"reward": reward_name, **{k: v for k, v in opts.items() if k != "device"}}
        components.append(
            Component(
                name=name,
                fn=fn,
                weight=float(spec.get("weight", 1.0)),
                normalize=bool(spec.get("normalize", False)),
                clip=_bounds(spec.get("clip"), f"reward component {name!r}"),
                spec=fingerprint,
            )
        )
    return CombinedReward(components, clip=clip)
