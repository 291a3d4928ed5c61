"""How per-token loss terms become the units an objective is normalised by (losses/base.py).

The three aggregations GRPO-family papers and TRL / verl name, for per-token terms ℓ_t and masks m_t:

    token_mean               unit token:     Σ_i Σ_t m_it·ℓ_it / Σ_i Σ_t m_it          (DAPO; TRL "dapo")
    seq_mean_token_mean      unit sequence:  (1/N) Σ_i [Σ_t m_it·ℓ_it / Σ_t m_it]      (GRPO paper)
    seq_mean_token_sum_norm  unit sequence:  (1/N) Σ_i [Σ_t m_it·ℓ_it / L]             (Dr. GRPO; L constant)

The denominators N and Σ m are the contract's global unit counts, so each aggregation is the same
over micro-batches and processes as over one batch. ``seq_mean_token_mean`` weights a long
completion's tokens less (the length bias Dr. GRPO removes); ``seq_mean_token_sum_norm`` divides
by a constant ``L`` (the generation budget), which leaves the gradient direction of the sum.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregation_unit(aggregation: str) -> Literal["token", "sequence"]:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {list(AGGREGATIONS)}, got {aggregation!r}")
    return "token" if aggregation == "token_mean" else "sequence"


def aggregate_tokens(per_token: Tensor, mask: Tensor, aggregation: str, norm_length: float | None = None) -> Tensor:
    """Per-unit terms whose sum, divided by the global unit count, is the aggregated loss:
    [B, T] masked terms for ``token_mean``, [B] per-sequence terms otherwise."""
    masked = per_token * mask
    if aggregation == "token_mean":
        return masked
    if aggregation == "seq_mean_token_mean":
        return masked.sum(-1) / mask.sum(-1).clamp(min=1)
    if aggregation == "seq_mean_token_sum_norm":
        if not norm_length or norm_length <= 0:
            raise ValueError("seq_mean_token_sum_norm: norm_length must be a positive constant (the generation budget)")
        return masked.sum(-1) / float(norm_length)
    raise ValueError(f"aggregation: expected one of {list(AGGREGATIONS)}, got {aggregation!r}")
