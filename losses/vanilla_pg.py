"""Vanilla policy gradient: REINFORCE with no baseline, the floor of Ahmadian et al. 2024
("Back to Basics", arXiv 2402.14740).

    R_i = r_i − β·KL_seq(y_i)          (detached, k1; see losses/kl.py)
    L   = −(1/N) Σ_i R_i·ℓ(y_i)

Unbiased for ∇E_π[R] like every baseline variant, only with the most variance: its fixed point
is π_ref·exp(r/β) (declared ``reward``; bandit-tested). Unit: sequence. ``kl_from`` as RLOO's
(losses/kl.py): ``old`` (default) fixes R at sampling time, biased off-policy like any plain
policy gradient without importance weights.
"""

from __future__ import annotations

from torch import Tensor

from losses.base import LossBatch, Objective, sequence_logprobs
from losses.kl import KLEstimator, KLFrom, kl_source, penalised_reward, reward_kl_estimator


class VanillaPG(Objective):
    name = "vanilla_pg"
    unit = "sequence"
    feeds = ("online",)
    needs = ("rewards",)

    def __init__(self, beta: float = 0.05, kl_estimator: KLEstimator = "k1", kl_from: KLFrom = "old"):
        self.beta = beta
        self.kl_estimator = reward_kl_estimator(kl_estimator)
        self.kl_from = kl_source(kl_from)

    @property
    def sampling_logprobs(self) -> bool:
        return self.kl_from == "old" and self.beta > 0

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        R, kl = penalised_reward(batch, batch.rewards, self.beta, self.kl_estimator, self.kl_from)
        logp = sequence_logprobs(batch.logprobs, batch.mask)
        return -R * logp, {"advantage": R, "kl": kl, "regularised_reward": R}
