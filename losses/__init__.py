"""Objectives: pure tensor maths over per-token log-probs and masks (see losses/base.py).

from losses import build
objective = build("dpo", beta=0.1, average_logprobs=True)
loss, metrics = objective(LossBatch(...), num_units=global_pairs)
"""

from __future__ import annotations

import inspect

from losses.base import LossBatch, Objective, sequence_logprobs
from losses.bradley_terry import bradley_terry_loss
from losses.cispo import CISPO
from losses.copg import CoPG
from losses.dpo import DPO
from losses.grpo import GRPO, DrGRPO
from losses.gspo import GSPO
from losses.ipo import IPO
from losses.kl import regularised_reward, sequence_kl, token_kl
from losses.kto import KTO
from losses.online_dpo import OnlineDPO
from losses.orpo import ORPO
from losses.ppo import PPO
from losses.rcfd import RCfD
from losses.reinforce import Reinforce
from losses.reinforce_pp import ReinforcePP
from losses.rloo import RLOO
from losses.sft import SFT
from losses.simpo import SimPO
from losses.vanilla_pg import VanillaPG

REGISTRY: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        Reinforce,
        RLOO,
        VanillaPG,
        PPO,
        GRPO,
        DrGRPO,
        GSPO,
        CISPO,
        ReinforcePP,
        CoPG,
        DPO,
        IPO,
        SimPO,
        ORPO,
        KTO,
        RCfD,
        SFT,
        OnlineDPO,
    )
}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator to add a user objective to the registry by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def options(name: str) -> dict[str, object]:
    """The keyword options an objective accepts, with their defaults."""
    params = inspect.signature(REGISTRY[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def check_options(name: str, kwargs: dict[str, object]) -> None:
    """Unknown names and options are a ValueError naming what is allowed (the one place that checks)."""
    if name not in REGISTRY:
        raise ValueError(f"objective: unknown name {name!r}; expected one of {sorted(REGISTRY)}")
    allowed = options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; expected {sorted(allowed)}")


def build(name: str, **kwargs) -> Objective:
    """The objective ``name`` with its options; its constructor checks their values."""
    check_options(name, kwargs)
    return REGISTRY[name](**kwargs)


__all__ = [
    "bradley_terry_loss",
    "LossBatch",
    "Objective",
    "REGISTRY",
    "build",
    "check_options",
    "options",
    "register",
    "regularised_reward",
    "sequence_kl",
    "sequence_logprobs",
    "token_kl",
]
