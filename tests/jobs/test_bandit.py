"""The bandit lab: fixed points, unbiased gradients, CoPG off-policy, length bias, the CLI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import losses
from align import cli
from align.config import load_recipe
from align.jobs.bandit import BanditRecipe, run
from align.jobs.bandit.lab import PairSource, build_world, make_batch
from align.jobs.bandit.targets import ipo_self_consistent, ipo_tilt, tilt_law

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "bandit"


def final_mean(result: dict, key: str) -> float:
    return statistics.fmean(result["final"][key])


# ---------------------------------------------------------------- analytic fixed points


@pytest.mark.parametrize("K,beta,instance", [(4, 0.1, 0), (10, 0.1, 1), (7, 0.4, 2), (10, 1.0, 3)])
def test_every_objective_reaches_its_fixed_point(K: int, beta: float, instance: int) -> None:
    """Random bandits, default steps/batch/lr (fewer seeds): mean KL(final ‖ target) < 0.01."""
    g = torch.Generator().manual_seed(100 + instance)
    recipe = BanditRecipe(
        rewards=torch.rand(K, generator=g).tolist(),
        ref_logits=(0.5 * torch.randn(K, generator=g)).tolist(),
        beta=beta,
        demo_reward=0.5,
        seeds=2,
        seed=instance,
        log_every=100,
    )
    results = run(recipe)
    for label, result in results["objectives"].items():
        assert final_mean(result, "kl_to_target") < 0.01, (label, result["final"]["kl_to_target"])


def test_on_policy_pairs_reach_their_fixed_points() -> None:
    """sampler: policy -- CoPG on its own groups, online DPO, and IPO's self-consistent target."""
    recipe = BanditRecipe(sampler="policy", objectives=["copg", "dpo", "ipo"], seeds=2, log_every=100)
    results = run(recipe)
    for label, result in results["objectives"].items():
        assert result["data"] == "policy"
        assert final_mean(result, "kl_to_target") < 0.01, (label, result["final"]["kl_to_target"])


def population_minimiser(loss_fn, K: int) -> torch.Tensor:
    logits = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = loss_fn(logits)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), -1)


def test_targets_minimise_the_population_losses() -> None:
    """DPO, IPO (asymmetric μ1 ≠ μ2 and symmetric μ), RCfD targets = numerical minimisers."""
    r = torch.tensor([0.9, 0.1, 0.5, 0.3], dtype=torch.float64)
    ref = torch.softmax(torch.tensor([0.2, -0.3, 0.0, 0.4], dtype=torch.float64), -1)
    mu1 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    mu2 = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    beta = 0.3
    p = torch.sigmoid(r[:, None] - r[None, :])  # P(a ≻ a')
    w = mu1[:, None] * mu2[None, :]

    def margin(logits):
        g = torch.log_softmax(logits, -1) - ref.log()
        return g[:, None] - g[None, :]

    def dpo(logits):
        m = beta * margin(logits)
        return -(w * (p * torch.nn.functional.logsigmoid(m) + (1 - p) * torch.nn.functional.logsigmoid(-m))).sum()

    def ipo(logits, weights=w):
        m = margin(logits)
        return (weights * (p * (m - 1 / (2 * beta)) ** 2 + (1 - p) * (-m - 1 / (2 * beta)) ** 2)).sum()

    torch.testing.assert_close(population_minimiser(dpo, 4), tilt_law(ref, r, beta), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        population_minimiser(ipo, 4), tilt_law(ref, ipo_tilt(r, mu1, mu2, beta), beta), atol=1e-6, rtol=0
    )
    # symmetric μ: the closed form p(a ≻ μ)
    sym = mu1[:, None] * mu1[None, :]
    closed = tilt_law(ref, p @ mu1, beta)
    torch.testing.assert_close(tilt_law(ref, ipo_tilt(r, mu1, mu1, beta), beta), closed, atol=1e-9, rtol=0)
    torch.testing.assert_close(population_minimiser(lambda x: ipo(x, sym), 4), closed, atol=1e-6, rtol=0)
    # μ = π: a fixed point of π = π_ref·exp(p(·≻π)/β)/Z
    f = ipo_self_consistent(r, ref, 0.1)
    law = tilt_law(ref, f, 0.1)
    torch.testing.assert_close(tilt_law(ref, p @ law, 0.1), law, atol=1e-9, rtol=0)


