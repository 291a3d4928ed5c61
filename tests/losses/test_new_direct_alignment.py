"""SimPO, ORPO and KTO (losses/simpo.py, orpo.py, kto.py) against their equations written out by
hand on a tiny batch; padding inert; options checked; KTO's reference point z₀ one number for the
whole step."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import losses
from losses import LossBatch

# two pairs, rows (0 ≻ 1), (2 ≻ 3), unequal lengths; padding holds junk that must be ignored
LOGP = [[-1.0, -2.0, 9.0], [-0.5, 7.0, 7.0], [-0.3, -0.2, -0.1], [-2.0, -1.0, 5.0]]
REF = [[-1.5, -1.0, 3.0], [-1.0, 3.0, 3.0], [-0.4, -0.4, -0.4], [-1.0, -1.0, 4.0]]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
PAIRS = [[0, 1], [2, 3]]
# KTO: rows 0 and 2 desirable; mismatched (x_i, y′_i) log-probs of policy and reference
LABELS = [1.0, 0.0, 1.0, 0.0]
MIS = [-3.0, -4.5, -2.0, -6.0]
MIS_REF = [-3.5, -4.0, -3.0, -6.5]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def row_sums(values: list[list[float]]) -> list[float]:
    return [sum(v for v, k in zip(row, m) if k) for row, m in zip(values, MASK)]


def row_means(values: list[list[float]]) -> list[float]:
    return [total / sum(m) for total, m in zip(row_sums(values), MASK)]


def batch(**extra) -> LossBatch:
    fields = dict(
        logprobs=torch.tensor(LOGP, requires_grad=True),
        ref_logprobs=torch.tensor(REF),
        mask=torch.tensor(MASK, dtype=torch.float32),
        pairs=torch.tensor(PAIRS),
        rewards=torch.tensor(LABELS),
        mismatched_logprobs=torch.tensor(MIS),
        mismatched_ref_logprobs=torch.tensor(MIS_REF),
    )
    return LossBatch(**{**fields, **extra})


@pytest.mark.parametrize("gamma,eps,alpha", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.8, 0.2, 0.7)])
def test_simpo_by_hand(gamma: float, eps: float, alpha: float) -> None:
    beta = 2.5
    objective = losses.build("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps, cpo_alpha=alpha)
    loss, metrics = objective(batch())
    avg = row_means(LOGP)  # [-1.5, -0.5, -0.2, -1.5]
    expected = 0.0
    for w, l in PAIRS:
        z = beta * avg[w] - beta * avg[l] - gamma
        expected += -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) - alpha * avg[w]
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    # TRL's names: rewards β·ℓ̄, length-averaged log-probs, the chosen NLL
    assert metrics["rewards/chosen"] == pytest.approx(beta * (avg[0] + avg[2]) / 2, rel=1e-6)
    assert metrics["rewards/accuracies"] == 0.5  # pair 1: -1.5 < -0.5; pair 2: -0.2 > -1.5
    assert metrics["nll_loss"] == pytest.approx(-(avg[0] + avg[2]) / 2, rel=1e-6)


def test_simpo_gradient_by_hand() -> None:
    """∂L/∂logp of a token = ∂L/∂ℓ̄ / |y|: the length average, not the sum, carries the gradient."""
    beta, gamma = 2.0, 0.5
    b = batch()
    loss, _ = losses.build("simpo", beta=beta, simpo_gamma=gamma)(b)
    loss.backward()
    avg = row_means(LOGP)
    z = beta * (avg[0] - avg[1]) - gamma
    d_margin = -(1 - 1 / (1 + math.exp(-z))) / 2  # d/dz −log σ(z), halved by the 2 pairs
    assert b.logprobs.grad[0, 0].item() == pytest.approx(d_margin * beta / 2, rel=1e-5)  # chosen: 2 tokens
    assert b.logprobs.grad[1, 0].item() == pytest.approx(-d_margin * beta / 1, rel=1e-5)  # rejected: 1 token


def test_orpo_by_hand() -> None:
    lam = 0.25
    loss, metrics = losses.build("orpo", beta=lam)(batch())
    avg = row_means(LOGP)
    expected, log_odds = 0.0, []
    for w, l in PAIRS:
        p_w, p_l = math.exp(avg[w]), math.exp(avg[l])
        ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))  # the paper's odds ratio, in logs
        log_odds.append(ratio)
        expected += -avg[w] - lam * log_sigmoid(ratio)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    assert metrics["log_odds_chosen"] == pytest.approx(sum(log_odds) / 2, rel=1e-6)
    assert metrics["log_odds_ratio"] == pytest.approx(sum(map(log_sigmoid, log_odds)) / 2, rel=1e-6)
    assert metrics["nll_loss"] == pytest.approx(-(avg[0] + avg[2]) / 2, rel=1e-6)


def test_orpo_stays_finite_near_certainty_and_far_from_it() -> None:
    """log(1 − exp ℓ̄) without cancellation: ℓ̄ = −1e-6 (p ≈ 1) and −60 (p ≈ 1e-26) keep a finite
    loss and gradient, and the odds match log(−expm1(ℓ̄)) in float64."""
    logp = torch.tensor([[-1e-6], [-60.0]], requires_grad=True)
    b = LossBatch(logprobs=logp, mask=torch.ones(2, 1), pairs=torch.tensor([[0, 1]]))
    loss, metrics = losses.build("orpo", beta=1.0)(b)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(logp.grad).all())
    x = torch.tensor([-1e-6, -60.0], dtype=torch.float64)
    odds = x - torch.log(-torch.expm1(x))
    assert metrics["log_odds_chosen"] == pytest.approx(float(odds[0] - odds[1]), rel=1e-5)


@pytest.mark.parametrize("shift", [0.0, 3.0])  # 3: the mismatched log-ratio is negative, z₀ clamps to 0
def test_kto_by_hand(shift: float) -> None:
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    mis_ref = [m + shift for m in MIS_REF]
    b = batch(mismatched_ref_logprobs=torch.tensor(mis_ref))
    loss, metrics = losses.build("kto", beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)(b)
    z0 = max(0.0, sum(m - r for m, r in zip(MIS, mis_ref)) / 4)
    assert (z0 > 0) == (shift == 0.0)
    ratio = [p - r for p, r in zip(row_sums(LOGP), row_sums(REF))]
    expected = 0.0
    for r, label in zip(ratio, LABELS):
        if label:
            expected += lam_d * (1 - 1 / (1 + math.exp(-beta * (r - z0))))
        else:
            expected += lam_u * (1 - 1 / (1 + math.exp(-beta * (z0 - r))))
    assert loss.item() == pytest.approx(expected / 4, rel=1e-6)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-7)
    assert metrics["rewards/chosen"] == pytest.approx(beta * (ratio[0] + ratio[2]) / 2, rel=1e-6)
    assert metrics["logps/rejected"] == pytest.approx((row_sums(LOGP)[1] + row_sums(LOGP)[3]) / 2, rel=1e-6)


def test_kto_reference_point_is_the_whole_steps_and_carries_no_gradient() -> None:
    """Each half of the batch handed the whole batch's sums gives the whole batch's z₀ and summed
    gradient; estimated from its own rows alone it would not (the halves' means differ)."""
    objective = losses.build("kto", beta=0.5)
    full = batch()
    stats = objective.batch_stats(full)
    loss, _ = objective(full)
    loss.backward()
    summed = torch.zeros(4, 3)
    own = []
    for rows in (torch.tensor([0, 1]), torch.tensor([2, 3])):
        for with_stats in (True, False):
            part = full.select(rows)
            leaf = part.logprobs.detach().clone().requires_grad_(True)
            part = replace(part, logprobs=leaf, stats=stats if with_stats else None)
            part_loss, metrics = objective(part, num_units=4)
            if with_stats:
                part_loss.backward()
                summed[rows] += leaf.grad
                assert metrics["kl"] == pytest.approx(0.375, abs=1e-7)  # (0.5 − 0.5 + 1 + 0.5) / 4
            else:
                own.append(metrics["kl"])
    torch.testing.assert_close(summed, full.logprobs.grad, rtol=1e-6, atol=1e-8)
    assert own == pytest.approx([0.0, 0.75])  # max(0, (0.5 − 0.5)/2) and (1 + 0.5)/2: not the step's


@pytest.mark.parametrize(
    "name,opts",
    [("simpo", {"label_smoothing": 0.1, "cpo_alpha": 0.3}), ("orpo", {}), ("kto", {"undesirable_weight": 2.0})],
)
def test_padding_is_inert(name: str, opts: dict) -> None:
    """Garbage (and extra width) in masked positions changes neither the loss nor the gradient."""
    objective = losses.build(name, **opts)
    plain = batch()
    loss, _ = objective(plain)
    loss.backward()
    junk = torch.tensor(MASK, dtype=torch.float32) == 0
    wide_logp = torch.cat([torch.tensor(LOGP).masked_fill(junk, 50.0), torch.full((4, 2), -80.0)], 1)
    padded = batch(
        logprobs=wide_logp.requires_grad_(True),
        ref_logprobs=torch.cat([torch.tensor(REF).masked_fill(junk, -90.0), torch.full((4, 2), 7.0)], 1),
        mask=torch.cat([torch.tensor(MASK, dtype=torch.float32), torch.zeros(4, 2)], 1),
    )
    padded_loss, _ = objective(padded)
    padded_loss.backward()
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(padded.logprobs.grad[:, :3], plain.logprobs.grad)
    assert float(padded.logprobs.grad[:, 3:].abs().max()) == 0.0
    assert float(padded.logprobs.grad[:, :3][junk].abs().max()) == 0.0


@pytest.mark.parametrize(
    "name,opts,option",
    [
        ("simpo", {"beta": 0.0}, "beta"),
        ("simpo", {"simpo_gamma": -0.1}, "simpo_gamma"),
        ("simpo", {"label_smoothing": 0.6}, "label_smoothing"),
        ("simpo", {"cpo_alpha": -1.0}, "cpo_alpha"),
        ("orpo", {"beta": -0.1}, "beta"),
        ("kto", {"beta": 0.0}, "beta"),
        ("kto", {"desirable_weight": -1.0}, "desirable_weight"),
        ("kto", {"undesirable_weight": -0.5}, "undesirable_weight"),
    ],
)
def test_bad_option_values_name_the_option(name: str, opts: dict, option: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}: {option} must be"):
        losses.build(name, **opts)


def test_kto_refuses_rewards_that_are_not_labels() -> None:
    with pytest.raises(ValueError, match="kto: rewards must be the rows' labels"):
        losses.build("kto")(batch(rewards=torch.tensor([0.7, 0.0, 1.0, 0.0])))


def test_reference_free_objectives_read_no_reference() -> None:
    """SimPO's and ORPO's β is no KL coefficient: no reference is loaded for them; KTO's is."""
    assert not losses.build("simpo", beta=2.0).uses_reference
    assert not losses.build("orpo", beta=0.1).uses_reference
    assert losses.build("kto").uses_reference
    loss, _ = losses.build("simpo")(batch(ref_logprobs=None))  # no reference log-probs needed
    assert math.isfinite(loss.item())
