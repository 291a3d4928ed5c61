"""Scoring rollouts and pairs (align/batches.py; align/scoring.py) on a tiny random GPT-2: a pair
file without rewards scores chosen ½ and rejected 0 (offline CoPG at β is IPO at β); RCfD whitens
each component's gap to its demonstration and compares raw clipped scores; a reward that returns
the wrong number of scores stops the run naming it; unscored samples leave the loss and the
step's metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    GENERATION,
    SGD_LR,
    final_params,
    make_recipe,
    max_diff,
    register_test_reward,
    run_metrics,
    with_rewards,
)
from safetensors.torch import load_file

from align.config import RecipeError, validate
from align.recipe import Recipe
from align.trainer import train


def test_offline_copg_without_rewards_is_ipo_at_the_same_beta(tiny_model_dir, tiny_data_files, tmp_path):
    """A pair file with no rewards: CoPG's reward gap is ½, so (½ − βΔ)²/(2β) = (β/2)·IPO's loss
    and SGD with lr·2/β gives IPO's weights at the same β (a gap of 1 would be IPO at β/2)."""
    beta, lr = 0.5, SGD_LR["ipo"]
    finals = {}
    for key, step in [("ipo", lr), ("copg_offline", lr * 2 / beta)]:
        run = tmp_path / key
        train(make_recipe(tiny_model_dir, tiny_data_files, run, key, optimizer="sgd", lr=step, max_grad_norm=None))
        finals[key] = final_params(run)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max_diff(finals["ipo"], {k: v for k, v in initial.items() if k in finals["ipo"]}) > 1e-4
    assert max_diff(finals["ipo"], finals["copg_offline"]) < 1e-6


def test_rcfd_whitens_each_component_by_its_demonstrations(tiny_model_dir, tiny_data_files, tmp_path):
    """RCfD with two components of scales 1 and 100: each component's squared gap to the
    demonstration is whitened over the batch (Rita et al. §3.2), so multiplying one component by
    100 changes nothing; its weight comes from the reward section."""
    import rewards

    def length_score(prompts, completions, **_):
        return [len(c) / 10 for c in completions]

    def vowel_score(scale):
        return lambda prompts, completions, **_: [scale * sum(ch in "aeiou" for ch in c) for c in completions]

    rewards.register(lambda: length_score, name="test_length_score")
    rewards.register(lambda: vowel_score(1.0), name="test_vowels_x1")
    rewards.register(lambda: vowel_score(100.0), name="test_vowels_x100")
    finals = {}
    for scale in ("x1", "x100"):
        recipe = make_recipe(
            tiny_model_dir, tiny_data_files, tmp_path / scale, "rcfd", optimizer="sgd", lr=0.05, max_grad_norm=None
        )
        components = [{"name": "test_length_score", "weight": 1.0}, {"name": f"test_vowels_{scale}", "weight": 3.0}]
        recipe = validate(Recipe, {**recipe.model_dump(mode="json"), "reward": components})
        assert recipe.build_objective().weights.tolist() == [1.0, 3.0]
        train(recipe)
        finals[scale] = final_params(tmp_path / scale)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max_diff(finals["x1"], {k: v for k, v in initial.items() if k in finals["x1"]}) > 1e-4
    assert max_diff(finals["x1"], finals["x100"]) < 1e-6

    raw = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "bad", "rcfd").model_dump(mode="json")
    with pytest.raises(RecipeError, match=r"objective.options.weights: 'rcfd' takes each component's weight"):
        validate(Recipe, {**raw, "objective": {**raw["objective"], "options": {"weights": [1.0]}}})
    with pytest.raises(RecipeError, match=r"reward\[0\].normalize: 'rcfd' compares each raw \(clipped\) component"):
        validate(Recipe, {**raw, "reward": [{**raw["reward"][0], "normalize": True}]})


def test_rcfd_compares_clipped_raw_scores():
    """``clip_components``: each component clipped to its ``reward[i].clip``, nothing else."""
    import rewards
    from align.recipe import RewardComponent
    from align.rewards_adapter import RewardFunction

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    rewards.register(lambda: length, name="test_len_raw")
    components = [RewardComponent(name="test_len_raw"), RewardComponent(name="test_len_raw", clip=[0.0, 3.0])]
    reward = RewardFunction(components, torch.device("cpu"))
    got = reward.clip_components(torch.tensor([[2.0, 2.0], [10.0, 10.0]]))
    assert got.tolist() == [[2.0, 2.0], [10.0, 3.0]]
    demo = reward.score_demonstrations(["p", "p"], ["a", "abcdefg"], {})
    assert demo.tolist() == [[1.0, 1.0], [7.0, 7.0]]  # raw: clipping is ``clip_components``'s


def test_a_raising_reward_stops_the_run_naming_it(tiny_model_dir, tiny_data_files, tmp_path):
    from rewards import RewardError

    register_test_reward("broken_scorer", lambda n, c: [0.0] * (len(c) - 1))
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=2, batch_size=4)
    recipe = with_rewards(recipe, "broken_scorer")
    with pytest.raises(RewardError, match=r"reward 'broken_scorer' returned 7 scores for 8 completions"):
        train(recipe)


def test_a_mini_batch_left_without_scored_samples_still_steps(tiny_model_dir, tiny_data_files, tmp_path):
    """Every sample of the first mini-batch unscored (a TRL reward's None): its step runs at zero
    weight, the other mini-batch trains, and the step's metrics are the scored samples' own (the
    empty mini-batch adds nothing to the means)."""
    scored: list[list[float]] = []

    def scores(n: int, completions: list[str]) -> list[float | None]:
        out = [None if i < 4 else float(len(x)) for i, x in enumerate(completions)]
        scored.append([x for x in out if x is not None])
        return out

    register_test_reward("none_for_first_four", scores)
    sgd = {"optimizer": "sgd", "lr": SGD_LR["grpo"], "max_grad_norm": None}
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "grpo", batch_size=2, mini_batches=2, **sgd)
    raw = {
        "model": {"path": "m"},
        "data": {"train": "d"},
        "objective": {"name": "rloo"},
        "reward": ["none_for_first_four"],
    }
    recipe = recipe.model_copy(update={"reward": validate(Recipe, raw).reward})
    summary = train(recipe)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    records = run_metrics(tmp_path / "run")
    assert all(r["unscored"] == 4 and math.isfinite(r["loss"]) for r in records)
    for record, step_scores in zip(records, scored):
        assert record["reward_mean"] == pytest.approx(sum(step_scores) / len(step_scores))
        assert 0 < record["completion_length"] < GENERATION["max_new_tokens"]
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    final = final_params(tmp_path / "run")
    assert max_diff({k: final[k] for k in initial}, initial) > 1e-5


def test_a_reward_that_scores_nothing_still_ends_the_run_with_its_files(tiny_model_dir, tiny_data_files, tmp_path):
    """Every sample unscored (a TRL reward returning None): nothing trains, the logged reward is
    null, and the run still writes final/ with its model card and summary.json."""
    register_test_reward("scores_nothing", lambda n, c: [None] * len(c))
    recipe = with_rewards(
        make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=2), "scores_nothing"
    )
    summary = train(recipe)
    records = run_metrics(tmp_path / "run")
    assert [r["unscored"] for r in records] == [16.0, 16.0] and records[-1]["reward/scores_nothing"] is None
    assert (tmp_path / "run" / "summary.json").is_file() and summary["steps"] == 2
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "reward_mean" not in card.split("Final step:")[1].split("\n")[0]
