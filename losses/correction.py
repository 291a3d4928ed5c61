"""Sampler-mismatch correction: importance weights between the policy the trainer computes, π_old,
and the engine that drew the samples, π_engine (vLLM's kernels, precision or stale weights make the
two differ even when they hold the same weights). TRL's ``vllm_importance_sampling_*``, verl's
rollout correction (TIS, MIS). With δ_t = log π_old(y_t) − log π_engine(y_t) over completion tokens:

    token:     w_t = exp(δ_t)                      each token its own weight
    sequence:  w_t = exp(Σ_s δ_s)                  one weight for every token of the sequence
    truncate:  w  ← clamp(w, C_min, C_max)         (TIS; C_min: none unless given)
    mask:      w  ← w · 1[C_min ≤ w ≤ C_max]       (MIS; C_min 0 unless given)

The weights are detached and multiply each policy-gradient term (an objective that takes them says
so: ``Objective.corrects_sampler``); a KL term is not weighted (it is the trainer's own quantity).
Logged: the mean ratio before truncation or masking (``is_ratio_mean``: 1 when engine and trainer
agree), the fraction of weights truncated or masked (``is_clipped_fraction``), k3 = w − 1 − log w per
token (``engine_kl``), which estimates KL(π_engine ‖ π_old) since the tokens were drawn from π_engine,
and the mean |δ_t| (``engine_logprob_diff``, TRL's ``sampling_logp_difference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_MAX_LOG_RATIO = 60.0  # exp of a long sequence's summed δ overflows float32 past ~88


@dataclass(frozen=True)
class Correction:
    mode: Mode = "sequence_mask"
    clip_max: float = 3.0
    clip_min: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {self.mode!r}")
        if not self.clip_max > 0 or (self.clip_min is not None and not 0 <= self.clip_min <= self.clip_max):
            raise ValueError(f"expected 0 <= clip_min <= clip_max, clip_max > 0; got {self.clip_min}, {self.clip_max}")

    def weights(
        self, old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, tuple[float, float]]]:
        """The weights [B, T] (0 off the completion) and the metrics as (sum, count)."""
        mask = mask.to(old_logprobs.dtype)
        delta = (old_logprobs.detach() - sampler_logprobs.to(old_logprobs.dtype)) * mask
        sequence = self.mode.startswith("sequence")
        log_ratio = delta.sum(-1, keepdim=True) if sequence else delta
        ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
        if self.mode.endswith("truncate"):
            weight = ratio.clamp(min=self.clip_min, max=self.clip_max)
        else:
            low = 0.0 if self.clip_min is None else self.clip_min
            weight = ratio * ((ratio >= low) & (ratio <= self.clip_max)).to(ratio.dtype)
        changed = (weight != ratio).to(ratio.dtype)
        tokens = float(mask.sum())
        # the ratio's own units: one per sequence that has tokens, or every completion token
        units = (mask.sum(-1, keepdim=True) > 0).to(ratio.dtype) if sequence else mask
        ratio_sum, changed_sum = float((ratio * units).sum()), float((changed * units).sum())
        token_ratio = torch.exp(delta.clamp(max=_MAX_LOG_RATIO))
        k3 = (token_ratio - 1 - delta) * mask
        metrics = {
            "is_ratio_mean": (ratio_sum, float(units.sum())),
            "is_clipped_fraction": (changed_sum, float(units.sum())),
            "engine_kl": (float(k3.sum()), tokens),
            "engine_logprob_diff": (float((delta.abs() * mask).sum()), tokens),  # TRL's sampling_logp_difference
        }
        return (weight * mask).detach(), metrics