# ---------------------------------------------------------------- unbiased stochastic gradients


def stochastic_vs_exact(recipe: BanditRecipe, name: str, exact_loss, opts: dict | None = None) -> None:
    """Each of S "seeds" holds the same logits; the per-seed gradients are S independent estimates."""
    world = build_world(recipe)
    entry = recipe.objectives[0]
    objective = losses.build(name, beta=recipe.beta, **(opts or {}))
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0])
    logits = theta.expand(recipe.seeds, -1).clone().requires_grad_(True)
    pairs = PairSource(recipe, world, torch.Generator().manual_seed(1))
    batch, units = make_batch(entry, objective, recipe, world, logits, pairs, torch.Generator().manual_seed(2))
    loss, _ = objective(batch, num_units=units)
    (grads,) = torch.autograd.grad(loss, logits)
    mean, se = grads.double().mean(0), grads.double().std(0) / recipe.seeds**0.5

    exact_logits = theta.double().clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(exact_loss(exact_logits), exact_logits)
    assert bool((se > 0).all())
    assert bool(((mean - exact).abs() < 5 * se + 1e-9).all()), (mean, exact, se)
    assert bool(((mean - exact).abs() < 0.05 * exact.abs().max()).all()), (mean, exact)


R4 = [1.0, 0.3, -0.5, 0.2]
REF4 = [0.0, 0.4, -0.2, 0.1]


def test_rloo_gradient_is_unbiased_for_the_kl_regularised_objective() -> None:
    beta = 0.3
    recipe = BanditRecipe(rewards=R4, ref_logits=REF4, beta=beta, objectives=["rloo"], k=4, batch_size=8, seeds=20000)
    r, ref = (
        torch.tensor(R4, dtype=torch.float64),
        torch.log_softmax(torch.tensor(REF4, dtype=torch.float64), -1),
    )

    def minus_j(logits):  # −(E_π[r] − β KL(π‖π_ref)), in closed form
        logp = torch.log_softmax(logits, -1)
        return -((logp.exp() * r).sum() - beta * (logp.exp() * (logp - ref)).sum())

    stochastic_vs_exact(recipe, "rloo", minus_j)


def copg_population(beta: float, w_fn):
    r = torch.tensor(R4, dtype=torch.float64)
    ref = torch.log_softmax(torch.tensor(REF4, dtype=torch.float64), -1)

    def loss(logits):
        h = r - beta * (torch.log_softmax(logits, -1) - ref)
        return (w_fn(logits) * (h[:, None] - h[None, :]) ** 2).sum() / (2 * beta)

    return loss


def test_copg_gradient_is_unbiased_off_policy() -> None:
    beta, mu1, mu2 = 0.5, [0.1, 0.2, 0.3, 0.4], [0.4, 0.4, 0.1, 0.1]
    recipe = BanditRecipe(
        rewards=R4,
        ref_logits=REF4,
        beta=beta,
        objectives=["copg"],
        sampler={"mu1": mu1, "mu2": mu2},
        batch_size=4,
        seeds=20000,
    )
    w = torch.tensor(mu1, dtype=torch.float64)[:, None] * torch.tensor(mu2, dtype=torch.float64)[None, :]
    stochastic_vs_exact(recipe, "copg", copg_population(beta, lambda _: w))


def test_copg_gradient_is_unbiased_on_policy() -> None:
    """Pairs within groups of k samples of π: the population loss weighs pairs by π⊗π, held fixed."""
    beta = 0.5
    recipe = BanditRecipe(
        rewards=R4,
        ref_logits=REF4,
        beta=beta,
        objectives=["copg"],
        sampler="policy",
        k=3,
        batch_size=6,
        seeds=20000,
    )

    def w(logits):
        pi = torch.softmax(logits.detach(), -1)
        return pi[:, None] * pi[None, :]

    stochastic_vs_exact(recipe, "copg", copg_population(beta, w))


