"""Supervised fine-tuning: negative log-likelihood of the completion tokens.

    L = −(1/N_tokens) Σ_{i,t} mask_{i,t}·log π(y_{i,t} | x_i, y_{i,<t})

Token-level: the trainer passes the number of completion tokens in the whole optimizer step,
so long and short sequences weigh the same per token whatever the micro-batching. Unit: token.
"""

from __future__ import annotations

from torch import Tensor

from losses.base import LossBatch, Objective


class SFT(Objective):
    name = "sft"
    unit = "token"
    feeds = ("offline",)
    fixed_point = None  # trained on demonstrations, not on a reward
    reference_free = True  # a recipe naming a reference is refused: nothing would read it

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        nll = -(batch.logprobs * batch.mask)
        return nll, {"nll_per_token": nll.sum() / batch.mask.sum().clamp(min=1)}
