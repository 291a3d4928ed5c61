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

from losses.base import LossBatch, sampler_weighted, sequence_logprobs
from losses.kl import RewardKL


class VanillaPG(RewardKL):
    name = "vanilla_pg"
    unit = "sequence"
    feeds = ("online",)
    corrects_sampler = True
    needs = ("rewards",)

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        R, kl = self.penalised(batch, batch.rewards)
        logp = sequence_logprobs(sampler_weighted(batch.logprobs, batch), batch.mask)
        return -R * logp, {"advantage": R, "kl": kl, "regularised_reward": R}
