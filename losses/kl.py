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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


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
