"""IPO (Azar et al. 2023, arXiv 2310.12036), with optional length averaging.

    Δ = (ℓ(y_w) − ℓ_ref(y_w)) − (ℓ(y_l) − ℓ_ref(y_l))
    L = (1/P) Σ_pairs (Δ − 1/(2β))²

With pairs drawn from μ and labels from a preference model p, the fixed point is
π(a) ∝ π_ref(a)·exp(p(a ≻ μ)/β), p(a ≻ μ) = E_{a′~μ} p(a ≻ a′). ``average_logprobs=True``
uses ℓ̄(y) = ℓ(y)/|y| for policy and reference (TRL's IPO averages by default). Unit: pair.
"""

from __future__ import annotations

from torch import Tensor

from losses.base import LossBatch, Objective
from losses.dpo import pair_log_ratio_margin


class IPO(Objective):
    name = "ipo"
    unit = "pair"
    feeds = ("offline",)
    needs = ("ref_logprobs",)
    paired = True
    preference = True
    fixed_point = "preference"

    def __init__(self, beta: float = 0.1, average_logprobs: bool = False):
        if beta <= 0:
            raise ValueError(f"ipo: beta must be > 0, got {beta}")
        self.beta = beta
        self.average_logprobs = average_logprobs

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        margin = pair_log_ratio_margin(batch, self.batch_pairs(batch), self.average_logprobs)
        return (margin - 1 / (2 * self.beta)) ** 2, {
            "margin": margin.detach(),
            "accuracy": (margin.detach() > 0).float(),
        }
