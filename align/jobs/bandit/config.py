"""The bandit recipe: every field `align bandit` reads, validated before anything runs.

The schema's defaults are ``recipes/bandit/default.yaml``: `align bandit` with no recipe runs it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

import losses
from align.config import Strict, format_validation_error
from align.generation_config import CorrectionConfig
from align.objective import ObjectiveConfig, objective_mapping, takes_beta

SAMPLERS = ("uniform", "ref", "policy")

# the lab's objective entry is the one every recipe shares (align/objective.py)
ObjectiveEntry = ObjectiveConfig


def bandit_objectives() -> list[str]:
    """Objectives the lab can feed: samples of the policy scored by the reward (online), or pairs
    of a sampler. An offline objective on unpaired rows (SFT on demonstrations) has no bandit form."""
    return sorted(n for n, cls in losses.REGISTRY.items() if "online" in cls.feeds or cls.paired)


def source(entry: ObjectiveConfig, sampler: Any) -> Literal["policy", "sampler"]:
    """Where the entry's batches come from: its ``data``, else (auto) the policy for an objective
    trained only online or when the sampler is the policy, the sampler's pairs otherwise."""
    if entry.data not in (None, "auto"):
        return entry.data
    if "offline" not in losses.REGISTRY[entry.name].feeds or sampler == "policy" or isinstance(sampler, LagSampler):
        return "policy"
    return "sampler"


def averaged(entry: ObjectiveConfig) -> bool:
    """The entry's objective compares length-averaged log-probs (its fixed point is per token)."""
    return bool(entry.options.get("average_logprobs", False))


