"""The objective entry every recipe kind shares, and the run quantities the core supplies to the
options an objective declares (``run_inputs`` / ``run_defaults``), never by the option's name."""

from __future__ import annotations

import pytest
from torch import Tensor

import losses
from align.config import RecipeError, validate
from align.jobs.bandit import BanditRecipe
from align.jobs.compare.config import CompareRecipe
from align.jobs.compare.config import run_recipe as compare_run
from align.jobs.overopt.config import OveroptRecipe
from align.model_card import write_model_card
from align.objective import ObjectiveConfig
from align.recipe import Recipe
from losses.base import LossBatch, Objective, sequence_logprobs

REWARD = [{"name": "length", "options": {"target": 8}}]


def train_recipe(objective, **sections) -> Recipe:
    raw = {"model": {"path": "gpt2"}, "data": {"train": "x.jsonl"}, "objective": objective, "reward": REWARD}
    return validate(Recipe, {**raw, **sections})


class Scaled(Objective):
    """A toy with one option of each declaration, named unlike RCfD's and Dr. GRPO's."""

    name = "toy_scaled"
    unit = "sequence"
    feeds = ("online",)
    needs = ("rewards",)
    run_inputs = {"scales": "reward_weights"}
    run_defaults = {"horizon": "max_new_tokens", "group_size": "k"}

    def __init__(self, beta: float = 0.0, scales=None, horizon: int | None = None, group_size: int | None = None):
        self.beta, self.scales, self.horizon, self.group_size = beta, scales, horizon, group_size

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return -batch.rewards * sequence_logprobs(batch.logprobs, batch.mask), {}


@pytest.fixture
def scaled():
    losses.register(Scaled)
    yield Scaled
    losses.REGISTRY.pop(Scaled.name)


def test_the_run_supplies_what_an_objective_declares(scaled) -> None:
    weighted = [{**REWARD[0], "weight": 2.0}, {"name": "length", "options": {"target": 4}, "weight": 0.5}]
    recipe = train_recipe({"name": "toy_scaled", "k": 3}, reward=weighted, generation={"max_new_tokens": 40})
    built = recipe.build_objective()
    assert (built.scales, built.horizon, built.group_size) == ([2.0, 0.5], 40, 3)
    # a run_defaults option given by the recipe wins; a run_inputs one is refused, its home named
    given = train_recipe({"name": "toy_scaled", "horizon": 7}, generation={"max_new_tokens": 40})
    assert given.build_objective().horizon == 7
    with pytest.raises(RecipeError, match=r"objective.options.scales: 'toy_scaled' takes each component's weight"):
        train_recipe({"name": "toy_scaled", "options": {"scales": [1.0]}})
    with pytest.raises(RecipeError, match=r"reward\[0\].normalize: 'toy_scaled' compares each raw"):
        train_recipe({"name": "toy_scaled"}, reward=[{**REWARD[0], "normalize": True}])
    # a caller that knows no run quantity (the bandit lab) leaves the objective's defaults
    bare = recipe.objective.build()
    assert (bare.scales, bare.horizon, bare.group_size) == (None, None, None)


def test_the_built_in_declarations_give_what_the_recipe_gave_by_option_name() -> None:
    weighted = [{**REWARD[0], "weight": 1.0}, {"name": "length", "options": {"target": 4}, "weight": 3.0}]
    assert train_recipe({"name": "rcfd", "k": 2}, reward=weighted).build_objective().weights.tolist() == [1.0, 3.0]
    assert train_recipe({"name": "dr_grpo"}, generation={"max_new_tokens": 48}).build_objective().norm_length == 48
    assert train_recipe({"name": "grpo"}, generation={"max_new_tokens": 48}).build_objective().norm_length == 48
    assert train_recipe({"name": "rloo"}).build_objective().beta == 0.05  # declares nothing: options untouched


def test_a_bad_declaration_fails_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="'budget' is not one of"):
        type("Bad", (Scaled,), {"run_defaults": {"horizon": "budget"}})
    with pytest.raises(TypeError, match="'nope' is not an option of its constructor"):
        type("Bad", (Scaled,), {"run_inputs": {"nope": "k"}})


