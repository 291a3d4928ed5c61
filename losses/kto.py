"""KTO: Kahneman–Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), TRL's
KTOTrainer with ``loss_type="kto"``.

Unpaired rows (x, y, label): the label says whether y is a desirable answer to x (TRL's unpaired
preference format; ``rewards`` holds it, 1 desirable / 0 undesirable). With summed log-probs:

    r(x, y) = ℓ(y | x) − ℓ_ref(y | x)
    z₀      = max(0, mean_i [ℓ(y′_i | x_i) − ℓ_ref(y′_i | x_i)])       (detached)
    L_i     = λ_D·(1 − σ(β·(r_i − z₀)))   if y_i is desirable
              λ_U·(1 − σ(β·(z₀ − r_i)))   if not
    L       = (1/B) Σ_i L_i

z₀ is the reference point: an estimate of KL(π ‖ π_ref) from MISMATCHED pairs (x_i, y′_i) -- the
prompt of one row with the completion of another -- so that it measures how far the policy has
moved on answers that are not to the point, and carries no gradient (Eq. 7 and §3.2 of the paper).
The trainer builds y′_i as TRL does, rotating the completions by one (row i takes the completion of
row i − 1, the first row the last's), and gives the loss the policy's (no grad) and the reference's
sequence log-probs of them (``mismatched_logprobs``, ``mismatched_ref_logprobs``).

z₀ follows the contract: it is ONE number for the optimizer step, the mean over every row of the
step -- all micro-batches, all processes -- through ``batch_stats`` (the trainer sums them before the
first micro-batch), and the rotation runs over the whole step's rows, so gradient accumulation and
data parallelism change nothing. TRL instead estimates z₀ per micro-batch (its batch mean, averaged
over processes with ``gather_for_metrics``), from completions rotated within each micro-batch (it
rotates chunks of ``per_device_train_batch_size`` dataset rows and requires a sequential sampler),
so with gradient accumulation or several processes its z₀ varies between micro-batches of one step.
At step 0 with one micro-batch on one process, given the same rotated completions, the two coincide
(benchmarks/step0_direct_alignment.py: loss and gradient equal to fp32 rounding).

Options are TRL's: ``beta`` (the scale of the value function's argument, which also makes the
reference count: β > 0), ``desirable_weight`` λ_D and ``undesirable_weight`` λ_U (the paper
suggests λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]). Unit: sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.base import LossBatch, Objective, moment_sums, sequence_logprobs, stream_index


class KTO(Objective):
    name = "kto"
    unit = "sequence"
    feeds = ("offline",)
    needs = ("ref_logprobs", "rewards", "mismatched_logprobs", "mismatched_ref_logprobs")
    stats_read = ("mismatched_logprobs", "mismatched_ref_logprobs")  # z₀: the mean over the whole step
    fixed_point = None  # unpaired rows: the lab has no bandit form of them

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        if not beta > 0:
            raise ValueError(f"kto: beta must be > 0, got {beta}")
        for option, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not value >= 0:
                raise ValueError(f"kto: {option} must be >= 0, got {value}")
        self.beta = float(beta)
        self.desirable_weight, self.undesirable_weight = float(desirable_weight), float(undesirable_weight)

    def batch_stats(self, batch: LossBatch) -> dict[str, Tensor]:
        """Σ_i (ℓ(y′_i|x_i) − ℓ_ref(y′_i|x_i)) and the row count, per stream (float64)."""
        kl = batch.mismatched_logprobs.detach() - batch.mismatched_ref_logprobs.detach()
        return moment_sums(kl, torch.ones_like(kl), stream_index(batch))

    def reference_point(self, batch: LossBatch) -> Tensor:
        """z₀ of each row [B]: max(0, the mean mismatched log-ratio of its stream's whole step)."""
        stats = batch.stats if batch.stats else self.batch_stats(batch)
        z0 = (stats["sum"] / stats["count"].clamp(min=1)).clamp(min=0)
        return z0[stream_index(batch)].to(batch.logprobs.dtype)

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch.rewards if batch.rewards.dim() == 1 else batch.rewards.sum(-1)
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("kto: rewards must be the rows' labels, 1 (desirable) or 0 (undesirable)")
        desirable = labels == 1
        logp = sequence_logprobs(batch.logprobs, batch.mask)
        ratio = logp - sequence_logprobs(batch.ref_logprobs, batch.mask)
        z0 = self.reference_point(batch)
        chosen = self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - z0)))
        rejected = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - ratio)))
        rewards = self.beta * ratio.detach()
        return torch.where(desirable, chosen, rejected), {
            "kl": z0[:1],  # TRL's name for z₀ (one value per step; the first row's stream)
            "rewards/chosen": rewards[desirable],  # TRL's: β·(ℓ − ℓ_ref) of each side's rows
            "rewards/rejected": rewards[~desirable],
            "logps/chosen": logp.detach()[desirable],
            "logps/rejected": logp.detach()[~desirable],
        }
