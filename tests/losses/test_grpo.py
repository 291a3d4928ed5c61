"""GRPO, Dr. GRPO and vanilla PG against their equations: gradients by hand, the shared token
aggregations, clipping (asymmetric, DAPO), unit counts, and the bandit fixed points they declare."""

from __future__ import annotations

import statistics

import pytest
import torch

import losses
from align.config import RecipeError, validate
from align.recipe import Recipe
from losses import LossBatch
from losses.aggregation import aggregate_tokens
from losses.grpo import group_moments

B, T, K = 6, 4, 2


def _batch(seed: int = 0, old_shift: float = 0.0) -> tuple[LossBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 2:] = 0
    mask[3, 1:] = 0
    batch = LossBatch(
        logprobs=logprobs,
        mask=mask,
        ref_logprobs=logprobs.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        rewards=torch.randn(B, generator=g, dtype=torch.float64),
        group=torch.arange(B // K).repeat_interleave(K),
        old_logprobs=None if not old_shift else logprobs.detach() - old_shift,
    )
    return batch, logprobs


def _grad(name: str, batch: LossBatch, logprobs: torch.Tensor, **options) -> torch.Tensor:
    loss, _ = losses.build(name, **options)(batch)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return grad


def _hand_advantage(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    groups = rewards.view(-1, K)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)  # unbiased std, as TRL
    return centred.reshape(-1)


def test_grpo_gradient_is_the_papers_equation():
    batch, logprobs = _batch()
    beta = 0.04
    grad = _grad("grpo", batch, logprobs, beta=beta)
    A = _hand_advantage(batch.rewards, scale=True)
    lengths = batch.mask.sum(-1, keepdim=True)
    # d/dlp [−ρ·A + β·k3] at ρ = 1, k3 = e^{ref − lp} − 1 − (ref − lp): −A + β(1 − e^{ref − lp})
    per_token = -A[:, None] + beta * (1 - torch.exp(batch.ref_logprobs - logprobs.detach()))
    expected = per_token * batch.mask / lengths / B
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregations_and_their_units(aggregation):
    batch, logprobs = _batch(1)
    options = {"beta": 0.0, "aggregation": aggregation, "scale_rewards": False, "norm_length": 8}
    grad = _grad("grpo", batch, logprobs, **options)
    A = _hand_advantage(batch.rewards, scale=False)[:, None]
    if aggregation == "token_mean":
        expected = -A * batch.mask / batch.mask.sum()
    elif aggregation == "seq_mean_token_mean":
        expected = -A * batch.mask / batch.mask.sum(-1, keepdim=True) / B
    else:
        expected = -A * batch.mask / 8 / B
    assert torch.allclose(grad, expected, atol=1e-12)
    objective = losses.build("grpo", **options)
    assert objective.count_units(batch) == (int(batch.mask.sum()) if aggregation == "token_mean" else B)
    # the global normaliser: two micro-batches summed equal the whole batch
    units = objective.count_units(batch)
    halves = [torch.arange(0, 4), torch.arange(4, 6)]
    total = sum(objective(batch.select(rows), num_units=units)[0] for rows in halves)
    assert torch.allclose(total, objective(batch)[0], atol=1e-12)


def test_clipping_is_asymmetric_and_follows_the_advantage_sign():
    # π/π_old = e^0.25 = 1.28 on every token: above 1 + 0.2, below 1 + 0.3
    batch, logprobs = _batch(2, old_shift=0.25)
    A = _hand_advantage(batch.rewards, scale=False)
    opts = {"beta": 0.0, "scale_rewards": False, "aggregation": "token_mean"}
    grad = _grad("grpo", batch, logprobs, **opts, clip_low=0.2, clip_high=0.2)
    ratio = torch.exp(torch.tensor(0.25, dtype=torch.float64))
    live = batch.mask.bool()
    positive, negative = (A > 0)[:, None] & live, (A < 0)[:, None] & live
    assert positive.any() and negative.any()
    assert (grad[positive] == 0).all()  # clipped above 1 + ε for A > 0: no gradient
    expected_negative = (-A[:, None] * ratio / batch.mask.sum()).expand(B, T)[negative]
    assert torch.allclose(grad[negative], expected_negative, atol=1e-12)  # min keeps the unclipped side
    dapo = _grad("grpo", batch, logprobs, **opts, clip_low=0.2, clip_high=0.3)
    assert (dapo[positive] != 0).all()  # clip_high 0.3 leaves ratio 1.28 inside


def test_dr_grpo_with_kl_in_the_reward_is_scaled_rloo():
    batch, logprobs = _batch(3)
    beta = 0.1
    objective = losses.build("dr_grpo", beta=beta, kl="reward", kl_estimator="k1")
    assert objective.fixed_point == "reward" and losses.build("grpo").fixed_point is None
    assert losses.build("dr_grpo").fixed_point == "reverse_kl"
    adv_grpo, _, _ = objective.advantages(batch)
    rloo = losses.build("rloo", beta=beta)
    _, metrics_rloo = rloo.terms(batch)
    assert torch.allclose(adv_grpo, (K - 1) / K * metrics_rloo["advantage"], atol=1e-12)


def test_vanilla_pg_has_no_baseline():
    batch, logprobs = _batch(4)
    beta = 0.05
    grad = _grad("vanilla_pg", batch, logprobs, beta=beta)
    kl = ((logprobs.detach() - batch.ref_logprobs) * batch.mask).sum(-1)
    R = batch.rewards - beta * kl
    assert torch.allclose(grad, -R[:, None] * batch.mask / B, atol=1e-12)


def test_group_moments_and_bad_options():
    mean, std = group_moments(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1]))
    assert mean.tolist() == [2.0, 2.0, 5.0] and std.tolist() == pytest.approx([2**0.5, 2**0.5, 0.0])
    with pytest.raises(ValueError, match="as a loss term only 'k3'"):
        losses.build("grpo", kl="loss", kl_estimator="k1")
    with pytest.raises(ValueError, match="aggregation: expected one of"):
        losses.build("grpo", aggregation="sum")
    with pytest.raises(ValueError, match="norm_length must be a positive constant"):
        aggregate_tokens(torch.ones(1, 2), torch.ones(1, 2), "seq_mean_token_sum_norm", 0)


