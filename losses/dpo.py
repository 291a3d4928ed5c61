"""DPO (Rafailov et al. 2023) and its length-averaged form (Grinsztajn et al. 2024).

For a pair (y_w ≻ y_l) of the same prompt:

    Δ = (ℓ(y_w) − ℓ_ref(y_w)) − (ℓ(y_l) − ℓ_ref(y_l))
    L = −(1/P) Σ_pairs log σ(β·Δ)

With ``average_logprobs=True`` every ℓ (policy and reference) is the length-averaged
ℓ̄(y) = ℓ(y)/|y|, which removes DPO's pull toward longer answers (TRL's ``sigmoid_norm``).
On a bandit with Bradley–Terry labels on r its fixed point is π ∝ π_ref·exp(r/β). Unit: pair.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses.base import LossBatch, Objective, sequence_logprobs


def pair_log_ratio_margin(batch: LossBatch, pairs: Tensor, average: bool) -> Tensor:
    """Δ per pair: [P]."""
    logp = sequence_logprobs(batch.logprobs, batch.mask, average)
    ref = sequence_logprobs(batch.ref_logprobs, batch.mask, average)
    ratio = logp - ref
    return ratio[pairs[:, 0]] - ratio[pairs[:, 1]]


class DPO(Objective):
    name = "dpo"
    unit = "pair"
    feeds = ("offline",)
    needs = ("ref_logprobs",)
    paired = True
    preference = True

    def __init__(self, beta: float = 0.1, average_logprobs: bool = False):
        if beta <= 0:  # β = 0 makes the loss log 2 whatever the policy: nothing would train
            raise ValueError(f"dpo: beta must be > 0, got {beta}")
        self.beta = beta
        self.average_logprobs = average_logprobs

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        margin = pair_log_ratio_margin(batch, self.batch_pairs(batch), self.average_logprobs)
        return -F.logsigmoid(self.beta * margin), {
            "margin": margin.detach(),  # Δ, the log-ratio margin, as IPO logs it (TRL's reward margin is β·Δ)
            "accuracy": (margin.detach() > 0).float(),
        }
