"""The bandit lab's sampling lag (``sampler: {lag: N}``): fixed points under lag 4, lag 0 = the
policy exactly, the sampler really lags (and its importance weights read it), bad input, the report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

import losses
from align import cli
from align.config import load_recipe
from align.jobs.bandit import BanditRecipe, lab, run
from align.jobs.bandit.lab import build_world, train_objective
from align.jobs.bandit.samplers import PairSource
from align.jobs.bandit.worlds import Bandit, SequenceWorld

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "bandit"

# every objective the lab trains on the policy's own samples, with options that declare a fixed point
LAGGED = [
    "reinforce",
    "rloo",
    "vanilla_pg",
    "ppo",
    {"name": "grpo", "scale_rewards": False},
    {"name": "grpo", "label": "grpo_kl_reward", "scale_rewards": False, "kl": "reward", "kl_estimator": "k1"},
    "dr_grpo",
    {"name": "gspo", "scale_rewards": False},
    {"name": "cispo", "scale_rewards": False},
    "reinforce_pp",
    {"name": "reinforce_pp", "label": "reinforce_pp_group", "baseline": "group"},
    "rcfd",
    "copg",
    "ipo",
]


def test_every_fixed_point_is_reached_under_lag_4() -> None:
    """A bandit no default was tuned on (6 arms, β 0.4, from seed 3131): under lag 4 every objective
    reaches its declared target (KL ≤ 1e-3 on every seed), and so does its lag-0 twin the lab runs
    beside it; both report the step they got there. DPO on the policy's pairs (Bradley–Terry labels
    keep its gradient noisy at the fixed point) needs the default 800 steps, the others 300."""
    g = torch.Generator().manual_seed(3131)
    bandit = dict(
        rewards=torch.rand(6, generator=g).tolist(),
        ref_logits=(0.5 * torch.randn(6, generator=g)).tolist(),
        beta=0.4,
        sampler={"lag": 4},
        seeds=2,
        seed=5,
        log_every=10,
    )
    recipe = BanditRecipe(objectives=LAGGED, steps=300, **bandit)
    results = run(recipe)
    assert results["lag"] == 4 and results["converged_kl"] == 1e-3
    runs = results["objectives"]
    assert len(runs) == len(LAGGED)
    runs |= run(BanditRecipe(objectives=["dpo"], steps=800, **bandit))["objectives"]
    # every objective that samples the policy is here (online_dpo declares no fixed point)
    online = {name for name, cls in losses.REGISTRY.items() if "online" in cls.feeds}
    assert online - {"online_dpo"} <= {runs[label]["name"] for label in runs}
    for label, result in runs.items():
        assert result["data"] == "policy"
        assert result["target_policy"] is not None, label  # each declares a fixed point with these options
        for twin in (result, result["lag0"]):
            assert max(twin["final"]["kl_to_target"]) <= 1e-3, (label, twin["final"]["kl_to_target"])
            steps = twin["steps_to_target"]
            assert steps is not None and 0 < steps <= twin["curves"]["step"][-1], (label, steps)
            i = twin["curves"]["step"].index(steps)  # the first logged step at or under the threshold
            assert twin["curves"]["kl_to_target"][i] <= 1e-3 < min(twin["curves"]["kl_to_target"][:i])


def test_lag_0_is_the_policy_sampler_exactly() -> None:
    """``{lag: 0}`` draws from a copy of the current logits: the same draws and numbers as ``sampler:
    policy``, bit for bit; an importance correction at lag 0 has weights exp(0) = 1 and changes nothing."""
    common = dict(
        objectives=["reinforce", "rloo", "ppo", {"name": "grpo", "scale_rewards": False}, "copg", "dpo", "ipo"],
        steps=25,
        seeds=2,
        batch_size=32,
        log_every=5,
    )
    policy = run(BanditRecipe(sampler="policy", **common))["objectives"]
    for sampler in ({"lag": 0}, {"lag": 0, "importance_correction": {"mode": "token_truncate", "clip_max": 2}}):
        lagged = run(BanditRecipe(sampler=sampler, **common))
        assert "lag0" not in json.dumps(lagged)  # no twin at lag 0
        assert json.dumps(lagged["objectives"]) == json.dumps(policy), sampler
    # ... and the runs did move: lag 0 is not trivially equal to an untrained policy
    assert statistics.fmean(policy["rloo"]["curves"]["kl_to_target"][-1:]) < policy["rloo"]["curves"]["kl_to_target"][0]


class Recording:
    """A world that records the tables it samples from (with the samples) and the policy logits it
    scores with."""

    def __init__(self, world):
        self.world, self.sampled, self.samples, self.scored = world, [], [], []

    def __getattr__(self, name):
        return getattr(self.world, name)

    def sample(self, logits, seeds, n, generator):
        self.sampled.append(logits.detach().clone())
        self.samples.append(self.world.sample(logits, seeds, n, generator))
        return self.samples[-1]

    def logprobs(self, logits, sample):
        if logits.requires_grad:  # the trained policy's (the lagged table is a detached copy)
            self.scored.append(logits.detach().clone())
        return self.world.logprobs(logits, sample)


@pytest.mark.parametrize("mode", ["bandit", "sequence"])
def test_the_lagged_sampler_lags(mode: str, monkeypatch) -> None:
    """Step t (1-based) samples from the logits the policy had at step max(1, t − N) -- the weights
    after max(0, t − 1 − N) updates -- and the importance weights the objective receives are
    π_current/π_lagged of the sampled tokens (token_truncate with a cap no weight reaches: the raw
    ratio), recomputed here from the recorded tables."""
    N, steps = 3, 9
    recipe = BanditRecipe(
        mode=mode,
        sampler={"lag": N, "importance_correction": {"mode": "token_truncate", "clip_max": 1e6}},
        objectives=["rloo"],
        steps=steps,
        seeds=2,
        batch_size=16,
        lr=0.3,
        sequence={"vocab_size": 3, "max_length": 4},
    )
    world = Recording(build_world(recipe))
    batches, make_batch = [], lab.make_batch

    def spy(*args, **kwargs):
        batch, units = make_batch(*args, **kwargs)
        batches.append(batch)
        return batch, units

    monkeypatch.setattr(lab, "make_batch", spy)
    train_objective(recipe.objectives[0], recipe, world, PairSource(recipe, world, torch.Generator()), 0)

    assert isinstance(world.world, Bandit if mode == "bandit" else SequenceWorld)
    assert len(world.sampled) == len(world.scored) == len(batches) == steps
    for t in range(1, steps + 1):
        drawn, current, batch, sample = world.sampled[t - 1], world.scored[t - 1], batches[t - 1], world.samples[t - 1]
        assert torch.equal(drawn, world.scored[max(1, t - N) - 1]), t
        if t > N + 1:  # the policy has moved since: the sampler is not the current one
            assert not torch.allclose(drawn, current), t
        lagged = torch.log_softmax(drawn, -1)
        now = torch.log_softmax(current, -1)
        if mode == "bandit":  # log π(a) of each sampled arm, by hand
            arms = sample.outcome
            ratio = (now.gather(1, arms) - lagged.gather(1, arms)).exp()[..., None]
        else:  # per token: the table at (position, previous token, token)
            S, n, L = sample.tokens.shape
            prev = torch.cat([torch.zeros(S, n, 1, dtype=torch.long), sample.tokens[:, :, :-1]], 2)
            index = (torch.arange(S)[:, None, None], torch.arange(L)[None, None], prev, sample.tokens)
            ratio = (now[index] - lagged[index]).exp()
        expected = (ratio * sample.mask).reshape(batch.mask.shape)
        torch.testing.assert_close(batch.sampler_weights, expected, rtol=1e-5, atol=0)
        assert batch.old_logprobs is None  # π_old = the current policy: PPO/GRPO ratios start at 1


def test_importance_correction_under_lag_keeps_the_fixed_point() -> None:
    """sequence_mask weights (C = 3) under lag 8, on a bandit no default was tuned on: the weighted
    estimators still reach π_ref·exp(r/β); CoPG, which takes no weights, is left unweighted."""
    g = torch.Generator().manual_seed(77)
    recipe = BanditRecipe(
        rewards=torch.rand(4, generator=g).tolist(),
        ref_logits=(0.5 * torch.randn(4, generator=g)).tolist(),
        sampler={"lag": 8, "importance_correction": {"mode": "sequence_mask", "clip_max": 3}, "compare_lag0": False},
        objectives=["rloo", "reinforce", "ppo", "copg"],
        steps=300,
        seeds=2,
        seed=3,
        log_every=50,
    )
    assert [losses.REGISTRY[e.name].corrects_sampler for e in recipe.objectives] == [True, True, True, False]
    for label, result in run(recipe)["objectives"].items():
        assert max(result["final"]["kl_to_target"]) <= 1e-3, (label, result["final"]["kl_to_target"])


@pytest.mark.parametrize(
    "override,field",
    [
        ("sampler={lag: -1}", "lag"),
        ("sampler={lag: 2, mix: 0.5}", "mix"),
        ("sampler={lag: 2, importance_correction: {mode: bogus}}", "mode"),
        ("sampler={lag: 2, importance_correction: {clip_min: 4, clip_max: 3}}", "clip_min"),
        ("converged_kl=0", "converged_kl"),
    ],
)
def test_bad_lag_input_exits_2_with_one_line(override: str, field: str, capsys) -> None:
    assert cli.main(["bandit", str(RECIPES / "lag.yaml"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err, err


def test_a_correction_no_objective_takes_is_refused(capsys) -> None:
    """CoPG and DPO declare no ``corrects_sampler``: weights configured for them would do nothing."""
    code = cli.main(
        [
            "bandit",
            str(RECIPES / "lag.yaml"),
            "objectives=[copg, dpo]",
            "sampler={lag: 4, importance_correction: {mode: sequence_mask}}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "sampler.importance_correction" in err, err
    # mode none is "no weights": accepted with any objective
    recipe = load_recipe(
        BanditRecipe,
        RECIPES / "lag.yaml",
        ["objectives=[copg]", "sampler={lag: 4, importance_correction: {mode: none}}"],
    )
    assert recipe.sampler.importance_correction.mode == "none"


def test_lag_recipe_end_to_end_reports_both_lags(tmp_path: Path, capsys) -> None:
    """The bundled recipe (every objective, fewer steps and seeds): results.json gives each objective
    its steps to target and its lag-0 twin's, the table shows both, online_dpo has no target."""
    out = tmp_path / "lag"
    code = cli.main(["bandit", str(RECIPES / "lag.yaml"), "steps=40", "seeds=1", "batch_size=64", f"out={out}"])
    assert code == 0
    table = capsys.readouterr().out
    assert "lag 0:" in table and "lag 4" in table and "KL to target ≤ 0.001" in table
    results = json.loads((out / "results.json").read_text())
    assert results["lag"] == 4
    recipe = load_recipe(BanditRecipe, RECIPES / "lag.yaml", [])
    assert set(results["objectives"]) == {e.label for e in recipe.objectives}
    for label, result in results["objectives"].items():
        twin = result["lag0"]
        assert twin["curves"]["step"] == result["curves"]["step"]
        if label == "online_dpo":
            assert result["steps_to_target"] is None and "kl_to_target" not in twin["final"]
        else:
            assert len(twin["final"]["kl_to_target"]) == 1
    # the same seeds: the two runs share step 0 and diverge once the lag bites
    rloo = results["objectives"]["rloo"]
    assert rloo["curves"]["kl_to_target"][0] == rloo["lag0"]["curves"]["kl_to_target"][0]
    assert rloo["curves"]["kl_to_target"][-1] != rloo["lag0"]["curves"]["kl_to_target"][-1]
    assert (out / "curves.png").stat().st_size > 1000