def test_the_recipe_gives_dr_grpo_the_generation_budget(tmp_path):
    raw = {
        "model": {"path": "gpt2"},
        "data": {"train": "x.jsonl"},
        "objective": {"name": "dr_grpo", "k": 4},
        "reward": [{"name": "length", "options": {"target": 8}}],
        "generation": {"max_new_tokens": 48},
    }
    assert validate(Recipe, raw).build_objective().norm_length == 48
    raw["objective"]["options"] = {"norm_length": 10}
    assert validate(Recipe, raw).build_objective().norm_length == 10
    offline = {**raw, "objective": {"name": "dpo"}, "reward": [], "train": {"updates_per_batch": 2}}
    with pytest.raises(RecipeError, match=r"train.updates_per_batch: 'dpo' is trained on a fixed dataset"):
        validate(Recipe, offline)
    offline["train"] = {"mini_batches": 2}
    with pytest.raises(RecipeError, match=r"train.mini_batches: 'dpo' is trained on a fixed dataset"):
        validate(Recipe, offline)


@pytest.mark.parametrize("K_arms,beta,instance", [(4, 0.1, 0), (10, 0.4, 1)])
def test_vanilla_pg_and_dr_grpo_reach_their_fixed_point(K_arms, beta, instance):
    """Random bandits: KL(final ‖ π_ref·exp(r/β)) < 0.01 for the objectives that declare it."""
    from align.jobs.bandit import BanditRecipe, run

    g = torch.Generator().manual_seed(100 + instance)
    recipe = BanditRecipe(
        rewards=torch.rand(K_arms, generator=g).tolist(),
        ref_logits=(0.5 * torch.randn(K_arms, generator=g)).tolist(),
        beta=beta,
        seeds=2,
        seed=instance,
        log_every=100,
        objectives=[
            "vanilla_pg",
            {"name": "dr_grpo", "kl": "reward", "kl_estimator": "k1"},
            {"name": "grpo", "kl": "reward", "kl_estimator": "k1", "scale_rewards": False, "aggregation": "token_mean"},
        ],
    )
    for label, result in run(recipe)["objectives"].items():
        assert statistics.fmean(result["final"]["kl_to_target"]) < 0.01, label


