"""Objectives (losses/) against hand computations and invariants, on tiny batches."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch

import losses
from losses import LossBatch


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# two pairs, rows (0 ≻ 1), (2 ≻ 3), unequal lengths, padding holds junk that must be ignored
LOGP = [[-1.0, -2.0, 9.0], [-0.5, 7.0, 7.0], [-0.3, -0.2, -0.1], [-2.0, -1.0, 5.0]]
REF = [[-1.5, -1.0, 3.0], [-1.0, 3.0, 3.0], [-0.4, -0.4, -0.4], [-1.0, -1.0, 4.0]]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
PAIRS = [[0, 1], [2, 3]]


def seq(values: list[list[float]], average: bool = False) -> list[float]:
    out = []
    for row, m in zip(values, MASK):
        total = sum(v for v, k in zip(row, m) if k)
        out.append(total / sum(m) if average else total)
    return out


def pair_batch(**extra) -> LossBatch:
    return LossBatch(
        logprobs=torch.tensor(LOGP, requires_grad=True),
        ref_logprobs=torch.tensor(REF),
        mask=torch.tensor(MASK, dtype=torch.float32),
        pairs=torch.tensor(PAIRS),
        **extra,
    )


def margins(average: bool) -> list[float]:
    lp, ref = seq(LOGP, average), seq(REF, average)
    return [(lp[w] - ref[w]) - (lp[l] - ref[l]) for w, l in PAIRS]


@pytest.mark.parametrize("average", [False, True])
def test_dpo_by_hand(average: bool) -> None:
    beta = 0.3
    loss, _ = losses.build("dpo", beta=beta, average_logprobs=average)(pair_batch())
    expected = sum(-math.log(sig(beta * m)) for m in margins(average)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_ipo_by_hand(average: bool) -> None:
    beta = 0.4
    loss, _ = losses.build("ipo", beta=beta, average_logprobs=average)(pair_batch())
    expected = sum((m - 1 / (2 * beta)) ** 2 for m in margins(average)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_copg_by_hand() -> None:
    beta, r = 0.5, [1.0, 0.2, -0.3, 0.7]
    loss, _ = losses.build("copg", beta=beta)(pair_batch(rewards=torch.tensor(r)))
    lp, ref = seq(LOGP), seq(REF)
    h = [r[i] - beta * (lp[i] - ref[i]) for i in range(4)]
    expected = sum((h[a] - h[b]) ** 2 / (2 * beta) for a, b in PAIRS) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def rloo_by_hand(rewards: list[float], beta: float, group: list[int]) -> float:
    lp, ref = seq(LOGP), seq(REF)
    R = [rewards[i] - beta * (lp[i] - ref[i]) for i in range(4)]
    total = 0.0
    for i in range(4):
        others = [R[j] for j in range(4) if j != i and group[j] == group[i]]
        total += -(R[i] - sum(others) / len(others)) * lp[i]
    return total / 4


def test_rloo_by_hand() -> None:
    r, group = [1.0, 0.2, -0.3, 0.7], [0, 0, 1, 1]
    batch = pair_batch(rewards=torch.tensor(r), group=torch.tensor(group))
    loss, _ = losses.build("rloo", beta=0.2)(batch)
    assert loss.item() == pytest.approx(rloo_by_hand(r, 0.2, group), rel=1e-6)
    batch = pair_batch(rewards=torch.tensor(r), group=torch.tensor([0, 0, 0, 0]))
    loss, _ = losses.build("rloo", beta=0.2)(batch)
    assert loss.item() == pytest.approx(rloo_by_hand(r, 0.2, [0, 0, 0, 0]), rel=1e-6)


def test_rcfd_by_hand() -> None:
    r, r_d, group = [1.0, 0.2, -0.3, 0.7], 0.4, [0, 0, 1, 1]
    batch = pair_batch(rewards=torch.tensor(r), group=torch.tensor(group), demo_rewards=torch.full((4,), r_d))
    loss, _ = losses.build("rcfd", beta=0.1)(batch)
    calibrated = [-((x - r_d) ** 2) for x in r]
    assert loss.item() == pytest.approx(rloo_by_hand(calibrated, 0.1, group), rel=1e-6)


def test_averaged_dpo_reorder_and_pad_invariant() -> None:
    obj = losses.build("dpo", beta=0.3, average_logprobs=True)
    base, _ = obj(pair_batch())
    perm = torch.tensor([3, 0, 2, 1])  # new row i holds old row perm[i]
    inverse = torch.argsort(perm)
    reordered = LossBatch(
        logprobs=torch.tensor(LOGP)[perm],
        ref_logprobs=torch.tensor(REF)[perm],
        mask=torch.tensor(MASK, dtype=torch.float32)[perm],
        pairs=inverse[torch.tensor(PAIRS)].flip(0),
    )
    padded = LossBatch(
        logprobs=torch.cat([torch.tensor(LOGP), torch.randn(4, 5)], dim=1),
        ref_logprobs=torch.cat([torch.tensor(REF), torch.randn(4, 5)], dim=1),
        mask=torch.cat([torch.tensor(MASK, dtype=torch.float32), torch.zeros(4, 5)], dim=1),
        pairs=torch.tensor(PAIRS),
    )
    assert obj(reordered)[0].item() == pytest.approx(base.item(), rel=1e-6)
    assert obj(padded)[0].item() == pytest.approx(base.item(), rel=1e-6)


def random_batch(groups: int = 6, k: int = 4, T: int = 5, seed: int = 0) -> LossBatch:
    g = torch.Generator().manual_seed(seed)
    B = groups * k
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    group = torch.arange(B) // k
    return LossBatch(
        logprobs=(-torch.rand(B, T, generator=g) * 2).requires_grad_(True),
        ref_logprobs=-torch.rand(B, T, generator=g) * 2,
        mask=mask,
        rewards=torch.randn(B, generator=g),
        group=group,
        pairs=(torch.arange(groups)[:, None, None] * k + torch.tensor([[[0, 1], [2, 3]]])).reshape(-1, 2)
        if k == 4
        else None,
        demo_rewards=torch.full((B,), 0.3),
        # KTO's mismatched (x, y′) rows: a positive mean log-ratio, so z₀ > 0 is not clamped away
        mismatched_logprobs=-torch.rand(B, generator=g) * 4,
        mismatched_ref_logprobs=-torch.rand(B, generator=g) * 4 - 1,
    )


def grad_of(objective: losses.Objective, batch: LossBatch, num_units: float | None = None) -> torch.Tensor:
    leaf = batch.logprobs.detach().clone().requires_grad_(True)
    loss, _ = objective(LossBatch(**{**batch.__dict__, "logprobs": leaf}), num_units=num_units)
    loss.backward()
    return leaf.grad


@pytest.mark.parametrize(
    "name,opts",
    [
        ("reinforce", {"beta": 0.1}),
        ("rloo", {"beta": 0.1}),
        ("rcfd", {"beta": 0.1}),
        ("copg", {"beta": 0.3}),
        ("dpo", {"beta": 0.3}),
        ("dpo", {"beta": 0.3, "average_logprobs": True}),
        ("ipo", {"beta": 0.3, "average_logprobs": True}),
        ("sft", {}),
        ("gspo", {"beta": 0.1}),
        ("cispo", {"beta": 0.1}),
        ("reinforce_pp", {"beta": 0.1}),
        ("reinforce_pp", {"beta": 0.1, "baseline": "group"}),
        ("online_dpo", {"beta": 0.3}),
        ("simpo", {"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.1, "cpo_alpha": 0.5}),
        ("orpo", {"beta": 0.3}),
        ("kto", {"beta": 0.3, "undesirable_weight": 1.5}),
    ],
)
def test_micro_batches_with_num_units_equal_full_batch(name: str, opts: dict) -> None:
    objective = losses.build(name, **opts)
    batch = random_batch()
    if "mismatched_logprobs" in objective.needs:  # unpaired rows (KTO): the rewards are 1/0 labels
        batch = replace(batch, rewards=(batch.rewards > 0).float())
    # statistics of the whole batch (REINFORCE++'s whitening), summed once as the trainer does
    batch = replace(batch, stats=objective.batch_stats(batch) or None)
    if name == "reinforce":
        objective.after_step(batch)  # a non-zero baseline, fixed during the step
    full = grad_of(objective, batch)
    units = objective.count_units(batch)
    summed = torch.zeros_like(full)
    for rows in (torch.arange(0, 8), torch.arange(8, 24)):  # groups of 4 and pairs stay whole
        part = batch.select(rows)
        summed[rows] += grad_of(objective, part, num_units=units)
    torch.testing.assert_close(summed, full, rtol=1e-5, atol=1e-7)


def test_copg_two_samples_on_policy_is_twice_rloo() -> None:
    batch = random_batch(groups=8, k=2, seed=3)
    beta = 0.2
    copg = grad_of(losses.build("copg", beta=beta), batch)
    rloo = grad_of(losses.build("rloo", beta=beta, kl_estimator="k1"), batch)
    torch.testing.assert_close(copg, 2 * rloo, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["rloo", "reinforce", "rcfd"])
def test_k3_in_the_detached_reward_is_refused_with_one_line(name: str, tmp_path, capsys) -> None:
    from pathlib import Path

    from align import cli

    with pytest.raises(ValueError, match=r"^kl_estimator: 'k3'"):
        losses.build(name, kl_estimator="k3")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    overrides = [f"objective.name={name}", "objective.options.kl_estimator=k3", f"output.dir={tmp_path / 'run'}"]
    assert cli.main(["train", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kl_estimator" in err and "'k1'" in err, err
    assert not (tmp_path / "run").exists()


def test_k3_as_detached_reward_has_no_fixed_point_at_pi_star() -> None:
    """Why k3 is refused: the exact expected score-function gradient Σ_a π(a)·R_a·∇log π(a) on
    the CoPG paper's 3-arm bandit (r = 2.5, 2, 1; β = 0.5; uniform reference). With R = r − β·k1
    it vanishes at π* ∝ π_ref·exp(r/β); with R = r − β·k3 it does not, and it lowers the worst
    arm further (the policy heads for (1, 0, 0))."""
    r, beta = torch.tensor([2.5, 2.0, 1.0], dtype=torch.float64), 0.5
    ref = torch.full((3,), -math.log(3), dtype=torch.float64)
    star = torch.log_softmax(ref + r / beta, -1)

    def ascent(logits: torch.Tensor, estimator: str) -> torch.Tensor:
        logits = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(logits, -1)
        R = r - beta * losses.token_kl(logp.detach(), ref, estimator)
        (logp.exp().detach() * R * logp).sum().backward()
        return logits.grad

    assert ascent(star, "k1").abs().max() < 1e-12
    k3 = ascent(star, "k3")
    assert k3.abs().max() > 0.05
    assert k3[2] < 0 and k3[0] > 0  # mass moves from the worst arm to the best


def test_dpo_and_ipo_log_one_margin() -> None:
    """``margin`` is Δ, the pair's log-ratio margin, for both (not β·Δ for one of them)."""
    batch = LossBatch(
        logprobs=torch.tensor(LOGP), ref_logprobs=torch.tensor(REF), mask=torch.tensor(MASK), pairs=torch.tensor(PAIRS)
    )
    for name in ("dpo", "ipo"):
        _, metrics = losses.build(name, beta=0.1)(batch)
        assert metrics["margin"] == pytest.approx(sum(margins(False)) / 2, abs=1e-6), name


