"""Recipes (align/recipe.py, align/config.py): a schema error is one line, exit 2, before any model
loads; online objectives need a reward and sample from the full softmax, offline ones keep the
sampling filters; `align recipes` lists the bundled recipes."""

from __future__ import annotations

import pytest
from helpers import run_cli

from align.config import RecipeError, validate
from align.recipe import Recipe


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "field 'train.stepz': unknown key"),
        ("train.steps=many", "field 'train.steps'"),
        ("objective.name=trpo", "field 'objective.name'"),
        ("objective.options.gamma=1", "unknown option(s) ['gamma'] for 'rloo'"),
        ("generation.min_new_tokens=99", "min_new_tokens (99) > max_new_tokens (32)"),
        ("objective.k=1", "objective.k"),
        ("objective.options.kl_estimator=k3", "kl_estimator: 'k3' in the detached reward"),
        ("generation.top_k=5", "generation.top_k: online objectives sample from the full softmax"),
        ("generation.top_p=0.9", "generation.top_p: online objectives"),
        ("generation.min_new_tokens=2", "generation.min_new_tokens: online objectives"),
        ("train.learning_rate=1e-5", "field 'train.learning_rate': unknown key; did you mean 'train.lr'?"),
        ("num_generations=8", "field 'num_generations': unknown key; did you mean 'objective.k'?"),
        ("train.stepz=3", "did you mean 'train.steps'?"),
        ("train.lr=.inf", "field 'train.lr': Input should be a finite number"),
        ("train.seed=-1", "field 'train.seed': Input should be greater than or equal to 0"),
        ("train.adam_betas=[1.5, 0.9]", "field 'train.adam_betas.0': Input should be less than 1"),
        ("generation.stop_strings=['']", "field 'generation.stop_strings.0': String should have at least 1"),
    ],
)
def test_recipe_errors_are_one_line_before_any_model_loads(override, message, tmp_path):
    path = tmp_path / "r.yaml"
    # the model path does not exist: a schema error must come first
    path.write_text(
        "model: {path: /nonexistent}\ndata: {train: x.jsonl}\nobjective: {name: rloo}\nreward: [sentiment]\n"
    )
    out = run_cli("train", str(path), override)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_sampling_filters_stay_available_to_offline_objectives():
    """Filters only change what an online loss scores; DPO's eval samples may use them."""
    raw = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "objective": {"name": "dpo"}}
    recipe = validate(Recipe, {**raw, "generation": {"top_k": 5, "top_p": 0.9, "min_new_tokens": 2}})
    assert recipe.generation.top_k == 5


def test_online_objective_without_reward_is_rejected():
    with pytest.raises(RecipeError, match="reward: objective 'rloo' is trained online and needs a reward"):
        validate(Recipe, {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "objective": {"name": "rloo"}})


def test_recipes_command_lists_bundled_recipes():
    out = run_cli("recipes")
    assert out.returncode == 0
    assert "quickstart " in out.stdout and "pythia1b_tldr_rloo" in out.stdout


def test_a_trl_name_whose_meaning_differs_says_how():
    """A TRL key gets align's field; where the meaning differs, one clause says how; a key that is
    neither a TRL name nor near a field gets no guess."""
    raw = {"model": {"path": "m"}, "data": {"train": "d"}, "objective": {"name": "rloo"}, "reward": ["sentiment"]}
    with pytest.raises(RecipeError) as caught:
        validate(Recipe, {**raw, "train": {"per_device_train_batch_size": 4}})
    assert str(caught.value) == (
        "recipe: field 'train.per_device_train_batch_size': unknown key; did you mean 'train.batch_size'? "
        "(it counts prompts, each sampled objective.k times, where TRL's counts completions)"
    )
    with pytest.raises(RecipeError, match=r"did you mean 'objective.options.clip_low'\? \(TRL's clip epsilon"):
        validate(Recipe, {**raw, "epsilon": 0.2})
    with pytest.raises(RecipeError) as caught:
        validate(Recipe, {**raw, "generation": {"xyzzy": 1}})
    assert str(caught.value) == "recipe: field 'generation.xyzzy': unknown key"