def test_beta_has_one_home_whatever_key_gave_it() -> None:
    given = (
        {"beta": 0.3},
        {"options": {"beta": 0.3}},
        {"beta": 0.3, "options": {"beta": 0.3}},
        {"kl_estimator": "k1", "beta": 0.3},
    )
    for entry in ({"name": "rloo", **keys} for keys in given):
        objective = train_recipe(entry).objective
        assert objective.beta == 0.3 and "beta" not in objective.options
        assert objective.run_name == "rloo_beta0.3" and train_recipe(entry).build_objective().beta == 0.3
    assert train_recipe({"name": "dr_grpo"}).objective.beta == 0.04  # not given: the objective's default
    assert ObjectiveConfig(name="sft").beta is None  # no KL coefficient at all
    with pytest.raises(RecipeError, match=r"options.beta: β is given twice \(0.2 and beta: 0.1\)"):
        train_recipe({"name": "rloo", "beta": 0.1, "options": {"beta": 0.2}})
    with pytest.raises(RecipeError, match="'sft' takes no beta"):
        train_recipe({"name": "sft", "options": {"beta": 0.1}}, reward=[])


def test_the_model_card_reports_a_beta_given_as_options_beta(tmp_path) -> None:
    recipe = train_recipe({"name": "rloo", "options": {"beta": 0.37}}, output={"dir": str(tmp_path / "run")})
    write_model_card(tmp_path, recipe, {"steps": 2}, {})
    assert "objective `rloo` (β = 0.37)" in (tmp_path / "README.md").read_text()


def test_train_compare_overopt_and_bandit_recipes_accept_the_same_entry() -> None:
    entry = {"name": "rloo", "label": "rloo_current", "k": 2, "options": {"beta": 0.2, "kl_from": "current"}}
    base = {"model": {"path": "gpt2"}, "data": {"train": "x.jsonl"}}
    compare = validate(CompareRecipe, {"reward": REWARD, "samples_per_step": 8, "base": base, "objectives": [entry]})
    overopt = validate(OveroptRecipe, {"gold": REWARD, "base": base, "objectives": [entry]})
    bandit = validate(BanditRecipe, {"objectives": [entry]})
    entries = [train_recipe(entry).objective, compare.objectives[0], overopt.objectives[0], bandit.objectives[0]]
    for parsed in entries:
        assert type(parsed) is ObjectiveConfig
        assert (parsed.label, parsed.k, parsed.beta, parsed.options) == ("rloo_current", 2, 0.2, {"kl_from": "current"})
    run = compare_run(compare, compare.objectives[0], seed=0)
    assert run.objective.beta == 0.2 and run.build_objective().kl_from == "current" and run.train.batch_size == 4
    # a field one kind does not read is refused there, not ignored
    with pytest.raises(RecipeError, match=r"objective.data: a bandit entry's source of samples"):
        train_recipe({**entry, "data": "sampler"})
    with pytest.raises(RecipeError, match=r"objectives\[0\].mode: the lab picks its samples with data"):
        validate(BanditRecipe, {"objectives": [{**entry, "mode": "online"}]})


def test_bandit_entries_take_the_recipes_beta_and_k_where_they_give_none() -> None:
    recipe = validate(BanditRecipe, {"beta": 0.7, "k": 6, "objectives": ["rloo", {"name": "dpo", "beta": 1.5, "k": 2}]})
    assert [(e.beta, e.k) for e in recipe.objectives] == [(0.7, 6), (1.5, 2)]
    assert [float(e.build().beta) for e in recipe.objectives] == [0.7, 1.5]


def test_flat_option_keys_and_a_misspelt_key() -> None:
    assert train_recipe({"name": "dr_grpo", "clip_high": 0.28}).build_objective().clip_high == 0.28
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['lable'\]: expected entry keys"):
        train_recipe({"name": "rloo", "lable": "x"})
