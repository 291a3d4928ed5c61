"""The numbers of an over-optimization study (Gao, Schulman & Hilton 2022, arXiv 2210.10760).

With d = √KL(π‖π_ref) and R the gold reward measured relative to the initial policy's:

    RL:          R(d) = d·(α − γ·log d)      peak at d* = exp(α/γ − 1), R(d*) = γ·d*   (γ > 0)
    best-of-n:   R(d) = d·(α − γ·d)          peak at d* = α/(2γ),       R(d*) = α²/(4γ) (γ > 0)

Both forms are linear in (α, γ), so the fits are ordinary least squares with columns
[d, −d·log d] (d·log d → 0 as d → 0) and [d, −d²]. Best-of-n selects, out of n samples of
π_ref, the one the proxy scores highest; its KL to π_ref is exactly log n − (n−1)/n.

Divergence of proxy and gold (``divergence``): the first checkpoint from which the gold never
gets back above its value (for a curve that rises then falls, the gold's peak) -- provided the
gold at the last checkpoint is below it while the proxy at the last checkpoint is above its
value there: after that checkpoint, optimising the proxy further only costs gold.

RCfD's own metric (Rita et al. 2024), ``histogram_kl``: how far the distribution of the policy's
proxy rewards is from the demonstrations' (a policy that scores like the demonstrations: ~0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _least_squares(columns: list[np.ndarray], target: np.ndarray) -> tuple[float, float]:
    design = np.stack(columns, axis=1)
    (a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(a), float(b)


def _xlogx(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


def gao_rl(d: Sequence[float] | np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """R(d) = d·(α − γ·log d), with R(0) = 0."""
    d = np.asarray(d, dtype=float)
    return alpha * d - gamma * _xlogx(d)


def gao_bon(d: Sequence[float] | np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """R(d) = d·(α − γ·d)."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - gamma * d)


def fit_gao_rl(d: Sequence[float], gold: Sequence[float]) -> dict[str, float | None]:
    """Least-squares α, γ of R(d) = d(α − γ log d) and the peak they imply (None if γ ≤ 0)."""
    d_arr, r_arr = np.asarray(d, dtype=float), np.asarray(gold, dtype=float)
    alpha, gamma = _least_squares([d_arr, -_xlogx(d_arr)], r_arr)
    out: dict[str, float | None] = {"alpha": alpha, "gamma": gamma, "rmse": _rmse(gao_rl(d_arr, alpha, gamma), r_arr)}
    if gamma > 0 and alpha / gamma - 1 < 50:
        d_peak = math.exp(alpha / gamma - 1)
        out.update(d_peak=d_peak, kl_peak=d_peak**2, gold_peak=gamma * d_peak)
    else:
        out.update(d_peak=None, kl_peak=None, gold_peak=None)
    return out


def fit_gao_bon(d: Sequence[float], gold: Sequence[float]) -> dict[str, float | None]:
    """Least-squares α, γ of R(d) = d(α − γ d) and the peak they imply (None if γ ≤ 0)."""
    d_arr, r_arr = np.asarray(d, dtype=float), np.asarray(gold, dtype=float)
    alpha, gamma = _least_squares([d_arr, -(d_arr**2)], r_arr)
    out: dict[str, float | None] = {"alpha": alpha, "gamma": gamma, "rmse": _rmse(gao_bon(d_arr, alpha, gamma), r_arr)}
    if gamma > 0:
        out.update(d_peak=alpha / (2 * gamma), kl_peak=(alpha / (2 * gamma)) ** 2, gold_peak=alpha**2 / (4 * gamma))
    else:
        out.update(d_peak=None, kl_peak=None, gold_peak=None)
    return out


def _rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - target) ** 2))) if target.size else 0.0


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ π_ref) = log n − (n − 1)/n (Stiennon et al. 2020; Gao et al. 2022)."""
    if n < 1:
        raise ValueError(f"best-of-n: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def sqrt_kl(kl: float) -> float:
    """d = √KL, with a (noisy, slightly negative) k1 estimate read as 0."""
    return math.sqrt(max(kl, 0.0))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all texts / all n-grams (whitespace words); 0 when there are none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def peak(values: Sequence[float]) -> int:
    """Index of the first maximum."""
    return int(np.argmax(np.asarray(values, dtype=float)))


def divergence(gold: Sequence[float], proxy: Sequence[float]) -> int | None:
    """The checkpoint after which gold falls while the proxy still rises (module docstring), or None."""
    last = len(gold) - 1
    for i in range(last):
        if gold[i] >= max(gold[i + 1 :]):
            return i if gold[last] < gold[i] and proxy[last] > proxy[i] else None
    return None


def histogram_kl(reference: Sequence[float], samples: Sequence[float], bins: int = 20) -> float:
    """KL(P_reference ‖ P_samples) between histograms of two sets of scores (RCfD's metric: the
    demonstrations' reward distribution against the policy's), ``bins`` equal-width bins over
    the range of both, each count + ½ (Jeffreys) so an empty bin costs a finite amount."""
    ref, smp = np.asarray(reference, dtype=float), np.asarray(samples, dtype=float)
    lo, hi = min(ref.min(), smp.min()), max(ref.max(), smp.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    p = np.histogram(ref, edges)[0] + 0.5
    q = np.histogram(smp, edges)[0] + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))