# ---------------------------------------------------------------- CoPG off-policy


def test_copg_on_uniform_pairs_reaches_pi_star() -> None:
    recipe = BanditRecipe(objectives=["copg"], sampler="uniform", seeds=2, log_every=100)
    result = run(recipe)["objectives"]["copg"]
    assert result["data"] == "sampler"
    assert final_mean(result, "kl_to_target") < 1e-3


def test_copg_paper_bandit_reaches_pi_star_where_plain_pg_does_not() -> None:
    # the shipped recipe, fewer seeds and steps (lr 3e-3 for 1500 steps instead of 1e-3 for 4000)
    recipe = load_recipe(BanditRecipe, RECIPES / "copg_offpolicy.yaml", ["seeds=2", "steps=1500", "lr=0.003"])
    runs = run(recipe)["objectives"]
    pi_star = torch.softmax(torch.tensor([2.5, 2.0, 1.0]) / 0.5, -1)
    torch.testing.assert_close(torch.tensor(runs["copg"]["target_policy"]).float(), pi_star)
    assert final_mean(runs["copg"], "kl_to_target") < 0.01
    assert final_mean(runs["pg_offpolicy"], "kl_to_target") > 0.5


def test_copg_from_a_replay_buffer_reaches_pi_star() -> None:
    """The CoPG paper's bandit with the policy's own stale samples: each element of a pair from the
    policy of one of the last 50 steps (per objective), no importance weights."""
    recipe = load_recipe(
        BanditRecipe,
        RECIPES / "copg_offpolicy.yaml",
        ["seeds=2", "steps=1500", "lr=0.003", "sampler={replay_steps: 50, mix: 0.25}", "objectives=[copg]"],
    )
    result = run(recipe)["objectives"]["copg"]
    assert result["data"] == "sampler"
    assert final_mean(result, "kl_to_target") < 0.01