@pytest.mark.parametrize("average", [False, True])
def test_dpo_logs_trls_metric_names_by_hand(average: bool) -> None:
    """rewards/chosen, rewards/rejected (β·log π/π_ref), rewards/margins, rewards/accuracies and
    logps/chosen, logps/rejected (the policy's own sequence log-probs) as TRL's DPOTrainer logs them."""
    beta = 0.3
    _, metrics = losses.build("dpo", beta=beta, average_logprobs=average)(pair_batch())
    lp, ref = seq(LOGP, average), seq(REF, average)
    chosen = [beta * (lp[w] - ref[w]) for w, _ in PAIRS]
    rejected = [beta * (lp[l] - ref[l]) for _, l in PAIRS]
    mean = statistics.fmean
    assert metrics["rewards/chosen"] == pytest.approx(mean(chosen), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(mean(rejected), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(mean(c - r for c, r in zip(chosen, rejected)), abs=1e-6)
    assert metrics["rewards/accuracies"] == mean(float(c > r) for c, r in zip(chosen, rejected))
    assert metrics["logps/chosen"] == pytest.approx(mean(lp[w] for w, _ in PAIRS), abs=1e-6)
    assert metrics["logps/rejected"] == pytest.approx(mean(lp[l] for _, l in PAIRS), abs=1e-6)
