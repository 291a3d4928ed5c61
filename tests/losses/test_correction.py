"""The sampler-mismatch correction (losses/correction.py): the weights of each mode against an
independent loop over tokens, the ratio exactly 1 when the engine agrees with the trainer, and the
objectives' gradients with the weights against the estimator written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

import losses
from losses import LossBatch
from losses.correction import Correction

OLD = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
# δ = old − engine per token: 0.9, −0.2, 1.5 | 0.1, −3.0
ENGINE = OLD - torch.tensor([[0.9, -0.2, 1.5, 7.0], [0.1, -3.0, 4.0, 0.0]])


def by_hand(mode: str, clip_max: float, clip_min: float | None) -> list[list[float]]:
    out = []
    for b in range(2):
        n = int(MASK[b].sum())
        deltas = [float(OLD[b, t] - ENGINE[b, t]) for t in range(n)]
        ratios = [math.exp(sum(deltas))] * n if mode.startswith("sequence") else [math.exp(d) for d in deltas]
        row = []
        for r in ratios:
            if mode.endswith("truncate"):
                w = min(r, clip_max) if clip_min is None else min(max(r, clip_min), clip_max)
            else:
                w = r if (clip_min or 0.0) <= r <= clip_max else 0.0
            row.append(w)
        out.append(row + [0.0] * (4 - n))
    return out


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_weights_of_every_mode_equal_the_formula(mode, clip_min):
    weights, metrics = Correction(mode, 2.0, clip_min).weights(OLD, ENGINE, MASK)
    assert torch.allclose(weights, torch.tensor(by_hand(mode, 2.0, clip_min)), rtol=1e-6, atol=0)
    expected = by_hand(mode, math.inf, None)  # the raw ratios
    if mode.startswith("sequence"):
        raw = [expected[0][0], expected[1][0]]
    else:
        raw = [expected[b][t] for b in range(2) for t in range(4) if MASK[b, t]]
    changed = sum(1 for r in raw if r > 2.0 or (clip_min is not None and r < clip_min))
    assert metrics["is_ratio_mean"][0] / metrics["is_ratio_mean"][1] == pytest.approx(sum(raw) / len(raw), rel=1e-6)
    assert metrics["is_clipped_fraction"] == (pytest.approx(changed), len(raw))
    deltas = [0.9, -0.2, 1.5, 0.1, -3.0]
    k3 = sum(math.exp(d) - 1 - d for d in deltas)
    assert metrics["engine_kl"] == (pytest.approx(k3, rel=1e-6), 5.0)
    assert metrics["engine_logprob_diff"] == (pytest.approx(sum(abs(d) for d in deltas), rel=1e-6), 5.0)


def test_an_engine_that_agrees_gives_weight_one_and_no_kl():
    weights, metrics = Correction("token_mask", 3.0).weights(OLD, OLD.clone(), MASK)
    assert torch.equal(weights, MASK)
    assert metrics["is_ratio_mean"] == (5.0, 5.0) and metrics["is_clipped_fraction"] == (0.0, 5.0)
    assert metrics["engine_kl"] == (0.0, 5.0)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="clip_min"):
        Correction("token_truncate", 1.0, 2.0)
    with pytest.raises(ValueError, match="mode"):
        Correction("tokens", 1.0)


def batch(weights: torch.Tensor | None) -> tuple[LossBatch, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    logprobs = logits.log_softmax(-1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5])
    group = torch.tensor([0, 0, 1, 1])
    return LossBatch(logprobs=logprobs, mask=mask, rewards=rewards, group=group, sampler_weights=weights), logits


WEIGHTS = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 0.0], [1.5, 0.0, 0.0], [1.0, 1.0, 0.25]])


def test_rloo_weights_each_tokens_log_likelihood():
    """L = −(1/N) Σ_i A_i Σ_t w_it·log π(y_it), A_i the leave-one-out advantage (β = 0)."""
    b, logits = batch(WEIGHTS)
    loss, _ = losses.build("rloo", beta=0.0)(b)
    (grad,) = torch.autograd.grad(loss, logits)
    b2, logits2 = batch(None)
    advantage = torch.tensor([1.0, -1.0, 1.5, -1.5])  # r_i − r_j within each group of two
    by_hand = -(advantage[:, None] * WEIGHTS * b2.logprobs * b2.mask).sum() / 4
    (expected,) = torch.autograd.grad(by_hand, logits2)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_grpo_weights_the_clipped_surrogate_not_the_kl():
    """On-policy (ratio 1): per-token −w·A, token-mean per sequence, KL term unweighted."""
    b, logits = batch(WEIGHTS)
    ref = b.logprobs.detach() - 0.1
    objective = losses.build("grpo", beta=0.5, scale_rewards=False)
    loss, _ = objective(LossBatch(**{**b.__dict__, "ref_logprobs": ref}))
    (grad,) = torch.autograd.grad(loss, logits)
    b2, logits2 = batch(None)
    lp = b2.logprobs
    advantage = torch.tensor([0.5, -0.5, 0.75, -0.75])  # r − group mean
    ratio = torch.exp(lp - lp.detach())
    k3 = torch.exp(ref - lp) - 1 - (ref - lp)
    per_token = -WEIGHTS * ratio * advantage[:, None] + 0.5 * k3
    by_hand = ((per_token * b2.mask).sum(-1) / b2.mask.sum(-1)).sum() / 4
    (expected,) = torch.autograd.grad(by_hand, logits2)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_copg_and_offline_objectives_take_no_weights():
    takes = {name for name, cls in losses.REGISTRY.items() if cls.corrects_sampler}
    policy_gradients = {"reinforce", "rloo", "vanilla_pg", "ppo", "grpo", "dr_grpo", "rcfd"}
    assert takes == policy_gradients | {"gspo", "cispo", "reinforce_pp"}
