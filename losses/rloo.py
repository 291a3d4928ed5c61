"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740).

k samples y_1..y_k per prompt; the KL penalty is subtracted from the reward *before* the
leave-one-out baseline, as in the paper and TRL:

    R_i = r_i − β·KL_seq(y_i)                  (detached)
    b_i = (1/(k−1)) Σ_{j≠i} R_j                (same prompt)
    L   = −(1/N) Σ_i (R_i − b_i)·ℓ(y_i)

b_i does not depend on y_i, so the estimator is unbiased for ∇E_π[R]. Unit: sequence.
"""

from __future__ import annotations

from torch import Tensor

from losses.base import LossBatch, Objective, group_leave_one_out_mean, sequence_logprobs
from losses.kl import KLEstimator, regularised_reward, reward_kl_estimator


def rloo_advantages(R: Tensor, group: Tensor) -> Tensor:
    return R - group_leave_one_out_mean(R, group)


class RLOO(Objective):
    name = "rloo"
    unit = "sequence"
    feeds = ("online",)
    min_k = 2  # the leave-one-out baseline needs another sample of the prompt
    needs = ("rewards", "group")

    def __init__(self, beta: float = 0.05, kl_estimator: KLEstimator = "k1"):
        self.beta = beta
        self.kl_estimator = reward_kl_estimator(kl_estimator)

    def sequence_rewards(self, batch: LossBatch) -> Tensor:
        """The reward the estimator sees before KL; RCfD overrides this."""
        return batch.rewards

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = self.sequence_rewards(batch)
        R, kl = regularised_reward(
            rewards, batch.logprobs, batch.ref_logprobs, batch.mask, self.beta, self.kl_estimator
        )
        advantage = rloo_advantages(R, batch.group)
        logp = sequence_logprobs(batch.logprobs, batch.mask)
        return -advantage * logp, {"advantage": advantage, "kl": kl, "regularised_reward": R}
