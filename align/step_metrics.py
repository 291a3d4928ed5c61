"""A step's metrics, merged exactly over micro-batches, mini-batches and processes.

Every metric travels as a (sum, count) pair -- an objective's from ``Objective.evaluate``
(losses/base.py), the sequences' from ``sequence_sums`` -- and is divided once, after the pairs of
every micro-batch of the step's last pass and of every process have been added (one all-reduce).
A process holding three times the tokens of another then weighs three times as much, as it does
in one process on the same rows. ``loss`` and ``tokens`` are totals, not means."""

from __future__ import annotations

import math

import torch
from torch import Tensor

import losses
from losses import LossBatch

Sums = dict[str, list[float]]  # name -> [numerator, count]
TOTALS = ("loss", "tokens")  # reported as sums over the step, not means
# where a step's time went, logged every step (training_s: the policy's forward, backward and optimizer)
PHASES = ("generation_s", "scoring_s", "reference_s", "training_s")
# a step's wall-clock measurements: every other logged number is a function of the run's inputs
TIMINGS = frozenset({"step_s", "tokens_per_s", *PHASES, "async_wait_s", "generator_wait_s"})


def add_sums(into: Sums, new: dict[str, tuple[float, float]], weight: float = 1.0) -> None:
    """Add ``new``'s pairs to ``into``; ``weight`` 0 registers the names only (a placeholder
    micro-batch still runs, and every process must reduce the same names)."""
    for key, (total, count) in new.items():
        acc = into.setdefault(key, [0.0, 0.0])
        acc[0] += weight * total
        acc[1] += weight * count


def sequence_sums(full: LossBatch, offline_pairs: bool) -> dict[str, tuple[float, float]]:
    """Reward, KL (k1, k3), entropy proxy and length of a step's sequences, as (sum, count)."""
    mask = full.mask.double()
    rows = float(mask.shape[0])
    lengths = mask.sum(-1)
    out = {"completion_length": (float(lengths.sum()), rows), "tokens": (float(mask.sum()), 0.0)}
    if full.rewards is not None:
        r = (full.rewards if full.rewards.dim() == 1 else full.rewards.sum(-1)).double()
        out["reward_mean"] = (float(r.sum()), rows)
        out["reward_sq"] = (float((r * r).sum()), rows)  # for reward_std
        if full.group is not None and r.numel():
            out["frac_reward_zero_std"] = zero_std_groups(r, full.group)
    if full.ref_logprobs is not None and offline_pairs:
        # offline rows are not samples of the policy: their log-ratio is not a KL estimate
        out["log_ratio"] = (float(((full.logprobs - full.ref_logprobs) * full.mask).sum()), rows)
    elif full.ref_logprobs is not None:
        out["kl_k1"] = (float(losses.sequence_kl(full.logprobs, full.ref_logprobs, full.mask, "k1").sum()), rows)
        out["kl_k3"] = (float(losses.sequence_kl(full.logprobs, full.ref_logprobs, full.mask, "k3").sum()), rows)
    # −mean log π(y_t) of sampled tokens: a Monte-Carlo estimate of the per-token entropy
    out["entropy"] = (float(-(full.logprobs.double() * mask).sum()), float(mask.sum()))
    return out


def zero_std_groups(rewards: Tensor, group: Tensor) -> tuple[float, float]:
    """TRL's ``frac_reward_zero_std`` as (sum, count): the groups (a prompt's samples) whose rewards
    are all equal -- no learning signal for a group baseline -- over the groups."""
    _, which = torch.unique(group, return_inverse=True)
    n = int(which.max()) + 1
    low = torch.full((n,), float("inf"), dtype=rewards.dtype, device=rewards.device)
    low = low.scatter_reduce(0, which, rewards, "amin")
    high = torch.full((n,), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    high = high.scatter_reduce(0, which, rewards, "amax")
    return float((low == high).sum()), float(n)


def finish(sums: Sums, accelerator) -> dict[str, float]:
    """Add every process's pairs (one all-reduce, names in a fixed order) and divide once."""
    names = sorted(sums)
    if accelerator.num_processes > 1 and names:
        flat = torch.tensor([v for n in names for v in sums[n]], dtype=torch.float64, device=accelerator.device)
        flat = accelerator.reduce(flat, reduction="sum").cpu().tolist()
        sums = {n: flat[2 * i : 2 * i + 2] for i, n in enumerate(names)}
    out: dict[str, float] = {}
    for name in names:
        total, count = sums[name]
        if name in TOTALS:
            out[name] = total
        elif name != "reward_sq" and count > 0:
            out[name] = total / count
    if "reward_sq" in sums and "reward_mean" in out:
        total_sq, n = sums["reward_sq"]
        var = (total_sq - n * out["reward_mean"] ** 2) / (n - 1) if n > 1 else 0.0
        out["reward_std"] = math.sqrt(max(var, 0.0))
    return out
