"""RCfD: Reward Calibration from Demonstration (Rita et al. 2024, arXiv 2404.19409).

Given a demonstration y_d of prompt x, the calibrated reward replaces r. With one reward (their
Eq. 3):

    r̃(x, y) = −(r(x, y) − r(x, y_d))²

With several components c, each squared gap is whitened and the results weighted and summed --
"we independently recalibrate and whiten each reward before summing" (§3.2):

    g_c(y)  = −(r_c(x, y) − r_c(x, y_d))²
    r̃(x, y) = Σ_c w_c · (g_c(y) − mean g_c) / sqrt(var g_c + eps)

the moments taken over the whole rollout batch, every process (``batch_stats``; the trainer sums
them before the first optimizer step, so they are the same on every process and on resume), the
unbiased variance as PPO's batch whitening. r̃ is then optimised with the RLOO estimator
(losses/rloo.py), optionally with β·KL. The policy is pushed to *score like the demonstrations*,
not to maximise the reward model, so exploiting the reward model earns nothing. The weights are
the recipe's ``reward[i].weight`` (declared ``run_inputs``: the run supplies them).
KL-regularised fixed point on a bandit, one reward: π(a) ∝ π_ref(a)·exp(−(r(a) − r_d)²/β).
The paper uses no KL (β = 0) with PPO; β > 0 is supported here and is what makes the fixed point
unique. Unit: sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses.base import LossBatch, moment_sums, stream_index, whiten
from losses.kl import KLEstimator, KLFrom
from losses.rloo import RLOO


def squared_gaps(rewards: Tensor, demo_rewards: Tensor) -> Tensor:
    """g = −(r − r_d)², per component ([B] or [B, C])."""
    return -((rewards - demo_rewards) ** 2)


def calibrated_reward(
    rewards: Tensor,
    demo_rewards: Tensor,
    weights: Tensor | None = None,
    stats: dict[str, Tensor] | None = None,
    stream: Tensor | None = None,
) -> Tensor:
    """r̃ [B]: −w·(r − r_d)² for one reward ([B], or [B, 1]); for C > 1 components each squared
    gap whitened with ``stats`` (``moment_sums`` of the gaps; None: this batch's own) and weighted."""
    gaps = squared_gaps(rewards, demo_rewards)
    if gaps.dim() == 2 and gaps.shape[-1] == 1:
        gaps = gaps[:, 0]
    if gaps.dim() == 1:
        return gaps * (weights.reshape(()) if weights is not None else 1.0)
    stream = stream if stream is not None else torch.zeros(gaps.shape[0], dtype=torch.long, device=gaps.device)
    if stats is None:
        stats = moment_sums(gaps, torch.ones(gaps.shape[0], device=gaps.device), stream)
    w = weights if weights is not None else torch.ones(gaps.shape[-1], dtype=gaps.dtype, device=gaps.device)
    return (whiten(gaps, stats, stream) * w).sum(-1)


class RCfD(RLOO):
    name = "rcfd"
    needs = ("rewards", "group", "demo_rewards")
    fixed_point = "demo_gap"
    stats_read = ("rewards", "demo_rewards")  # several components: the gaps' whitening moments
    # it weighs the raw components itself: their weights are the reward section's, never an option
    run_inputs = {"weights": "reward_weights"}

    def __init__(
        self,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k1",
        weights: Sequence[float] | None = None,
        kl_from: KLFrom = "old",
    ):
        super().__init__(beta=beta, kl_estimator=kl_estimator, kl_from=kl_from)
        self.weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)

    def _check_shapes(self, batch: LossBatch) -> None:
        if batch.rewards.shape != batch.demo_rewards.shape:
            raise ValueError(
                f"rcfd: rewards {tuple(batch.rewards.shape)} and demo_rewards "
                f"{tuple(batch.demo_rewards.shape)} must have the same shape"
            )

    def batch_stats(self, batch: LossBatch) -> dict[str, Tensor]:
        self._check_shapes(batch)
        if batch.rewards.dim() < 2 or batch.rewards.shape[-1] < 2:
            return {}  # one reward: no whitening
        gaps = squared_gaps(batch.rewards, batch.demo_rewards)
        return moment_sums(gaps, torch.ones(batch.size, device=gaps.device), stream_index(batch))

    def sequence_rewards(self, batch: LossBatch) -> Tensor:
        self._check_shapes(batch)
        w = None if self.weights is None else self.weights.to(batch.rewards)
        return calibrated_reward(batch.rewards, batch.demo_rewards, w, batch.stats or None, stream_index(batch))
