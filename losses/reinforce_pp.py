"""REINFORCE++ (Hu 2025, arXiv 2501.03262) and REINFORCE++-baseline: PPO's clipped surrogate and
per-token KL reward without a critic, the returns whitened over the whole global batch.

As OpenRLHF's ``advantage_estimator: reinforce`` / ``reinforce_baseline`` (and verl's
``reinforce_plus_plus``), with π_old the policy that sampled (the detached current one when each
batch gets one update, where ρ = 1):

    r̃_i    = r_i − mean_g r                                  baseline: group (the prompt's k samples)
    r̃_i    = r_i                                             baseline: none
    r_t    = −β·k1_t = −β·(log π_old(y_t) − log π_ref(y_t))   (+ r̃_i on the last completion token)
    G_t    = Σ_{s≥t} γ^{s−t}·r_s                              (the return: no critic, no GAE)
    Â_t    = (G_t − mean G) / sqrt(var G + 1e-8)              (whiten_advantages: every completion token
                                                               of the whole rollout batch, every process)
    ρ_t    = exp(log π(y_t) − log π_old(y_t))
    L      = Σ_i Σ_t m_it·(−min(ρ_it·Â_it, clip(ρ_it, 1 − clip_low, 1 + clip_high)·Â_it)) / Σ_i Σ_t m_it

The whitening moments come from ``batch_stats`` (``moment_sums`` of G over π_old, the reference
and the rewards), which the trainer sums over every micro-batch and process before the first
optimizer step, as losses/ppo.py's: the batch is whitened as one, so gradient accumulation and
DDP change nothing (the normalisation REINFORCE++ relies on instead of a critic or a per-prompt
std). The variance is the unbiased one with eps added, as verl's ``masked_whiten``; OpenRLHF
divides by the biased one clamped at 1e-8, a factor sqrt(n/(n−1)) on the step. The k1 penalty
reads π_old, fixed at sampling with the returns. ``baseline: group`` subtracts the group mean of
the task reward before the KL enters, as OpenRLHF (which also forces γ = 1 there; so does this).

Fixed point. k1 in the detached reward with γ = 1 makes E[G_t·∇log π(y_t)] summed over t the
score-function gradient of E[r] − β·KL(π ‖ π_ref); the whitening mean is a constant baseline and
its std a positive step size. So with ``baseline: none`` the fixed point is π_ref·exp(r/β)
(``reward``, as PPO's). With ``baseline: group`` the group mean includes the sample itself:
r_i − mean_g r = (k−1)/k·r_i − (1/k)·Σ_{j≠i} r_j, the second part independent of y_i, so the
expected gradient is ∇((k−1)/k·E[r] − β·KL) and the fixed point π_ref·exp((k−1)/k·r/β)
(``group_reward``). γ < 1 weights late rewards less: no closed form (None). Bandit-tested
(tests/losses/test_new_policy_gradients.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from losses.base import LossBatch, Objective, clip_active, moment_sums, sampler_weighted, stream_index, whiten
from losses.grpo import group_moments
from losses.kl import KLEstimator, reward_kl_estimator, token_kl
from losses.ppo import gae, token_rewards

Baseline = Literal["none", "group"]


class ReinforcePP(Objective):
    name = "reinforce_pp"
    unit = "token"
    feeds = ("online",)
    corrects_sampler = True
    needs = ("rewards",)  # per instance: ``group`` too with baseline: group

    def __init__(
        self,
        beta: float = 0.01,
        kl_estimator: KLEstimator = "k1",
        gamma: float = 1.0,
        baseline: Baseline = "none",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        whiten_advantages: bool = True,
    ):
        if baseline not in ("none", "group"):
            raise ValueError(
                f"baseline: expected 'none' (REINFORCE++) or 'group' (REINFORCE++-baseline), got {baseline!r}"
            )
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma: expected a value in [0, 1], got {gamma}")
        if baseline == "group" and gamma != 1:
            raise ValueError("gamma: REINFORCE++-baseline (baseline: group) discounts nothing; expected 1.0")
        if clip_low < 0 or clip_high < 0:
            raise ValueError("clip_low, clip_high: expected >= 0")
        self.beta, self.gamma, self.baseline = beta, float(gamma), baseline
        self.kl_estimator = reward_kl_estimator(kl_estimator)
        self.clip_low, self.clip_high = clip_low, clip_high
        self.whiten_advantages = bool(whiten_advantages)
        if baseline == "group":
            self.needs = ("rewards", "group")
            self.min_k = 2  # a group mean of one sample is the sample: no reward left to learn from

    @property
    def fixed_point(self):  # type: ignore[override]
        if self.gamma != 1:
            return None
        return "group_reward" if self.baseline == "group" else "reward"

    @property
    def sampling_logprobs(self) -> bool:
        return True  # the ratio and the per-token KL reward read π_old

    @property
    def stats_read(self) -> tuple[str, ...]:  # type: ignore[override]
        if not self.whiten_advantages:
            return ()
        return ("rewards", "old_logprobs", "ref_logprobs") + (("group",) if self.baseline == "group" else ())

    def returns(self, batch: LossBatch) -> tuple[Tensor, Tensor]:
        """(G [B, T], π_old's log-probs): the unwhitened returns of the rollout's per-token rewards."""
        old = batch.old_logprobs if batch.old_logprobs is not None else batch.logprobs.detach()
        rewards = batch.rewards if batch.rewards.dim() == 1 else batch.rewards.sum(-1)
        if self.baseline == "group":
            rewards = rewards - group_moments(rewards, batch.group)[0]
        per_token = token_rewards(rewards, old, batch.ref_logprobs, batch.mask, self.beta)
        # with no critic GAE(γ, λ = 1) is the discounted return-to-go
        return gae(per_token, torch.zeros_like(per_token), batch.mask, self.gamma, 1.0), old

    def batch_stats(self, batch: LossBatch) -> dict[str, Tensor]:
        if not self.whiten_advantages:
            return {}
        return moment_sums(self.returns(batch)[0], batch.mask, stream_index(batch))

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.mask
        advantages, old = self.returns(batch)
        if self.whiten_advantages:
            stream = stream_index(batch)
            stats = batch.stats if batch.stats else moment_sums(advantages, mask, stream)
            advantages = whiten(advantages, stats, stream) * mask
        ratio = torch.exp(batch.logprobs - old)
        clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high)
        surrogate = -torch.minimum(ratio * advantages, clipped * advantages)
        per_token = sampler_weighted(surrogate, batch) * mask
        active = clip_active(ratio.detach(), advantages, self.clip_low, self.clip_high)
        metrics = {"advantage": advantages.detach(), "clip_fraction": active.to(mask.dtype)}  # per token
        if batch.ref_logprobs is not None:
            metrics["kl"] = (token_kl(old, batch.ref_logprobs.detach(), "k1") * mask).sum(-1)
        return per_token, metrics