class PairSampler(Strict):
    """Pairs (y, y') with y ~ mu1 and y' ~ mu2 over the arms, optionally a fixed dataset of them."""

    mu1: list[float] = Field(..., min_length=2, description="distribution of the first element of each pair")
    mu2: list[float] | None = Field(None, description="distribution of the second element (default: mu1)")
    dataset_size: int | None = Field(
        None,
        gt=0,
        description="draw this many pairs (and their labels) once per seed and train on them; "
        "null: fresh pairs every step",
    )

    @field_validator("mu1", "mu2")
    @classmethod
    def distribution(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (min(value) < 0 or abs(sum(value) - 1) > 1e-6):
            raise ValueError("expected non-negative probabilities summing to 1")
        return value


class ReplaySampler(Strict):
    """Pairs of the policy's own past samples: each element of a pair comes from the policy as it
    was at one of the last ``replay_steps`` steps (drawn uniformly), used with no importance weights."""

    replay_steps: int = Field(..., ge=1, description="how many past steps' policies the buffer spans")
    mix: float = Field(0.0, ge=0, le=1, description="fraction of pairs whose first element is a fresh sample")


class LagSampler(Strict):
    """The policy's own samples, ``lag`` optimizer steps late: step t (0-based) trains on samples of the
    policy after max(0, t − lag) updates -- the trainer's ``train.async: {max_staleness: lag, mode: fixed}``.
    π_old is the current policy (PPO/GRPO ratios start at 1); the objectives that declare
    ``corrects_sampler`` take the weights π_old/π_lagged of ``importance_correction`` (none by default)."""

    lag: int = Field(..., ge=0, description="N: optimizer steps between the sampling policy and the trained one")
    importance_correction: CorrectionConfig | None = Field(
        None,
        description="weights π_old/π_lagged on each policy-gradient term, as generation.importance_correction "
        "(losses/correction.py); null or mode none: no weights",
    )
    compare_lag0: bool = Field(
        True, description="lag > 0: also train each objective at lag 0 (same seeds) and report its steps beside"
    )


class SequenceConfig(Strict):
    """A tabular autoregressive policy: logits[position, previous token, token], token 0 is EOS."""

    vocab_size: int = Field(4, ge=2, description="tokens including EOS (token 0)")
    max_length: int = Field(8, ge=2, description="a sequence that has not ended by then is cut (EOS counts as a token)")
    ref_eos_prob: float = Field(
        0.25, gt=0, lt=1, description="reference: P(EOS) at every position, other tokens uniform"
    )
    length_reward: float = Field(
        0.2, description="r(y) = length_reward * |y|; preference labels are Bradley-Terry on r"
    )


class BanditRecipe(Strict):
    description: str = ""
    mode: Literal["bandit", "sequence"] = Field("bandit", description="K-armed bandit, or tabular sequence policy")
    rewards: list[float] = Field(
        [1.0, 0.8, 0.5, 0.2, 0.0], min_length=2, description="bandit: r(a) for each of the K arms"
    )
    ref_logits: list[float] | None = Field(
        [0.0, 0.5, 1.0, 0.0, -0.5], description="bandit: reference logits, K floats (null: uniform)"
    )
    beta: float = Field(0.25, gt=0, description="KL coefficient of every objective entry that gives none")
    demo_reward: float = Field(0.5, description="RCfD: the demonstration's reward r_d")
    sampler: Literal["uniform", "ref", "policy"] | PairSampler | ReplaySampler | LagSampler = Field(
        "uniform",
        description="pairs for copg, dpo, ipo: uniform, ref, policy, {mu1, mu2, dataset_size} or {replay_steps, "
        "mix}; {lag, importance_correction}: every objective samples the policy of lag steps ago",
    )
    # before ``objectives``: its validator gives entries without a k of their own this one
    k: int = Field(4, ge=2, description="samples per group from the policy (rloo, rcfd, on-policy copg)")
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [{"name": n} for n in ("reinforce", "rloo", "copg", "dpo", "ipo", "rcfd")],
        min_length=1,
        description="names, or mappings {name, label, data, k, beta, <objective options>}",
    )
    steps: int = Field(800, gt=0, description="optimizer steps")
    batch_size: int = Field(
        512,
        gt=0,
        description="per seed and step: samples from the policy (in groups of k), or pairs from the sampler",
    )
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the logits")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay from lr to lr*final_lr_ratio"
    )
    final_lr_ratio: float = Field(0.01, ge=0, le=1)
    seeds: int = Field(16, gt=0, description="independent runs, vectorised in one tensor")
    seed: int = Field(0, description="base random seed")
    log_every: int = Field(10, gt=0, description="log curves every this many steps")
    converged_kl: float = Field(
        1e-3, gt=0, description="steps to target: the first logged step whose seed-mean KL to target is at most this"
    )
    out: str = Field("runs/bandit/default", description="output directory: results.json, curves.png")
    sequence: SequenceConfig = Field(default_factory=SequenceConfig, description="mode: sequence settings")

    @field_validator("ref_logits")
    @classmethod
    def one_per_arm(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        K = len(info.data.get("rewards") or [])
        if value is not None and info.data.get("mode") == "bandit" and K and len(value) != K:
            raise ValueError(f"expected {K} floats (one per reward), got {len(value)}")
        return value

    @field_validator("sampler", mode="before")
    @classmethod
    def one_sampler(cls, value: Any) -> Any:
        """A name, a {mu1, mu2, dataset_size}, {replay_steps, mix} or {lag, ...} mapping, with one error line."""
        if isinstance(value, dict):
            model = LagSampler if "lag" in value else ReplaySampler if "replay_steps" in value else PairSampler
            try:
                return model.model_validate(value)
            except ValidationError as err:
                raise ValueError(format_validation_error(err)) from None
        if value not in SAMPLERS:
            raise ValueError(
                f"expected one of {list(SAMPLERS)} or a mapping {{mu1, mu2, dataset_size}}, {{replay_steps, mix}} "
                "or {lag, importance_correction}"
            )
        return value

    @field_validator("sampler")
    @classmethod
    def pair_sampler_fits(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, PairSampler):
            if info.data.get("mode") == "sequence":
                raise ValueError("mode sequence takes uniform, ref or policy")
            K = len(info.data.get("rewards") or [])
            for name, mu in (("mu1", value.mu1), ("mu2", value.mu2)):
                if mu is not None and K and len(mu) != K:
                    raise ValueError(f"{name}: expected {K} probabilities (one per reward), got {len(mu)}")
        return value

    @field_validator("objectives", mode="before")
    @classmethod
    def recipe_defaults(cls, entries: Any, info: ValidationInfo) -> Any:
        """An entry that gives no β or k takes the recipe's ``beta`` and ``k``, so that after
        validation each entry's own ``beta`` and ``k`` are the ones it trains with."""
        if not isinstance(entries, list):
            return entries
        out = []
        for raw in entries:
            entry = objective_mapping(raw)
            if isinstance(entry, dict):
                name = entry.get("name")
                if isinstance(name, str) and name not in bandit_objectives():
                    raise ValueError(f"unknown objective {name!r}; expected one of {bandit_objectives()}")
                # the recipe's β is a KL coefficient: a reference-free objective's β (SimPO's reward
                # scale, ORPO's λ) keeps its own default
                kl = takes_beta(name) and not losses.REGISTRY[name].reference_free
                if entry.get("beta") is None and "beta" in info.data and kl:
                    entry["beta"] = info.data["beta"]
                if entry.get("k") is None and "k" in info.data:
                    entry["k"] = info.data["k"]
            out.append(entry)
        return out

    @field_validator("objectives")
    @classmethod
    def unique_labels(cls, entries: list[ObjectiveConfig]) -> list[ObjectiveConfig]:
        """Default label: the name (+ "_avg" for average_logprobs), then "_2", "_3" ... if taken."""
        for i, entry in enumerate(entries):
            entry.refuse(
                f"objectives[{i}]",
                {
                    "mode": "the lab picks its samples with data (policy, sampler)",
                    "train": "a study run's changes to its base train section; the lab has none",
                    "generation": "a study run's changes to its base generation section; the lab has none",
                },
            )
        explicit = [e.label for e in entries if e.label is not None]
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"labels must be unique, got {explicit}")
        taken = set(explicit)
        for entry in entries:
            if entry.label is None:
                base = entry.name + ("_avg" if averaged(entry) else "")
                entry.label, n = base, 2
                while entry.label in taken:
                    entry.label, n = f"{base}_{n}", n + 1
                taken.add(entry.label)
        return entries

    @model_validator(mode="after")
    def correction_is_taken(self) -> BanditRecipe:
        """A lag's importance correction weighs only the objectives that declare ``corrects_sampler``:
        a recipe where none does would configure nothing."""
        chosen = self.sampler.importance_correction if isinstance(self.sampler, LagSampler) else None
        if chosen is not None and chosen.mode != "none":
            if not any(losses.REGISTRY[e.name].corrects_sampler for e in self.objectives):
                takers = sorted(n for n, cls in losses.REGISTRY.items() if cls.corrects_sampler)
                raise ValueError(
                    f"sampler.importance_correction: no objective of the recipe takes importance weights "
                    f"(those that do: {', '.join(takers)}); remove it"
                )
        return self
