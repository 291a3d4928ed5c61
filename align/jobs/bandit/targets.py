"""Analytic fixed points: every one is π(y) ∝ π_ref(y)·exp(f(outcome)/β) for a tilt f.

| objective                                    | f(y)                                       |
|----------------------------------------------|--------------------------------------------|
| reinforce, rloo (k1 KL), copg (any μ), dpo   | r(y)                                       |
| ipo, pairs y ~ μ1, y′ ~ μ2, Bradley–Terry    | β·g(y), g the least-squares solution below |
|   ... with μ1 = μ2 = μ                       | p(y ≻ μ) = E_{y′~μ} σ(r(y) − r(y′))        |
| rcfd with demonstration reward r_d           | −(r(y) − r_d)²                             |
| dr_grpo / grpo (no std) with k3 KL as a loss | β·log(π/π_ref), π the reverse-KL point below |
| reinforce_pp with baseline: group (k1 KL)    | (k−1)/k·r(y)                               |

IPO: its population loss is E_{μ1⊗μ2}[(g(y) − g(y′) − t(y, y′))²] + const with g = log π/π_ref
and t = (2σ(r(y) − r(y′)) − 1)/(2β): a weighted least-squares problem in g, whose solution for
μ1 = μ2 is g = p(y ≻ μ)/β + const (Azar et al. 2023). When pairs come from the policy itself
the fixed point is self-consistent (μ = π) and is found by damped iteration.

Length-averaged DPO/IPO on sequences have no closed form (``None``); on a bandit (T = 1) they
equal the summed losses.

Mean-centred group advantages (A_i = r_i − mean_g r, the sample included) have expected gradient
c·∇E_π[r] with c = (k−1)/k, and a k3 KL loss term has on-policy gradient ∇KL(π_ref ‖ π): the
stationary point of c·E_π[r] − β·KL(π_ref ‖ π) is π(y) = β·π_ref(y)/(λ − c·r(y)), λ > c·max r
fixing Σπ = 1 (found by bisection) -- not an exponential tilt, so it is written as f = β·log(π/π_ref).

KL to a target is exact: KL(π‖π_t) = KL(π‖π_ref) − E_π[f]/β + log E_{π_ref}[exp(f/β)].
"""

from __future__ import annotations

import torch
from torch import Tensor


def tilt_law(ref_law: Tensor, f: Tensor, beta: float) -> Tensor:
    """The law of π_ref·exp(f/β)/Z over outcomes."""
    return torch.softmax(ref_law.log() + f / beta, -1)


def log_partition(ref_law: Tensor, f: Tensor, beta: float) -> Tensor:
    return torch.logsumexp(ref_law.log() + f / beta, -1)


def kl_to_tilt(kl_to_ref: Tensor, law: Tensor, ref_law: Tensor, f: Tensor, beta: float) -> Tensor:
    """KL(π‖π_ref·exp(f/β)/Z) from KL(π‖π_ref) ``[S]`` and π's outcome law ``[S, X]``."""
    return kl_to_ref - (law * f).sum(-1) / beta + log_partition(ref_law, f, beta)


def ipo_tilt(rewards: Tensor, mu1: Tensor, mu2: Tensor, beta: float) -> Tensor:
    """f = β·g for IPO with pairs y ~ mu1, y′ ~ mu2 and Bradley–Terry labels on ``rewards``."""
    r = rewards.double()
    t = (2 * torch.sigmoid(r[:, None] - r[None, :]) - 1) / (2 * beta)  # t[y, y'], antisymmetric
    w = mu1.double()[:, None] * mu2.double()[None, :]
    w = w + w.T  # the pair (y, y') constrains g_y − g_y' whichever slot each came from
    laplacian = torch.diag(w.sum(1)) - w
    rhs = (w * t).sum(1)
    g = torch.linalg.lstsq(laplacian, rhs[:, None], driver="gelsd").solution[:, 0]
    return beta * (g - g.mean())


def ipo_self_consistent(rewards: Tensor, ref_law: Tensor, beta: float, iters: int = 20000) -> Tensor:
    """f with pairs from the policy itself: π = π_ref·exp(p(·≻π)/β)/Z, by damped iteration."""
    r = rewards.double()
    pref = torch.sigmoid(r[:, None] - r[None, :])
    law = ref_law.double()
    for _ in range(iters):
        new = tilt_law(ref_law.double(), pref @ law, beta)
        if torch.allclose(new, law, atol=1e-13, rtol=0):
            break
        law = 0.9 * law + 0.1 * new
    return pref @ law


def reverse_kl_tilt(rewards: Tensor, ref_law: Tensor, beta: float, scale: float) -> Tensor:
    """f = β·log(π/π_ref) for π the maximiser of scale·E_π[r] − β·KL(π_ref ‖ π)."""
    r, ref = scale * rewards.double(), ref_law.double()
    lo = float(r.max()) + 1e-300  # Σπ decreases in λ from +∞ (λ ↓ max r) to 0
    hi = float(r.max()) + beta * 2.0
    while float((beta * ref / (hi - r)).sum()) > 1:
        hi = lo + 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((beta * ref / (mid - r)).sum()) > 1:
            lo = mid
        else:
            hi = mid
    law = beta * ref / (0.5 * (lo + hi) - r)
    law = law / law.sum()
    return beta * (law.log() - ref.log())


def target_tilt(
    fixed_point: str | None,
    averaged: bool,
    sequence: bool,
    rewards: Tensor,
    ref_law: Tensor,
    beta: float,
    demo_reward: float,
    pair_laws: tuple[Tensor, Tensor] | None,
    k: int = 2,
) -> Tensor | None:
    """The tilt f of an objective's fixed point over outcomes, or None when there is no closed form.

    ``fixed_point`` is the objective's declaration (``losses.base.FixedPoint``); ``pair_laws`` =
    (law of y, law of y′) of the sampler's pairs, or None when pairs come from the policy; ``k``
    the samples per prompt (mean-centred group advantages scale the reward by (k−1)/k).
    """
    if fixed_point is None or (averaged and sequence):
        return None
    r = rewards.double()
    if fixed_point == "demo_gap":
        return -((r - demo_reward) ** 2)
    if fixed_point == "preference":
        if pair_laws is None:
            return ipo_self_consistent(r, ref_law, beta)
        return ipo_tilt(r, pair_laws[0], pair_laws[1], beta)
    if fixed_point == "reward":
        return r
    if fixed_point == "group_reward":
        return (k - 1) / k * r
    if fixed_point == "reverse_kl":
        # per-token k3 averaged per sequence is not the sequence KL(π_ref ‖ π): a bandit only
        return None if sequence else reverse_kl_tilt(r, ref_law, beta, (k - 1) / k)
    raise ValueError(
        f"fixed_point: expected 'reward', 'demo_gap', 'preference', 'reverse_kl', 'group_reward' or None, "
        f"got {fixed_point!r}"
    )
