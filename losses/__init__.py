"""Objectives: pure tensor maths over per-token log-probs and masks (see losses/base.py).

from losses import build
objective = build("dpo", beta=0.1, average_logprobs=True)
loss, metrics = objective(LossBatch(...), num_units=global_pairs)
"""

from __future__ import annotations

import inspect

from losses.base import LossBatch, Objective, sequence_logprobs
from losses.copg import CoPG
from losses.dpo import DPO
from losses.ipo import IPO
from losses.kl import regularised_reward, sequence_kl, token_kl
from losses.rcfd import RCfD
from losses.reinforce import Reinforce
from losses.rloo import RLOO
from losses.sft import SFT

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (Reinforce, RLOO, CoPG, DPO, IPO, RCfD, SFT)}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator to add a user objective to the registry by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def options(name: str) -> dict[str, object]:
    """The keyword options an objective accepts, with their defaults."""
    params = inspect.signature(REGISTRY[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def build(name: str, **kwargs) -> Objective:
    if name not in REGISTRY:
        raise ValueError(f"objective: unknown name {name!r}; expected one of {sorted(REGISTRY)}")
    unknown = set(kwargs) - set(options(name))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown option(s) {sorted(unknown)}; expected {sorted(options(name))}")
    return REGISTRY[name](**kwargs)


__all__ = [
    "LossBatch",
    "Objective",
    "REGISTRY",
    "build",
    "options",
    "register",
    "regularised_reward",
    "sequence_kl",
    "sequence_logprobs",
    "token_kl",
]
