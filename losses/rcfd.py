"""RCfD: Reward Calibration from Demonstration (Rita et al. 2024, arXiv 2404.19409).

Given a demonstration y_d of prompt x, the calibrated reward replaces r:

    r̃(x, y) = −Σ_c w_c (r_c(x, y) − r_c(x, y_d))²      (one term per reward component c)

and is optimised with the RLOO estimator (losses/rloo.py), optionally with β·KL. The loss takes
the component scores it is given; the trainer passes each component clipped and whitened with its
demonstrations' moments (one affine map for policy and demonstration scores), so components of
unequal scales weigh as ``weights`` say, and the weights are the recipe's ``reward[i].weight``. The policy is
pushed to *score like the demonstrations*, not to maximise the reward model, so exploiting the
reward model earns nothing. KL-regularised fixed point on a bandit:
π(a) ∝ π_ref(a)·exp(−(r(a) − r_d)²/β). The paper uses no KL (β = 0) with PPO; β > 0 is
supported here and is what makes the fixed point unique. Unit: sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses.base import LossBatch
from losses.kl import KLEstimator
from losses.rloo import RLOO


def calibrated_reward(rewards: Tensor, demo_rewards: Tensor, weights: Tensor | None = None) -> Tensor:
    diff2 = (rewards - demo_rewards) ** 2
    if diff2.dim() == 1:
        return -diff2 * (weights if weights is not None else 1.0)
    w = weights if weights is not None else torch.ones(diff2.shape[-1], dtype=diff2.dtype, device=diff2.device)
    return -(diff2 * w).sum(-1)


class RCfD(RLOO):
    name = "rcfd"
    needs = ("rewards", "group", "demo_rewards")
    fixed_point = "demo_gap"

    def __init__(self, beta: float = 0.0, kl_estimator: KLEstimator = "k1", weights: Sequence[float] | None = None):
        super().__init__(beta=beta, kl_estimator=kl_estimator)
        self.weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)

    def sequence_rewards(self, batch: LossBatch) -> Tensor:
        if batch.rewards.shape != batch.demo_rewards.shape:
            raise ValueError(
                f"rcfd: rewards {tuple(batch.rewards.shape)} and demo_rewards "
                f"{tuple(batch.demo_rewards.shape)} must have the same shape"
            )
        w = None if self.weights is None else self.weights.to(batch.rewards)
        return calibrated_reward(batch.rewards, batch.demo_rewards, w)
