"""The learning-rate factor of align's own small training loops (reward model, NLI model, bandit
lab); the LLM trainer uses ``transformers.get_scheduler`` with the recipe's ``lr_scheduler``.

    factor(step) = (step + 1)/W                                   for step < W (linear warm-up)
                 = f + (1 − f)·(1 − p)          linear            p = (step − W)/(N − W), clamped to 1
                 = f + (1 − f)·(1 + cos πp)/2   cosine
                 = 1                            constant

with N the total number of steps, W the warm-up steps and f the final ratio (0: decay to 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, total_steps: int, kind: Schedule, warmup_steps: int = 0, final_ratio: float = 0.0) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return final_ratio + (1 - final_ratio) * (1 - progress)
    if kind == "cosine":
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"lr schedule: expected constant, linear or cosine, got {kind!r}")


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    kind: Schedule,
    warmup_steps: int = 0,
    final_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, kind, warmup_steps, final_ratio)
    )
