"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740).

k samples y_1..y_k per prompt; the KL penalty is subtracted from the reward *before* the
leave-one-out baseline, as in the paper and TRL:

    R_i = r_i − β·KL_seq(y_i)                  (detached)
    b_i = (1/(k−1)) Σ_{j≠i} R_j                (same prompt)
    L   = −(1/N) Σ_i (R_i − b_i)·ℓ(y_i)

b_i does not depend on y_i, so the estimator is unbiased for ∇E_π[R]. Unit: sequence.

Off-policy (replayed groups, later passes of ``updates_per_batch``) ``kl_from`` decides what it is
(losses/kl.py): ``old`` (default, TRL's) fixes KL_seq, R and the advantages at sampling time from
π_old's log-probs -- biased off-policy without importance weights; ``current`` recomputes KL_seq
from the policy being trained, which makes the gradient exactly half CoPG's on any batch.
"""

from __future__ import annotations

from torch import Tensor

from losses.base import LossBatch, group_leave_one_out_mean, sampler_weighted, sequence_logprobs
from losses.kl import RewardKL


def rloo_advantages(R: Tensor, group: Tensor) -> Tensor:
    return R - group_leave_one_out_mean(R, group)


class RLOO(RewardKL):
    name = "rloo"
    unit = "sequence"
    feeds = ("online",)
    corrects_sampler = True
    min_k = 2  # the leave-one-out baseline needs another sample of the prompt
    needs = ("rewards", "group")

    def sequence_rewards(self, batch: LossBatch) -> Tensor:
        """The reward the estimator sees before KL; RCfD overrides this."""
        return batch.rewards

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = self.sequence_rewards(batch)
        R, kl = self.penalised(batch, rewards)
        advantage = rloo_advantages(R, batch.group)
        logp = sequence_logprobs(sampler_weighted(batch.logprobs, batch), batch.mask)
        return -advantage * logp, {"advantage": advantage, "kl": kl, "regularised_reward": R}
