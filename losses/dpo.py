"""DPO (Rafailov et al. 2023) and its length-averaged form (Grinsztajn et al. 2024).

For a pair (y_w ≻ y_l) of the same prompt:

    Δ = (ℓ(y_w) − ℓ_ref(y_w)) − (ℓ(y_l) − ℓ_ref(y_l))
    L = −(1/P) Σ_pairs log σ(β·Δ)

With ``average_logprobs=True`` every ℓ (policy and reference) is the length-averaged
ℓ̄(y) = ℓ(y)/|y|, which removes DPO's pull toward longer answers (TRL's ``sigmoid_norm``).
On a bandit with Bradley–Terry labels on r its fixed point is π ∝ π_ref·exp(r/β). Unit: pair.
"""

from __future__ import annotations

from abc import abstractmethod

import torch.nn.functional as F
from torch import Tensor

from losses.base import LossBatch, Objective, sequence_logprobs


def pair_log_ratios(batch: LossBatch, pairs: Tensor, average: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Each pair's log-ratio log π/π_ref of chosen and of rejected [P], and the policy's sequence
    log-probs [B] (summed, or length-averaged with ``average``)."""
    logp = sequence_logprobs(batch.logprobs, batch.mask, average)
    ratio = logp - sequence_logprobs(batch.ref_logprobs, batch.mask, average)
    return ratio[pairs[:, 0]], ratio[pairs[:, 1]], logp


class PreferencePairs(Objective):
    """Base of DPO and IPO: a loss of each ordered pair's log-ratio margin Δ (``pair_loss``), with
    β > 0 and optional length averaging; both log the margin and the pair accuracy [Δ > 0]."""

    unit = "pair"
    feeds = ("offline",)
    needs = ("ref_logprobs",)
    paired = True
    preference = True

    def __init__(self, beta: float = 0.1, average_logprobs: bool = False):
        if beta <= 0:  # DPO's loss is log 2 whatever the policy at β = 0, IPO's target 1/(2β) infinite
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        self.beta = beta
        self.average_logprobs = average_logprobs

    @abstractmethod
    def pair_loss(self, margin: Tensor) -> Tensor:
        """The loss of each pair [P] from its margin Δ [P]."""

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = self.batch_pairs(batch)
        chosen, rejected, logp = pair_log_ratios(batch, pairs, self.average_logprobs)
        margin = chosen - rejected
        accuracy = (margin.detach() > 0).float()
        return self.pair_loss(margin), {
            "margin": margin.detach(),  # Δ, the log-ratio margin (TRL's DPO reward margin is β·Δ)
            "accuracy": accuracy,
            # TRL's DPO names: implicit rewards β·log π/π_ref, their margin and accuracy, the policy's log-probs
            "rewards/chosen": self.beta * chosen.detach(),
            "rewards/rejected": self.beta * rejected.detach(),
            "rewards/margins": self.beta * margin.detach(),
            "rewards/accuracies": accuracy,
            "logps/chosen": logp.detach()[pairs[:, 0]],
            "logps/rejected": logp.detach()[pairs[:, 1]],
        }


class DPO(PreferencePairs):
    name = "dpo"

    def pair_loss(self, margin: Tensor) -> Tensor:
        return -F.logsigmoid(self.beta * margin)
