"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585).

Where PPO and GRPO clip the ratio inside the surrogate -- a token whose ratio leaves the trust
region loses its gradient -- CISPO clips the importance weight itself and detaches it, so every
token keeps a gradient, only a bounded one. k samples per prompt, group-normalised advantages Â_i
exactly as GRPO's (losses/grpo.py: ``scale_rewards``, ``kl``), ρ_t = π(y_t)/π_old(y_t):

    w_it = sg(min(ρ_it, clip_max))                      (no lower bound)
    ℓ_it = −w_it·Â_i·log π(y_it)      [+ β·k3_it if kl = "loss"]
    L    = Σ_i Σ_t m_it·ℓ_it / Σ_i Σ_t m_it             (aggregation token_mean: the paper's 1/Σ|y_i|)

This is TRL's GRPOTrainer with ``loss_type="cispo"`` (token-level ratios): there the weight is
``clamp(coef_1, max=epsilon_high).detach()`` -- the cap is ``epsilon_high`` itself, not
1 + epsilon_high (ScaleRL's ε_max, arXiv 2510.13786; TRL recommends 5.0) -- with no lower clip,
normalised by the completion tokens of the whole accumulated batch, the KL a per-token k3 term.
``clip_max`` is that cap. The MiniMax paper writes the clip as clip(ρ, 1 − ε_low, 1 + ε_high)
with ε_low so large there is no lower bound: ``clip_max`` = 1 + its ε_high.
benchmarks/step0_policy_gradients.py checks loss and gradient against TRL's.

``clip_fraction`` is the fraction of completion tokens whose weight is capped (ρ > clip_max),
whatever the advantage's sign (TRL's ``cispo_clip_ratio`` counts only those with Â > 0).

Fixed point: on-policy ρ = 1 and w = min(1, clip_max) on every token, a positive constant, so the
gradient is GRPO's times w: the same fixed points as GRPO with the same options (``reward`` with
kl = "reward" and no std scaling, ``reverse_kl`` with a k3 loss term and no std scaling), except
a cap below 1 with a KL loss term, which scales the reward against β (declared None).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from losses.aggregation import Aggregation
from losses.base import LossBatch
from losses.grpo import GRPO
from losses.kl import KLEstimator


class CISPO(GRPO):
    name = "cispo"

    def __init__(
        self,
        beta: float = 0.0,
        kl: Literal["loss", "reward"] = "loss",
        kl_estimator: KLEstimator = "k3",
        scale_rewards: bool = True,
        aggregation: Aggregation = "token_mean",
        clip_max: float = 5.0,
        norm_length: int | None = None,
        eps: float = 1e-4,
    ):
        if not clip_max > 0:
            raise ValueError(
                f"clip_max: expected the cap on the importance weight, > 0 (TRL recommends 5.0), got {clip_max}"
            )
        super().__init__(beta, kl, kl_estimator, scale_rewards, aggregation, 0.0, 0.0, norm_length, eps)
        self.clip_max = float(clip_max)

    @property
    def fixed_point(self):  # type: ignore[override]
        if self.clip_max < 1 and self.kl == "loss" and self.beta > 0:
            return None  # on-policy every weight is clip_max < 1: the reward shrinks against β·KL
        return super().fixed_point

    def policy_terms(self, batch: LossBatch, old: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """−sg(min(ρ, clip_max))·A·log π per token, and where the weight is capped."""
        ratio = torch.exp(batch.logprobs.detach() - old)
        weight = torch.clamp(ratio, max=self.clip_max)
        return -weight * A * batch.logprobs, ratio > self.clip_max
