"""GRPO (Shao et al. 2024, arXiv 2402.03300) and the variants asked for by name: Dr. GRPO
(Liu et al. 2025, arXiv 2503.20783) and DAPO's asymmetric clipping (Yu et al. 2025, arXiv 2503.14476).

k samples per prompt. With π_old the policy that sampled (its log-probs ``old_logprobs``; the
detached current ones when each batch gets one update, where the ratio is exactly 1):

    R_i     = r_i − β·KL_seq(y_i)                          if kl = "reward" (k1 of π_old, detached), else r_i
    A_i     = (R_i − mean_g R) / (std_g R + eps)           scale_rewards: true  (GRPO)
    A_i     =  R_i − mean_g R                              scale_rewards: false (Dr. GRPO)
    ρ_it    = exp(log π(y_it) − log π_old(y_it))
    ℓ_it    = −min(ρ_it·A_i, clip(ρ_it, 1 − clip_low, 1 + clip_high)·A_i)  [+ β·k3_it if kl = "loss"]
    L       = aggregate(ℓ, aggregation)                    (losses/aggregation.py)

mean_g and std_g (unbiased, as TRL) run over the prompt's group, the sample included. The KL in
the reward reads π_old, as TRL and verl freeze it at sampling, so the advantages are the same in
every pass of ``updates_per_batch``. ``clip_fraction`` counts the tokens whose clipped branch is
taken (ρ > 1 + clip_high with A > 0, or ρ < 1 − clip_low with A < 0), over completion tokens.

KL as a loss term uses k3 = π_ref/π − 1 − log(π_ref/π) per token: its on-policy gradient is
∇KL(π_ref ‖ π) (k1 as a loss term has zero expected gradient, so it is refused).

Fixed point (declared per instance): with kl = "reward" and scale_rewards = false, A_i is
(k−1)/k times RLOO's advantage, so the expected gradient is (k−1)/k·∇(E[r] − β·KL) and the fixed
point is π_ref·exp(r/β) (``reward``; bandit-tested). With the k3 KL as a loss term and no std
scaling (Dr. GRPO's default) the expected gradient is (k−1)/k·∇E[r] − β·∇KL(π_ref ‖ π), whose
stationary point π = β·π_ref/(λ − (k−1)/k·r) is no exponential tilt (``reverse_kl``; bandit-tested,
align/jobs/bandit/targets.py). Dividing by the group's std has no closed form (None).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from losses.aggregation import Aggregation, aggregate_tokens, aggregation_unit
from losses.base import LossBatch, Objective, clip_active, sampler_weighted, with_defaults
from losses.kl import KLEstimator, penalised_reward, token_kl


def group_moments(values: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's group mean and unbiased group std (0 for a group of one)."""
    _, inverse = torch.unique(group, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    v = values.double()
    counts = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, inverse, torch.ones_like(v))
    sums = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, inverse, v)
    mean = sums / counts
    squares = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, inverse, (v - mean[inverse]) ** 2)
    std = torch.where(counts > 1, (squares / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(counts))
    return mean[inverse].to(values.dtype), std[inverse].to(values.dtype)


def clipped_surrogate(ratio: Tensor, A: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """−min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A), and where its clipped branch is taken."""
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return -torch.minimum(ratio * A, clipped * A), clip_active(ratio.detach(), A, clip_low, clip_high)


class GRPO(Objective):
    name = "grpo"
    unit = "sequence"  # per instance: from ``aggregation``
    feeds = ("online",)
    corrects_sampler = True
    min_k = 2  # a group baseline needs another sample of the prompt
    needs = ("rewards", "group")
    # the constant of ``seq_mean_token_sum_norm``: the run's generation budget unless set
    run_defaults = {"norm_length": "max_new_tokens"}

    def __init__(
        self,
        beta: float = 0.04,
        kl: Literal["loss", "reward"] = "loss",
        kl_estimator: KLEstimator = "k3",
        scale_rewards: bool = True,
        aggregation: Aggregation = "seq_mean_token_mean",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        norm_length: int | None = None,
        eps: float = 1e-4,
    ):
        if kl not in ("loss", "reward"):
            raise ValueError(f"kl: expected 'loss' or 'reward', got {kl!r}")
        if kl == "loss" and kl_estimator != "k3":
            raise ValueError(
                "kl_estimator: as a loss term only 'k3' has a KL gradient on-policy (k1's expected "
                "gradient is zero); expected 'k3', or kl: reward with k1"
            )
        if kl == "reward" and kl_estimator != "k1":
            raise ValueError("kl_estimator: a KL in the detached reward must be 'k1'; expected 'k1'")
        if clip_low < 0 or clip_high < 0:
            raise ValueError("clip_low, clip_high: expected >= 0")
        self.unit = aggregation_unit(aggregation)
        if aggregation == "seq_mean_token_sum_norm" and norm_length is None:
            norm_length = 1  # a run fills its generation budget (run_defaults); a bandit has one token
        self.beta, self.kl, self.kl_estimator = beta, kl, kl_estimator
        self.scale_rewards, self.aggregation = scale_rewards, aggregation
        self.clip_low, self.clip_high, self.norm_length, self.eps = clip_low, clip_high, norm_length, eps

    @property
    def fixed_point(self):  # type: ignore[override]
        if self.scale_rewards:
            return None
        return "reward" if self.kl == "reward" else "reverse_kl"

    @property
    def sampling_logprobs(self) -> bool:
        return True  # ratios (and a KL in the reward) read π_old

    def advantages(self, batch: LossBatch) -> tuple[Tensor, Tensor, Tensor]:
        beta = self.beta if self.kl == "reward" else 0.0
        R, kl = penalised_reward(batch, batch.rewards, beta, "k1", "old")  # π_old's KL, fixed at sampling
        mean, std = group_moments(R, batch.group)
        advantage = R - mean
        if self.scale_rewards:
            advantage = advantage / (std + self.eps)
        return advantage, R, kl

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        advantage, R, kl = self.advantages(batch)
        old = batch.old_logprobs if batch.old_logprobs is not None else batch.logprobs.detach()
        A = advantage[:, None].to(batch.logprobs.dtype)
        surrogate, clipped = self.policy_terms(batch, old, A)
        per_token = sampler_weighted(surrogate, batch)
        metrics = {"advantage": advantage, "regularised_reward": R}
        if self.kl == "loss" and self.beta > 0 and batch.ref_logprobs is not None:
            k3 = token_kl(batch.logprobs, batch.ref_logprobs.detach(), "k3")
            per_token = per_token + self.beta * k3
            kl = (k3.detach() * batch.mask).sum(-1)
        metrics["kl"] = kl
        metrics["clip_fraction"] = clipped.to(batch.mask.dtype)
        return aggregate_tokens(per_token, batch.mask, self.aggregation, self.norm_length), metrics

    def policy_terms(self, batch: LossBatch, old: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """The policy-gradient terms −min(ρ·A, clip(ρ)·A) per token [B, T] and where the clip is
        active; GSPO and CISPO (losses/gspo.py, losses/cispo.py) replace this."""
        return clipped_surrogate(torch.exp(batch.logprobs - old), A, self.clip_low, self.clip_high)


class DrGRPO(GRPO):
    """Dr. GRPO: no std scaling and a constant length normaliser (``seq_mean_token_sum_norm``)."""

    name = "dr_grpo"
    __init__ = with_defaults(GRPO.__init__, scale_rewards=False, aggregation="seq_mean_token_sum_norm")
