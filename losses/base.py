"""The objective contract shared by every loss, the bandit lab and the LLM trainer.

An objective sees a batch of B sequences of up to T completion tokens (a bandit is T = 1):

- ``logprobs[B, T]``      per-token log-probs of the policy, with grad, at the sampling temperature
- ``ref_logprobs[B, T]``  per-token log-probs of the frozen reference (no grad)
- ``mask[B, T]``          1 on completion tokens, 0 on padding
- ``rewards[B]``          sequence rewards (``[B, C]`` for several reward components, RCfD)
- ``group[B]``            which prompt a sample belongs to (k samples per prompt)
- ``pairs[P, 2]``         row indices of (chosen, rejected) -- or (y, y') for off-policy CoPG
- ``demo_rewards[B]``     reward of the prompt's demonstration (RCfD), same shape as ``rewards``
- ``stream[B]``           independent runs sharing one call (the bandit's seeds); only stateful
                          objectives (REINFORCE's moving baseline) look at it
- ``old_logprobs[B, T]``  log-probs of the policy that sampled (π_old), for importance ratios;
                          None means the batch is on-policy (ratio 1)
- ``values[B, T]``        a critic's value of the state before each completion token, with grad
                          (objectives that need it get a critic from the trainer, a table in the lab)
- ``old_values[B, T]``    the critic's values when the batch was sampled; None: the current ones
- ``sampler_weights[B, T]`` importance weights π_old/π_engine of the engine that sampled, truncated
                          or masked (losses/correction.py), detached; None: 1. Only objectives that
                          declare ``corrects_sampler`` are given them, and they multiply each
                          policy-gradient term by them (``sampler_weighted``)
- ``stats``               statistics of the WHOLE rollout batch (all micro-batches, all processes),
                          summed by the trainer from each process's ``batch_stats``; None: the loss
                          takes them from the batch it is given (the bandit lab's whole batch)
- ``mismatched_logprobs[B]`` ℓ(y′ | x) of the policy, detached: the row's prompt x with the completion
                          y′ of ANOTHER row of the step (the trainer takes the previous row of the
                          step over every process, the first row the last: TRL's rotation by one);
                          KTO's KL estimate. Only objectives that need it are given it (an extra
                          no-grad forward per row)
- ``mismatched_ref_logprobs[B]`` the reference's ℓ_ref(y′ | x) of the same mismatched rows

Normalisation belongs to the contract, not to each loss. An objective declares its ``unit``
(``"sequence"``, ``"pair"`` or ``"token"``) and returns ``sum(per-unit terms) / num_units``.
The trainer passes the number of units in the whole optimizer step (all micro-batches, all
processes), so summing micro-batch losses equals the full-batch loss and gradient accumulation
or data parallelism change nothing. Called without ``num_units``, a loss is a plain batch mean.

Batch-wide statistics (PPO's advantage whitening, RCfD's per-component whitening) follow the same
rule: an objective that needs them declares the fields they read (``stats_read``) and computes
summable statistics in ``batch_stats``; the trainer sums those over the whole rollout batch and
every process once, before the first optimizer step, and hands the sums to every micro-batch.

Extra inputs an objective takes from the run are declared too, by the name of a run quantity
(``RunQuantity``), never looked up by option name: ``run_inputs`` maps an option to the quantity
that always sets it (its home is elsewhere in the recipe -- RCfD's ``weights`` are the reward
components' ``reward[i].weight`` -- so a recipe giving the option is refused), ``run_defaults`` to
the quantity that fills it when the recipe leaves it unset (Dr. GRPO's ``norm_length``: the
generation budget). The core offers what its run knows (``Recipe.run_quantities`` in
align/recipe.py, supplied by ``ObjectiveConfig.build`` in align/objective.py); a caller that knows
none (the bandit lab) leaves the objective's own defaults.

Metrics are merged the same way: ``evaluate`` returns each metric as (sum, count) -- per-token
metrics ([B, T], like the mask) over completion tokens, other shapes over their elements -- so the
trainer adds numerators and counts over micro-batches and processes and divides once.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

Unit = Literal["sequence", "pair", "token"]
Feed = Literal["online", "offline"]
# the tilt f of the KL-regularised fixed point π* ∝ π_ref·exp(f/β) that the bandit lab checks:
# "reward" f = r; "demo_gap" f = −(r − r_demo)²; "preference" f from the Bradley–Terry preference
# probabilities of the pairs (IPO's least-squares solution); "reverse_kl": the stationary point of
# (k−1)/k·E[r] − β·KL(π_ref ‖ π) (mean-centred group advantages with a k3 KL loss term, T = 1);
# "group_reward" f = (k−1)/k·r (the task reward mean-centred in its group, the sample included, a k1
# KL in the reward after it: REINFORCE++-baseline); None: no closed form
FixedPoint = Literal["reward", "demo_gap", "preference", "reverse_kl", "group_reward"]
# what a run knows that an objective may take (``run_inputs``, ``run_defaults``): "reward_weights"
# each reward component's weight, in the reward section's order (list[float]); "max_new_tokens" the
# generation budget of one completion (int); "k" completions sampled per prompt (int)
RunQuantity = Literal["reward_weights", "max_new_tokens", "k"]
RUN_QUANTITIES: tuple[str, ...] = get_args(RunQuantity)


@dataclass(frozen=True)
class LossBatch:
    logprobs: Tensor
    mask: Tensor
    ref_logprobs: Tensor | None = None
    rewards: Tensor | None = None
    group: Tensor | None = None
    pairs: Tensor | None = None
    demo_rewards: Tensor | None = None
    stream: Tensor | None = None
    old_logprobs: Tensor | None = None  # the sampling policy's log-probs (importance ratios); None: on-policy
    values: Tensor | None = None  # the critic's per-token state values, with grad
    old_values: Tensor | None = None  # the critic's values at sampling time; None: ``values`` detached
    stats: dict[str, Tensor] | None = None  # whole-batch sums of ``batch_stats``; None: from this batch
    sampler_weights: Tensor | None = None  # [B, T] π_old/π_engine, truncated or masked; None: 1
    mismatched_logprobs: Tensor | None = None  # [B] ℓ(y′|x), y′ another row's completion, detached (KTO)
    mismatched_ref_logprobs: Tensor | None = None  # [B] the reference's ℓ_ref(y′|x)

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 2 or self.mask.shape != self.logprobs.shape:
            raise ValueError(
                f"logprobs and mask must both be [B, T]; got {tuple(self.logprobs.shape)} and {tuple(self.mask.shape)}"
            )

    @property
    def size(self) -> int:
        return self.logprobs.shape[0]

    def select(self, rows: Tensor) -> LossBatch:
        """Rows ``rows`` of the batch, with ``pairs`` re-indexed (pairs must lie inside ``rows``)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("pairs", "stats"):
                continue
            out[f.name] = value[rows]
        pairs = None if self.pairs is None else select_pairs(self.pairs, rows, self.size)
        return replace(self, **out, pairs=pairs)


