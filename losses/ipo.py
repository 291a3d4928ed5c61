"""IPO (Azar et al. 2023, arXiv 2310.12036), with optional length averaging.

    Δ = (ℓ(y_w) − ℓ_ref(y_w)) − (ℓ(y_l) − ℓ_ref(y_l))
    L = (1/P) Σ_pairs (Δ − 1/(2β))²

With pairs drawn from μ and labels from a preference model p, the fixed point is
π(a) ∝ π_ref(a)·exp(p(a ≻ μ)/β), p(a ≻ μ) = E_{a′~μ} p(a ≻ a′). ``average_logprobs=True``
uses ℓ̄(y) = ℓ(y)/|y| for policy and reference (TRL's IPO averages by default). Unit: pair.
"""

from __future__ import annotations

from torch import Tensor

from losses.dpo import PreferencePairs


class IPO(PreferencePairs):
    name = "ipo"
    fixed_point = "preference"

    def pair_loss(self, margin: Tensor) -> Tensor:
        return (margin - 1 / (2 * self.beta)) ** 2
