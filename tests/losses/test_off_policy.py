"""What each estimator is off-policy, by exact expected gradients on the CoPG paper's 3-arm bandit.

Every k-tuple of arms a sampler μ can draw is enumerated with its probability, so E_μ[∇L] is
computed exactly (no Monte Carlo). At π* ∝ π_ref·exp(r/β): CoPG's expected gradient is 0 for any
μ; RLOO and vanilla PG with the KL penalty fixed at sampling time (``kl_from: old``, TRL's) are
biased on stale samples; RLOO with the penalty recomputed from the current policy is exactly half
CoPG on any batch. On-policy (μ = π) the options agree with each other and with the estimator as
it was before ``kl_from`` existed (no π_old in the batch)."""

from __future__ import annotations

import itertools

import pytest
import torch

import losses
from losses import LossBatch

REWARDS = torch.tensor([2.5, 2.0, 1.0], dtype=torch.float64)
BETA = 0.5
REF = torch.full((3,), 1 / 3, dtype=torch.float64).log()
STALE = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
OPTIMUM = torch.log_softmax(REF + REWARDS / BETA, 0)  # π* logits


def expected_gradient(name: str, logits: torch.Tensor, sampler: torch.Tensor | None, k: int, **options) -> torch.Tensor:
    """E over k i.i.d. draws from ``sampler`` (None: the policy itself) of ∇_logits L, exactly."""
    objective = losses.build(name, beta=BETA, **options)
    logits = logits.clone().requires_grad_(True)
    mu = torch.softmax(logits.detach(), 0) if sampler is None else sampler
    total = torch.zeros(3, dtype=torch.float64)
    for arms in itertools.product(range(3), repeat=k):
        a = torch.tensor(arms)
        log_pi = torch.log_softmax(logits, 0)
        batch = LossBatch(
            logprobs=log_pi[a][:, None],
            mask=torch.ones(k, 1, dtype=torch.float64),
            ref_logprobs=REF[a][:, None],
            rewards=REWARDS[a],
            group=torch.zeros(k, dtype=torch.long),
            # π_old: the sampler's log-probs; None is the batch as it was before kl_from existed
            old_logprobs=None if options.get("kl_from") is None and sampler is None else mu.log()[a][:, None],
        )
        loss, _ = objective(batch)
        (grad,) = torch.autograd.grad(loss, [logits])
        total += float(mu[a].prod()) * grad
    return total


@pytest.mark.parametrize("k", [2, 4])
def test_at_the_optimum_only_copg_is_unbiased_on_stale_samples(k):
    copg = expected_gradient("copg", OPTIMUM, STALE, k)
    rloo_old = expected_gradient("rloo", OPTIMUM, STALE, k, kl_from="old")
    vanilla_old = expected_gradient("vanilla_pg", OPTIMUM, STALE, k, kl_from="old")
    rloo_current = expected_gradient("rloo", OPTIMUM, STALE, k, kl_from="current")
    assert copg.norm() < 1e-12
    assert rloo_old.norm() > 0.05, rloo_old
    assert vanilla_old.norm() > 0.05, vanilla_old
    # the penalty recomputed from the current policy makes RLOO half of CoPG: not a control
    assert rloo_current.norm() < 1e-12
    # without a baseline, h ≡ β·log Z at π* is a constant weight on E_μ[∇log π] ≠ 0: biased either way
    vanilla_current = expected_gradient("vanilla_pg", OPTIMUM, STALE, k, kl_from="current")
    c = BETA * torch.logsumexp(REF + REWARDS / BETA, 0)
    assert torch.allclose(vanilla_current, -c * (STALE - OPTIMUM.exp()), atol=1e-12)


def test_rloo_with_the_current_penalty_is_half_copg_on_any_stale_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, generator=g, dtype=torch.float64)
    for k in (2, 3):
        copg = expected_gradient("copg", logits, STALE, k)
        rloo = expected_gradient("rloo", logits, STALE, k, kl_from="current")
        assert torch.allclose(copg, 2 * rloo, atol=1e-12)
        assert not torch.allclose(expected_gradient("rloo", logits, STALE, k, kl_from="old"), rloo, atol=1e-3)


@pytest.mark.parametrize("name", ["rloo", "vanilla_pg", "reinforce"])
def test_on_policy_the_options_agree_with_the_estimator_as_it_was(name):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, generator=g, dtype=torch.float64)  # not the optimum: a gradient to compare
    was = expected_gradient(name, logits, None, 3)  # no π_old in the batch
    assert was.norm() > 1e-3
    for kl_from in ("old", "current"):
        assert torch.allclose(expected_gradient(name, logits, None, 3, kl_from=kl_from), was, atol=1e-12)
    # on-policy RLOO is half CoPG: the same direction as before the option existed
    if name == "rloo":
        assert torch.allclose(expected_gradient("copg", logits, None, 3), 2 * was, atol=1e-12)


def test_kl_from_is_checked():
    with pytest.raises(ValueError, match=r"kl_from: expected 'old' .* or 'current'"):
        losses.build("rloo", kl_from="sampler")
    assert losses.build("rloo").sampling_logprobs and not losses.build("rloo", kl_from="current").sampling_logprobs
    assert not losses.build("rloo", beta=0.0).sampling_logprobs  # no penalty: nothing to keep