@pytest.mark.parametrize("K_arms,beta,k,instance", [(4, 0.1, 2, 0), (8, 0.3, 4, 1)])
def test_dr_grpo_with_a_k3_loss_reaches_its_own_fixed_point(K_arms, beta, k, instance):
    """Mean-centred advantages and a k3 KL loss term: π = β·π_ref/(λ − (k−1)/k·r), which is not
    π_ref·exp(r/β) -- the lab's KL to the declared point is tiny, to the exponential tilt it is not."""
    from align.jobs.bandit import BanditRecipe, run
    from align.jobs.bandit.targets import kl_to_tilt, reverse_kl_tilt

    g = torch.Generator().manual_seed(200 + instance)
    rewards = torch.rand(K_arms, generator=g)
    ref_logits = 0.5 * torch.randn(K_arms, generator=g)
    recipe = BanditRecipe(
        rewards=rewards.tolist(),
        ref_logits=ref_logits.tolist(),
        beta=beta,
        k=k,
        seeds=2,
        seed=instance,
        log_every=100,
        objectives=["dr_grpo", {"name": "grpo", "scale_rewards": False, "aggregation": "token_mean"}],
    )
    ref_law = torch.softmax(ref_logits.double(), -1)
    f = reverse_kl_tilt(rewards, ref_law, beta, (k - 1) / k)
    law = ref_law * torch.exp(f / beta)
    # the stationarity condition by hand: c·r + β·π_ref/π is the same constant on every arm
    condition = (k - 1) / k * rewards.double() + beta * ref_law / law
    assert float(law.sum()) == pytest.approx(1, abs=1e-9) and float(condition.std()) < 1e-8
    for label, result in run(recipe)["objectives"].items():
        assert statistics.fmean(result["final"]["kl_to_target"]) < 0.01, label
        final = torch.tensor(result["final_policy"], dtype=torch.float64)
        kl_ref = (final * (final.log() - ref_law.log())).sum(-1)
        to_exp_tilt = kl_to_tilt(kl_ref, final, ref_law, rewards.double(), beta)
        assert float(to_exp_tilt.mean()) > 3 * statistics.fmean(result["final"]["kl_to_target"]), label


def test_kl_in_the_reward_reads_pi_old_so_advantages_hold_across_passes():
    """``kl: reward`` with updates_per_batch > 1: the policy moves between passes, π_old does not,
    and neither do the advantages (TRL and verl freeze them at sampling)."""
    batch, logprobs = _batch(seed=2)
    objective = losses.build("grpo", beta=0.1, kl="reward", kl_estimator="k1")
    old = logprobs.detach().clone()
    passes = []
    for moved in (0.0, 0.3, -0.5):  # three passes: the current log-probs drift, π_old stays
        current = (old + moved * torch.rand(B, T, generator=torch.Generator().manual_seed(7))).requires_grad_(True)
        passes.append(
            objective.advantages(LossBatch(**{**batch.__dict__, "logprobs": current, "old_logprobs": old}))[0]
        )
    assert torch.equal(passes[0], passes[1]) and torch.equal(passes[0], passes[2])
    # and they are the advantages of R = r − β·KL(π_old ‖ π_ref)
    R = batch.rewards - 0.1 * ((old - batch.ref_logprobs) * batch.mask).sum(-1)
    assert torch.allclose(passes[0], _hand_advantage(R, scale=True), atol=1e-12)


def test_clip_fraction_counts_only_the_active_branch():
    """Tokens with ρ outside [1 − ε_low, 1 + ε_high] count only when the clipped branch is taken:
    ρ > 1 + ε_high with A > 0, or ρ < 1 − ε_low with A < 0 (TRL's rule)."""
    batch, logprobs = _batch(seed=3)
    g = torch.Generator().manual_seed(5)
    shift = torch.where(torch.rand(B, T, generator=g) < 0.5, -0.5, 0.5).double()  # ρ = e^{±0.5}: all outside
    clipped = LossBatch(**{**batch.__dict__, "old_logprobs": logprobs.detach() + shift})
    _, metrics = losses.build("grpo", beta=0.0, clip_low=0.2, clip_high=0.28)(clipped)
    A = _hand_advantage(batch.rewards, scale=True)[:, None].expand(B, T)
    ratio = torch.exp(-shift)
    active = ((ratio > 1.28) & (A > 0)) | ((ratio < 0.8) & (A < 0))
    expected = float((active.double() * batch.mask).sum() / batch.mask.sum())
    assert 0 < expected < 1  # every token is outside the range, yet not every one is clipped
    assert metrics["clip_fraction"] == pytest.approx(expected, abs=1e-12)