def select_pairs(pairs: Tensor, rows: Tensor, size: int) -> Tensor:
    """The pairs [P, 2] of a batch of ``size`` rows that lie inside ``rows``, re-indexed to
    positions in ``rows``; a pair with one row in and one out is an error (it would be lost)."""
    where = torch.full((size,), -1, dtype=torch.long, device=pairs.device)
    where[rows.to(pairs.device)] = torch.arange(len(rows), device=pairs.device)
    mapped = where[pairs]
    keep = (mapped >= 0).all(dim=1)
    if not bool(keep.all()) and bool((mapped >= 0).any(dim=1)[~keep].any()):
        raise ValueError("a pair would be split across micro-batches")
    return mapped[keep]


def sampler_weighted(per_token: Tensor, batch: LossBatch) -> Tensor:
    """Per-token policy-gradient terms (or log-probs) times the sampler-mismatch weights, where
    the batch carries them (losses/correction.py)."""
    return per_token if batch.sampler_weights is None else per_token * batch.sampler_weights


def sequence_logprobs(logprobs: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """ℓ(y) = Σ_t logprobs·mask, or the length-averaged ℓ̄(y) = ℓ(y)/|y|."""
    total = (logprobs * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def stream_index(batch: LossBatch) -> Tensor:
    """Each row's independent run (``stream``; the bandit lab's seeds), 0 for every row otherwise."""
    if batch.stream is not None:
        return batch.stream.long()
    return torch.zeros(batch.size, dtype=torch.long, device=batch.logprobs.device)


def moment_sums(values: Tensor, weight: Tensor, stream: Tensor) -> dict[str, Tensor]:
    """Summable moments per stream: Σw·v, Σw·v², Σw (float64). ``values`` [B, T] with ``weight`` the
    mask [B, T] (one moment over every completion token), or [B] / [B, C] with ``weight`` [B]
    (one moment per column)."""
    v, w = values.detach().double(), weight.detach().double()
    if v.dim() == 2 and w.dim() == 2:  # per-token values: a row adds its completion tokens
        rows = ((w * v).sum(-1), (w * v * v).sum(-1), w.sum(-1))
    else:
        wv = w if v.dim() == 1 else w[:, None]
        rows = (wv * v, wv * v * v, w)
    n = int(stream.max()) + 1 if stream.numel() else 1
    return {
        name: torch.zeros((n, *x.shape[1:]), dtype=torch.float64, device=v.device).index_add_(0, stream, x)
        for name, x in zip(("sum", "sq_sum", "count"), rows)
    }


def whiten(values: Tensor, sums: dict[str, Tensor], stream: Tensor, eps: float = 1e-8) -> Tensor:
    """(v − mean)·rsqrt(var + eps) with the moments of ``moment_sums`` (the unbiased variance, as
    TRL's and verl's ``masked_whiten``), each row by its stream's."""
    count = sums["count"].clamp(min=1)
    count_b = count.reshape(-1, *([1] * (sums["sum"].dim() - 1)))
    mean = sums["sum"] / count_b
    var = (sums["sq_sum"] / count_b - mean**2).clamp(min=0)
    var = var * torch.where(count_b > 1, count_b / (count_b - 1).clamp(min=1), torch.ones_like(count_b))
    mean, scale = mean[stream], torch.rsqrt(var[stream] + eps)
    if values.dim() == 2 and mean.dim() == 1:  # [B, T] token values, one moment per stream
        mean, scale = mean[:, None], scale[:, None]
    return ((values.double() - mean) * scale).to(values.dtype)


def clip_active(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """Where the clipped branch of −min(ρ·A, clip(ρ)·A) is the one taken, i.e. the token has no
    policy gradient: ρ > 1 + clip_high with A > 0, or ρ < 1 − clip_low with A < 0 (TRL's rule)."""
    return ((ratio > 1 + clip_high) & (advantages > 0)) | ((ratio < 1 - clip_low) & (advantages < 0))


def with_defaults(init: Callable[..., None], **defaults: object) -> Callable[..., None]:
    """The constructor ``init`` with other defaults for some of its options: a variant objective
    that is its parent with those options changed (Dr. GRPO of GRPO). Its signature shows the new
    defaults, which is what ``losses.options`` reads."""
    signature = inspect.signature(init)
    unknown = sorted(set(defaults) - set(signature.parameters))
    if unknown:
        raise TypeError(f"with_defaults: {unknown} are not options of {init.__qualname__}")

    def variant(*args: object, **kwargs: object) -> None:
        bound = signature.bind_partial(*args, **kwargs)
        for name, value in defaults.items():
            bound.arguments.setdefault(name, value)  # only where the caller gave none
        init(*bound.args, **bound.kwargs)

    params = [p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values()]
    variant.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    variant.__doc__ = init.__doc__
    return variant


def group_leave_one_out_mean(values: Tensor, group: Tensor) -> Tensor:
    """For each row, the mean of ``values`` over the OTHER rows of its group, b_i = Σ_{j≠i} v_j/(k−1).

    Groups may have different sizes; a group of one gets baseline 0 (no other sample to compare).
    """
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    others = (counts[inverse] - 1).clamp(min=1)
    baseline = (sums[inverse] - values) / others
    return torch.where(counts[inverse] > 1, baseline, torch.zeros_like(baseline))


def pairs_within_groups(group: Tensor) -> Tensor:
    """All unordered pairs (i, j), i < j, of rows that share a group: [P, 2]."""
    same = group[:, None] == group[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    return (same & upper).nonzero()


class Objective(ABC):
    """Base class: subclasses declare what they need and how they are fed, and implement ``terms``.

    The trainer, recipe validation and bandit lab read only these declarations, never a name, so
    a new objective is one file plus ``losses.register``.
    """

    name: ClassVar[str]
    unit: ClassVar[Unit]
    feeds: ClassVar[tuple[Feed, ...]]  # how it can be trained; the first is the default (mode: auto)
    online: ClassVar[bool]  # feeds[0] == "online": fresh samples of the policy, else a fixed dataset
    needs: ClassVar[tuple[str, ...]] = ()  # LossBatch fields it reads (besides logprobs and mask)
    paired: ClassVar[bool] = False  # the batch must carry ``pairs`` (or groups to build them from)
    preference: ClassVar[bool] = False  # pairs are (preferred, dispreferred), ordered before the loss
    min_k: ClassVar[int] = 1  # online: samples per prompt the estimator needs (a baseline, a pair)
    fixed_point: ClassVar[FixedPoint | None] = "reward"
    # its policy-gradient terms take the importance weights of a sampler that is not the trained
    # policy (``sampler_weights``: a vLLM engine's kernels and precision); an objective that needs
    # no weights off-policy (CoPG) or has no sampler (offline) leaves it False
    corrects_sampler: ClassVar[bool] = False
    # the loss never reads a reference model, whatever its options (SimPO, ORPO, SFT; their ``beta``,
    # where they have one, is no KL coefficient): none is loaded, and a recipe naming one is refused
    reference_free: ClassVar[bool] = False
    # LossBatch fields ``batch_stats`` reads; () = the loss needs no statistics of the whole batch.
    # Naming old_logprobs / ref_logprobs / old_values asks the trainer for them on every row first.
    stats_read: tuple[str, ...] = ()
    # option -> the run quantity that always sets it (the recipe may not give the option)
    run_inputs: ClassVar[Mapping[str, RunQuantity]] = {}
    # option -> the run quantity that fills it where the recipe leaves it unset (None)
    run_defaults: ClassVar[Mapping[str, RunQuantity]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "feeds" in cls.__dict__:
            bad = [f for f in cls.feeds if f not in ("online", "offline")]
            if not cls.feeds or bad:
                raise TypeError(f"{cls.__name__}.feeds: expected a tuple of 'online'/'offline', got {cls.feeds}")
            cls.online = cls.feeds[0] == "online"
        # a declaration naming an unknown quantity or option would be silently never supplied
        params = inspect.signature(cls.__init__).parameters
        for attr in ("run_inputs", "run_defaults"):
            for option, quantity in cls.__dict__.get(attr, {}).items():
                if quantity not in RUN_QUANTITIES:
                    raise TypeError(f"{cls.__name__}.{attr}: {quantity!r} is not one of {list(RUN_QUANTITIES)}")
                if option not in params:
                    raise TypeError(f"{cls.__name__}.{attr}: {option!r} is not an option of its constructor")

    @property
    def uses_reference(self) -> bool:
        """The loss reads the frozen reference: it needs ``ref_logprobs``, or it has a KL term with
        β > 0 (every objective with one keeps its KL coefficient as ``self.beta``). When it does
        not, the trainer loads no reference and logs no KL. A ``reference_free`` objective never does."""
        if self.reference_free:
            return False
        return "ref_logprobs" in self.needs or float(getattr(self, "beta", 0.0) or 0.0) > 0

    @property
    def sampling_logprobs(self) -> bool:
        """The loss reads the log-probs of the policy that sampled (``old_logprobs``: importance
        ratios, or a KL penalty fixed at sampling time), so replayed completions keep theirs."""
        return False

    def batch_stats(self, batch: LossBatch) -> dict[str, Tensor]:
        """Summable statistics of ``batch`` (float64 sums; see ``stats_read``); the trainer adds
        them over every micro-batch and process and passes the sums as ``LossBatch.stats``."""
        return {}

    def count_units(self, batch: LossBatch) -> int:
        """How many units this batch holds (sum these over micro-batches/processes for ``num_units``)."""
        if self.unit == "token":
            return int(batch.mask.sum())
        if self.unit == "pair":
            return int(self.batch_pairs(batch).shape[0])
        return batch.size

    def batch_pairs(self, batch: LossBatch) -> Tensor:
        if batch.pairs is not None:
            return batch.pairs
        if batch.group is not None:
            return pairs_within_groups(batch.group)
        raise ValueError(f"objective {self.name!r} needs pairs (or groups to pair within)")

    def check(self, batch: LossBatch) -> None:
        missing = [n for n in self.needs if getattr(batch, n) is None]
        if missing:
            raise ValueError(f"objective {self.name!r} needs batch fields {missing}")

    @abstractmethod
    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-unit loss terms (summed by ``__call__``) and per-row metrics."""

    def evaluate(
        self, batch: LossBatch, num_units: float | None = None
    ) -> tuple[Tensor, dict[str, tuple[float, float]]]:
        """The loss and each metric as (sum, count): a [B, T] metric over completion tokens, any
        other over its elements -- what the trainer adds up over micro-batches and processes."""
        self.check(batch)
        terms, metrics = self.terms(batch)
        # a step with no units (online DPO when every pair ties) has no terms either: its loss is 0
        denom = float(num_units) if num_units else max(self.count_units(batch), 1)
        loss = terms.sum() / denom
        sums = {}
        for key, value in metrics.items():
            value = value.detach().double()
            if value.shape == batch.mask.shape:
                mask = batch.mask.detach().double()
                sums[key] = (float((value * mask).sum()), float(mask.sum()))
            else:
                sums[key] = (float(value.sum()), float(value.numel()))
        return loss, sums

    def __call__(self, batch: LossBatch, num_units: float | None = None) -> tuple[Tensor, dict[str, float]]:
        loss, sums = self.evaluate(batch, num_units)
        return loss, {k: total / count for k, (total, count) in sums.items() if count}

    def after_step(self, batch: LossBatch) -> None:
        """Called once per optimizer step with the step's whole (detached) batch; stateless by default."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
