"""PPO against its equations: per-token KL rewards, GAE by an independent sum, advantage
whitening over the whole batch, the clipped surrogate and value loss by hand, the active-branch
clip fraction, and the fixed point it declares on bandits and sequences."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

import losses
from align.config import RecipeError, validate
from align.recipe import Recipe
from losses import LossBatch
from losses.base import moment_sums
from losses.ppo import gae, token_rewards

B, T = 4, 5


def _batch(seed: int = 0, **fields) -> tuple[LossBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1).requires_grad_(True)
    values = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    batch = LossBatch(
        logprobs=logprobs,
        mask=mask,
        ref_logprobs=logprobs.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        rewards=torch.randn(B, generator=g, dtype=torch.float64),
        values=values,
        **fields,
    )
    return batch, logprobs, values


def _hand_advantages(batch: LossBatch, beta: float, gamma: float, lam: float) -> torch.Tensor:
    """A_t = Σ_l (γλ)^l δ_{t+l} over each completion's own tokens, written as the sum it is."""
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        n = int(batch.mask[i].sum())
        v = batch.values.detach()[i, :n].tolist() + [0.0]
        r = (-beta * (batch.logprobs.detach()[i, :n] - batch.ref_logprobs[i, :n])).tolist()
        r[-1] += float(batch.rewards[i])
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[i, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_and_the_gradient_are_the_equations(gamma, lam):
    batch, logprobs, values = _batch()
    beta, vf_coef = 0.1, 0.3
    A = _hand_advantages(batch, beta, gamma, lam)
    rewards = token_rewards(batch.rewards, batch.logprobs, batch.ref_logprobs, batch.mask, beta)
    assert torch.allclose(gae(rewards, values.detach() * batch.mask, batch.mask, gamma, lam), A, atol=1e-12)
    objective = losses.build("ppo", beta=beta, gamma=gamma, lam=lam, vf_coef=vf_coef, whiten_advantages=False)
    loss, metrics = objective(batch)
    g_logprobs, g_values = torch.autograd.grad(loss, [logprobs, values])
    N = batch.mask.sum()
    # on-policy (ρ = 1, V_old = V): −A_t/N on each token, and vf_coef·(V − G)/N with G = A + V
    assert torch.allclose(g_logprobs, -A * batch.mask / N, atol=1e-12)
    assert torch.allclose(g_values, vf_coef * (-A) * batch.mask / N, atol=1e-12)
    assert objective.unit == "token" and objective.count_units(batch) == int(N)
    kl = ((batch.logprobs.detach() - batch.ref_logprobs) * batch.mask).sum(-1)
    assert metrics["kl"] == pytest.approx(float(kl.mean()))


def test_ratio_and_value_clipping():
    batch, logprobs, values = _batch(seed=1)
    old = logprobs.detach() - 0.5  # ρ = e^0.5 > 1 + clip on every token
    old_values = values.detach() + 1.0  # V − V_old = −1: outside ±value_clip everywhere
    clipped = LossBatch(**{**batch.__dict__, "old_logprobs": old, "old_values": old_values})
    objective = losses.build("ppo", beta=0.0, lam=1.0, clip=0.2, value_clip=0.2, vf_coef=1.0, whiten_advantages=False)
    loss, metrics = objective(clipped)
    g_logprobs, g_values = torch.autograd.grad(loss, [logprobs, values])
    A = _hand_advantages(LossBatch(**{**batch.__dict__, "values": old_values}), 0.0, 1.0, 1.0)
    N = batch.mask.sum()
    # positive advantages: the clipped term min(ρA, 1.2·A) is constant, no gradient; negative: ρ·A
    ratio = torch.exp(torch.tensor(0.5, dtype=torch.float64))
    expected = torch.where(A > 0, torch.zeros_like(A), -ratio * A) * batch.mask / N
    assert torch.allclose(g_logprobs, expected, atol=1e-12)
    # value: G = A + V_old; the unclipped (V − G)² is used only where it is the larger of the two
    G = A + old_values
    raw = (values.detach() - G) ** 2
    clip_v = (old_values - 0.2 - G) ** 2
    expected_v = torch.where(raw >= clip_v, values.detach() - G, torch.zeros_like(G)) * batch.mask / N
    assert torch.allclose(g_values, expected_v, atol=1e-12)
    # the clip is active only where it takes the gradient away: ρ > 1.2 with A > 0 (TRL's rule);
    # every token has ρ > 1.2, so the fraction is that of the completion tokens with A > 0
    active = float(((A > 0).double() * batch.mask).sum() / N)
    assert 0 < active < 1
    assert metrics["clip_fraction"] == pytest.approx(active, abs=1e-12)


def _hand_whitened(A: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_whiten: mean and unbiased variance over the completion tokens, written out."""
    values = [float(a) for a, m in zip(A.flatten(), mask.flatten()) if m > 0]
    mean, var = statistics.fmean(values), statistics.variance(values)
    return (A - mean) / (var + 1e-8) ** 0.5 * mask


def test_whitened_advantages_are_the_batch_moments_and_split_like_one_batch():
    batch, logprobs, values = _batch(seed=3)
    beta, gamma, lam = 0.1, 1.0, 0.95
    objective = losses.build("ppo", beta=beta, gamma=gamma, lam=lam, vf_coef=0.0)
    loss, _ = objective(batch)
    (g_logprobs,) = torch.autograd.grad(loss, [logprobs])
    A = _hand_whitened(_hand_advantages(batch, beta, gamma, lam), batch.mask)
    N = batch.mask.sum()
    assert torch.allclose(g_logprobs, -A / N, atol=1e-12)
    # two micro-batches handed the whole batch's sums (what the trainer all-reduces) give its gradient
    stats = objective.batch_stats(batch)

    def split_gradient(stats):
        total = sum(
            objective(replace(batch.select(torch.tensor(rows)), stats=stats), num_units=float(N))[0]
            for rows in ([0, 1], [2, 3])
        )
        return torch.autograd.grad(total, [logprobs])[0]

    assert torch.allclose(split_gradient(stats), g_logprobs, atol=1e-12)
    # each half whitened by its own moments (stats None) would be another update
    assert (split_gradient(None) - g_logprobs).abs().max() > 1e-3


def test_whitened_first_update_does_not_scale_with_the_reward():
    """The first step: π = π_ref (k1 = 0) and a zero critic, so A scales with r; whitened, the
    policy gradient is the same for r and 10·r, where unwhitened it is 10 times larger."""
    grads = {}
    for whiten in (True, False):
        for scale in (1.0, 10.0):
            batch, logprobs, _ = _batch(seed=4)
            batch = replace(
                batch,
                ref_logprobs=logprobs.detach().clone(),
                values=torch.zeros(B, T, dtype=torch.float64, requires_grad=True),
                rewards=batch.rewards * scale,
            )
            objective = losses.build("ppo", beta=0.1, vf_coef=0.1, whiten_advantages=whiten)
            (grads[whiten, scale],) = torch.autograd.grad(objective(batch)[0], [logprobs])
    assert torch.allclose(grads[True, 1.0], grads[True, 10.0], atol=1e-12)
    assert grads[True, 1.0].abs().max() > 1e-3
    assert torch.allclose(grads[False, 10.0], 10 * grads[False, 1.0], atol=1e-12)


def test_moment_sums_of_a_batch_are_the_sums_of_its_parts():
    batch, _, _ = _batch(seed=5)
    objective = losses.build("ppo", beta=0.1)
    whole = objective.batch_stats(batch)
    parts = [objective.batch_stats(batch.select(torch.tensor(r))) for r in ([0], [1, 2], [3])]
    for key in whole:
        assert torch.allclose(whole[key], sum(p[key] for p in parts), atol=1e-12)
    assert float(whole["count"]) == float(batch.mask.sum())
    A = moment_sums(torch.ones(B, T, dtype=torch.float64), batch.mask, torch.zeros(B, dtype=torch.long))
    assert float(A["sum"]) == float(batch.mask.sum())


def test_bad_options_and_the_critic_section(tmp_path):
    with pytest.raises(ValueError, match="gamma, lam"):
        losses.build("ppo", lam=1.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        losses.build("ppo", kl_estimator="k3")
    raw = {
        "model": {"path": "m"},
        "data": {"train": "d.jsonl"},
        "objective": {"name": "rloo"},
        "reward": [{"name": "length", "options": {"target": 5}}],
        "critic": {"lr": 1e-4},
    }
    with pytest.raises(RecipeError, match=r"critic: 'rloo' reads no values \(ppo does\)"):
        validate(Recipe, raw)
    raw["objective"] = {"name": "ppo", "k": 1}
    assert validate(Recipe, raw).critic.lr == 1e-4


@pytest.mark.parametrize("K_arms,beta,instance", [(4, 0.1, 0), (10, 0.4, 1)])
def test_ppo_reaches_the_kl_regularised_optimum(K_arms, beta, instance):
    """Random bandits, a tabular critic trained by the same loss: KL(final ‖ π_ref·exp(r/β)) < 0.01."""
    from align.jobs.bandit import BanditRecipe, run

    g = torch.Generator().manual_seed(300 + instance)
    recipe = BanditRecipe(
        rewards=torch.rand(K_arms, generator=g).tolist(),
        ref_logits=(0.5 * torch.randn(K_arms, generator=g)).tolist(),
        beta=beta,
        seeds=2,
        seed=instance,
        log_every=100,
        objectives=["ppo", {"name": "ppo", "lam": 1.0, "vf_coef": 1.0, "value_clip": None}],
    )
    for label, result in run(recipe)["objectives"].items():
        assert statistics.fmean(result["final"]["kl_to_target"]) < 0.01, label


def test_ppo_on_sequences_reaches_the_optimum_with_a_per_position_critic():
    from align.jobs.bandit import BanditRecipe, run

    recipe = BanditRecipe(mode="sequence", beta=0.3, seeds=2, steps=300, log_every=100, objectives=["ppo"])
    result = run(recipe)["objectives"]["ppo"]
    assert statistics.fmean(result["final"]["kl_to_target"]) < 0.01
    assert statistics.fmean(result["final"]["kl_to_ref"]) > 0.3  # it moved: the target is far from π_ref