def test_replay_sampler_errors_are_one_line(capsys) -> None:
    code = cli.main(["bandit", str(RECIPES / "copg_offpolicy.yaml"), "sampler={replay_steps: 0}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "replay_steps" in err[0]


def test_reference_free_pair_objectives_run_in_the_lab() -> None:
    """SimPO and ORPO declare no fixed point (no reference to tilt): the lab reports no target, and
    trains them to the minimiser of their population loss over uniform Bradley–Terry pairs, solved
    here numerically, on an instance no other test tuned on. On a bandit (T = 1) SimPO at γ = 0 is
    DPO against a uniform reference (ℓ̄ = ℓ; a constant ℓ_ref cancels): π ∝ exp(r/β) exactly."""
    g = torch.Generator().manual_seed(4242)
    r = torch.rand(5, generator=g, dtype=torch.float64)
    beta, gamma, lam = 0.5, 0.4, 0.5
    entries = [
        {"name": "simpo", "label": "simpo_0", "beta": beta, "simpo_gamma": 0.0},
        {"name": "simpo", "beta": beta, "simpo_gamma": gamma},
        {"name": "orpo", "beta": lam},
    ]
    recipe = BanditRecipe(rewards=r.tolist(), ref_logits=None, objectives=entries, seeds=2, seed=7, log_every=100)
    results = run(recipe)["objectives"]
    p = torch.sigmoid(r[:, None] - r[None, :])  # P(a ≻ a'), every (a, a') equally likely, a = a' too
    ls = torch.nn.functional.logsigmoid

    def simpo(logits, gamma=gamma):
        lp = torch.log_softmax(logits, -1)
        m = beta * (lp[:, None] - lp[None, :])
        return -(p * ls(m - gamma) + (1 - p) * ls(-m - gamma)).mean()

    def orpo(logits):
        lp = torch.log_softmax(logits, -1)
        odds = lp - torch.log(-torch.expm1(lp))
        o = odds[:, None] - odds[None, :]
        nll = p * -lp[:, None] + (1 - p) * -lp[None, :]  # the chosen side's NLL
        return (nll - lam * (p * ls(o) + (1 - p) * ls(-o))).mean()

    targets = {
        "simpo_0": torch.softmax(r / beta, -1),
        "simpo": population_minimiser(simpo, 5),
        "orpo": population_minimiser(orpo, 5),
    }
    torch.testing.assert_close(population_minimiser(lambda x: simpo(x, 0.0), 5), targets["simpo_0"], atol=1e-6, rtol=0)
    for label, target in targets.items():
        result = results[label]
        assert result["target_policy"] is None and "kl_to_target" not in result["final"]
        for law in torch.tensor(result["final_policy"], dtype=torch.float64):
            assert float((law * (law / target).log()).sum()) < 2e-3, (label, law, target)
    # the margin γ sharpens SimPO's policy beyond DPO's
    assert float(targets["simpo"].max()) > float(targets["simpo_0"].max()) + 0.02


# ---------------------------------------------------------------- sequence mode


def test_summed_dpo_drifts_longer_than_averaged_dpo_at_equal_kl() -> None:
    recipe = load_recipe(BanditRecipe, RECIPES / "length_bias.yaml", ["seeds=2", "steps=250", "batch_size=128"])
    runs = run(recipe)["objectives"]
    summed, averaged = runs["dpo"], runs["dpo_avg"]
    assert "mean_length" in summed["curves"] and "kl_to_target" not in averaged["final"]
    assert final_mean(summed, "mean_length") > final_mean(averaged, "mean_length") + 0.1
    # ... and at no larger KL to the reference: summed DPO spends its KL budget on length
    assert final_mean(summed, "kl_to_ref") < 1.2 * final_mean(averaged, "kl_to_ref")
    # summed DPO's fixed point is the KL-regularised optimum π_ref·exp(r/β), where RLOO also goes
    assert abs(final_mean(summed, "mean_length") - summed["target_mean_length"]) < 0.3


# ---------------------------------------------------------------- recipes and CLI


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["bogus=1"], "bogus"),
        (["ref_logits=[0, 1]"], "ref_logits"),
        (["objectives=[dpo, nope]"], "objectives"),
        (["beta=0"], "beta"),
        (["beta=-1"], "beta"),
        (["objectives=[{name: rloo, kl_estimator: k3}]"], "kl_estimator"),
        (["rewards=[.nan, 1.0, 0.5]"], "'rewards.0': Input should be a finite number"),  # was torch's internal assert
        (["demo_reward=.inf"], "'demo_reward': Input should be a finite number"),
    ],
)
def test_bad_recipes_exit_2_with_one_line(overrides, field, capsys) -> None:
    assert cli.main(["bandit", str(RECIPES / "default.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err, err


def test_bad_recipe_through_the_installed_command() -> None:
    exe = Path(sys.executable).parent / "align"
    proc = subprocess.run([str(exe), "bandit", "beta=0", "objectives=[nope]"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_end_to_end_writes_results_and_plot(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "small.yaml"
    recipe.write_text(
        "rewards: [1.0, 0.0, 0.5]\nbeta: 0.5\nsteps: 20\nseeds: 2\nbatch_size: 16\nlog_every: 5\n"
        "objectives: [rloo, {name: dpo, average_logprobs: true}, dpo]\n"
    )
    assert cli.main(["bandit", str(recipe), "ref_logits=null", f"out={tmp_path / 'out'}"]) == 0
    assert "dpo_avg" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pi_ref"] == pytest.approx([1 / 3] * 3)
    assert set(results["objectives"]) == {"rloo", "dpo_avg", "dpo"}
    for result in results["objectives"].values():
        assert len(result["target_policy"]) == 3
        assert len(result["final_policy"]) == 2 and len(result["final_policy"][0]) == 3
        curves = result["curves"]
        assert curves["step"] == [0, 5, 10, 15, 20]
        for key in ("kl_to_target", "expected_reward", "kl_to_ref", "kl_to_target_std"):
            assert len(curves[key]) == 5
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
