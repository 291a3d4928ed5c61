"""KL control shared by every objective.

Per-token log-ratio δ_t = log π(y_t|·) − log π_ref(y_t|·); Schulman's (2020) estimators of
KL(π‖π_ref) from samples of π:

    k1 = δ                       unbiased, can be negative per sample
    k3 = exp(−δ) − 1 + δ         unbiased, always ≥ 0, lower variance

Online objectives fold β·KL into the *detached* sequence reward R(x,y) = r(x,y) − β·Σ_t k(δ_t).
With k1 the score-function gradient of E_π[R] is exactly the gradient of the KL-regularised
objective (the missing E[∇ log π] term is zero), so the fixed point is π* ∝ π_ref·exp(r/β).

k3 is refused there (``reward_kl_estimator``). It estimates the KL *value* without bias, but as
a detached reward its score-function gradient is not ∇KL: for an action a the policy rarely
samples, π(a)·k3(δ_a) → π_ref(a), so its term of E_π[(r − β·k3)·∇log π] tends to
−β·π_ref(a)·∇log π(a) — the penalty pushes down exactly the actions the reference protects.
On the CoPG paper's 3-arm bandit (r = 2.5, 2, 1; β = 0.5; uniform reference)
RLOO with k1 reaches π* (KL 0.385) while k3 drives the policy to (1, 0, 0), KL = log 3.
k3 is still logged (``kl_k3``) as a value estimate.

Which policy's log-probs the penalty reads (``kl_from``) decides what an estimator is off-policy,
on samples another policy μ drew (a replay buffer, several updates per batch):

    kl_from: old       KL_seq from π_old, the policy that sampled, fixed at sampling time with the
                       advantages (TRL's RLOO, from its ``old_per_token_logps``; verl, OpenRLHF).
                       Without importance weights the estimator is biased off-policy.
    kl_from: current   KL_seq recomputed from the policy being trained. Then h = r − β·log(π/π_ref)
                       is CoPG's, and RLOO's gradient is exactly half CoPG's on any batch: it is
                       CoPG off-policy (zero expected gradient at π* for any μ), not a control.

On-policy the two are the same number (π_old = π).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from losses.base import LossBatch, Objective

KLEstimator = Literal["k1", "k3"]
KLFrom = Literal["old", "current"]


def kl_source(kl_from: str) -> KLFrom:
    if kl_from not in ("old", "current"):
        raise ValueError(
            f"kl_from: expected 'old' (the sampling policy's log-probs, fixed at sampling time) or "
            f"'current' (the policy being trained), got {kl_from!r}"
        )
    return kl_from  # type: ignore[return-value]


def penalty_logprobs(logprobs: Tensor, old_logprobs: Tensor | None, kl_from: KLFrom) -> Tensor:
    """The log-probs a KL penalty reads: π_old's where ``kl_from`` is 'old' and the batch has them
    (none: the batch is on-policy, π_old = π), else the current ones; detached either way."""
    if kl_from == "old" and old_logprobs is not None:
        return old_logprobs.detach()
    return logprobs.detach()


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k3":
        return torch.expm1(-delta) + delta
    raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {estimator!r}")


def reward_kl_estimator(estimator: str) -> KLEstimator:
    """The estimator of a KL folded into the detached reward: only k1 has the right gradient."""
    if estimator == "k3":
        raise ValueError(
            "kl_estimator: 'k3' in the detached reward biases the policy gradient (it can drive the "
            "policy away from the reference); expected 'k1'"
        )
    if estimator != "k1":
        raise ValueError(f"kl_estimator: expected 'k1', got {estimator!r}")
    return estimator


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Σ_t k(δ_t) over completion tokens: [B]."""
    return (token_kl(logprobs, ref_logprobs, estimator) * mask).sum(-1)


def regularised_reward(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    mask: Tensor,
    beta: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """R = r − β·KL_seq, detached; returns (R, KL_seq)."""
    if ref_logprobs is None or beta == 0:
        zero = torch.zeros_like(rewards)
        return rewards.detach(), zero
    kl = sequence_kl(logprobs.detach(), ref_logprobs.detach(), mask, estimator)
    return (rewards - beta * kl).detach(), kl


def penalised_reward(
    batch: LossBatch, rewards: Tensor, beta: float, estimator: KLEstimator, kl_from: KLFrom
) -> tuple[Tensor, Tensor]:
    """R = r − β·KL_seq with the KL read from the policy ``kl_from`` names; returns (R, KL_seq)."""
    penalised = penalty_logprobs(batch.logprobs, batch.old_logprobs, kl_from)
    return regularised_reward(rewards, penalised, batch.ref_logprobs, batch.mask, beta, estimator)


class RewardKL(Objective):
    """Base of the policy-gradient objectives that fold β·KL into the detached reward,
    R = r − β·KL_seq (RLOO, vanilla PG, REINFORCE, RCfD): their KL options and the log-probs the
    penalty reads. Subclasses implement ``terms``."""

    def __init__(self, beta: float = 0.05, kl_estimator: KLEstimator = "k1", kl_from: KLFrom = "old"):
        self.beta = beta
        self.kl_estimator = reward_kl_estimator(kl_estimator)
        self.kl_from = kl_source(kl_from)

    @property
    def sampling_logprobs(self) -> bool:
        return self.kl_from == "old" and self.beta > 0  # the penalty is fixed at sampling time

    def penalised(self, batch: LossBatch, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """(R, KL_seq) for ``rewards`` with this objective's β, estimator and ``kl_from``."""
        return penalised_reward(batch, rewards, self.beta, self.kl_estimator, self.kl_from)
