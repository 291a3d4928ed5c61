"""Online DPO (Guo et al. 2024, arXiv 2402.04792): the DPO loss on pairs the policy samples each step.

k ≥ 2 completions of each prompt are sampled from the current policy and scored by the run's
reward; every two completions (i, j) of a prompt form a pair, ordered by that reward:

    (y_w, y_l) = (y_i, y_j) if r_i > r_j, (y_j, y_i) if r_j > r_i
    Δ          = (ℓ(y_w) − ℓ_ref(y_w)) − (ℓ(y_l) − ℓ_ref(y_l))        (ℓ̄ with ``average_logprobs``)
    L          = (1/P) Σ_pairs −log σ(β·Δ)                           loss_type "sigmoid" (DPO)
    L          = (1/P) Σ_pairs (Δ − 1/(2β))²                          loss_type "ipo"

A pair whose rewards tie carries no preference: ``ties: drop`` (default) leaves it out of the loss
and of P; ``ties: first`` keeps it with the first sample as y_w -- TRL's OnlineDPOTrainer rule
(``first_half >= second_half``), with which this loss equals TRL's at k = 2 (TRL samples exactly
two). TRL scores its log-probs at temperature 1 whatever it samples at; align's online objectives
score at the sampling temperature (at T = 1 the two agree).

No closed-form fixed point: with a deterministic judge the best completion wins every pair it is
in, so the loss pushes its log-ratio above every other's without bound -- the policy concentrates
on the best arm whatever β, the KL-regularised tilt π_ref·exp(r/β) is not a stationary point (the
bandit lab shows it). A stochastic (Bradley–Terry) judge would restore DPO's fixed point; the lab's
``dpo`` with ``sampler: policy`` is that case. Unit: pair.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.base import LossBatch, pairs_within_groups
from losses.dpo import PreferencePairs


class OnlineDPO(PreferencePairs):
    """DPO's (and IPO's) pair loss and TRL's metric names (``PreferencePairs``) on the policy's own
    samples, each pair ordered by reward here rather than by the data."""

    name = "online_dpo"
    feeds = ("online",)
    min_k = 2  # a pair needs two samples of the prompt
    needs = ("rewards", "ref_logprobs", "group")
    preference = False  # the loss orders its pairs by reward itself (``batch_pairs``)
    fixed_point = None

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        average_logprobs: bool = False,
        ties: Literal["drop", "first"] = "drop",
    ):
        super().__init__(beta, average_logprobs)
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"online_dpo: loss_type: expected 'sigmoid' or 'ipo', got {loss_type!r}")
        if ties not in ("drop", "first"):
            raise ValueError(f"online_dpo: ties: expected 'drop' or 'first', got {ties!r}")
        self.loss_type, self.ties = loss_type, ties

    def batch_pairs(self, batch: LossBatch) -> Tensor:
        """The batch's pairs (given, or every two rows of a group), each as (preferred, dispreferred)
        by reward; ties dropped or kept in order (``ties``)."""
        pairs = batch.pairs if batch.pairs is not None else pairs_within_groups(batch.group)
        first, second = batch.rewards[pairs[:, 0]], batch.rewards[pairs[:, 1]]
        swap = second > first
        ordered = torch.where(swap[:, None], pairs.flip(1), pairs)
        return ordered if self.ties == "first" else ordered[first != second]

    def pair_loss(self, margin: Tensor) -> Tensor:
        if self.loss_type == "sigmoid":
            return -F.logsigmoid(self.beta * margin)
        return (margin - 1 / (2 * self.beta)) ** 2

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = super().terms(batch)
        pairs = self.batch_pairs(batch)
        # TRL's OnlineDPOTrainer name: the judge's margin between the two sides of each pair
        metrics["objective/scores_margin"] = (batch.rewards[pairs[:, 0]] - batch.rewards[pairs[:, 1]]).detach()
        return loss, metrics
