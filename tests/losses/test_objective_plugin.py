"""A new objective is one class plus ``losses.register``: defined here, in the test file, it is
validated by the recipe, trained by the bandit lab to its fixed point and by the LLM trainer, with
no edit to align/ (the trainer, recipe and lab read its declarations, never its name)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import losses
from align.config import RecipeError, validate
from align.jobs.bandit import BanditRecipe, run
from align.recipe import Recipe
from align.trainer import train
from losses.base import LossBatch, Objective, sequence_logprobs
from losses.kl import regularised_reward


class GroupMeanPG(Objective):
    """Policy gradient with the group-mean baseline (the sample itself included):

        R_i = r_i − β·KL_seq(y_i),   A_i = R_i − mean_{j in group(i)} R_j,   L = −(1/N) Σ_i A_i·ℓ(y_i)

    E[A_i ∇ℓ_i] = (1 − 1/k)·∇E[R]: the fixed point is π* ∝ π_ref·exp(r/β). With k = 2,
    A_i = (R_i − R_j)/2, half of RLOO's advantage, so at β = 0 its loss is exactly half RLOO's.
    """

    name = "toy_group_mean_pg"
    unit = "sequence"
    feeds = ("online",)
    needs = ("rewards", "group")
    min_k = 2

    def __init__(self, beta: float = 0.05):
        self.beta = beta

    def terms(self, batch: LossBatch) -> tuple[Tensor, dict[str, Tensor]]:
        R, kl = regularised_reward(batch.rewards, batch.logprobs, batch.ref_logprobs, batch.mask, self.beta)
        _, inverse = torch.unique(batch.group, return_inverse=True)
        sums = torch.zeros(int(inverse.max()) + 1, dtype=R.dtype, device=R.device).index_add_(0, inverse, R)
        advantage = R - (sums / torch.bincount(inverse).to(R.dtype))[inverse]
        logp = sequence_logprobs(batch.logprobs, batch.mask)
        return -advantage * logp, {"advantage": advantage, "kl": kl}


@pytest.fixture
def toy_objective():
    losses.register(GroupMeanPG)
    yield GroupMeanPG
    losses.REGISTRY.pop(GroupMeanPG.name)


def test_toy_objective_reaches_its_fixed_point_in_the_bandit_lab(toy_objective) -> None:
    results = run(BanditRecipe(objectives=[toy_objective.name], seeds=2, log_every=100))
    result = results["objectives"][toy_objective.name]
    assert result["data"] == "policy"  # declared online only: fed samples of the policy
    kl = sum(result["final"]["kl_to_target"]) / len(result["final"]["kl_to_target"])
    assert kl < 0.01, result["final"]["kl_to_target"]


def _recipe(model_dir, data_files, run_dir, name: str, lr: float, k: int = 2) -> Recipe:
    return validate(
        Recipe,
        {
            "model": {"path": str(model_dir)},
            "data": {"train": str(data_files["prompts"])},
            "objective": {"name": name, "beta": 0.0, "k": k},
            "reward": [{"name": "length", "options": {"target": 12, "unit": "chars"}}],
            "generation": {"max_new_tokens": 8, "stop_strings": ["e"]},
            "train": {"steps": 2, "batch_size": 4, "lr": lr, "optimizer": "sgd", "seed": 3, "max_grad_norm": None},
            "output": {"dir": str(run_dir), "report": False, "sample_every": 0},
        },
    )


def test_toy_objective_trains_through_the_trainer(toy_objective, tiny_model_dir, tiny_data_files, tmp_path) -> None:
    """Half RLOO's loss at twice the SGD step gives RLOO's weights, step for step."""
    from safetensors.torch import load_file

    train(_recipe(tiny_model_dir, tiny_data_files, tmp_path / "toy", toy_objective.name, lr=0.1))
    train(_recipe(tiny_model_dir, tiny_data_files, tmp_path / "rloo", "rloo", lr=0.05))
    toy = load_file(str(tmp_path / "toy" / "final" / "model.safetensors"))
    rloo = load_file(str(tmp_path / "rloo" / "final" / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max(float((rloo[k] - start[k]).abs().max()) for k in rloo if k in start)
    gap = max(float((toy[k] - rloo[k]).abs().max()) for k in rloo)
    assert moved > 1e-4 and gap < 1e-3 * moved, (moved, gap)


def test_toy_objective_declarations_drive_recipe_validation(toy_objective, tiny_model_dir, tiny_data_files, tmp_path):
    with pytest.raises(RecipeError, match=r"objective.k: 'toy_group_mean_pg' needs k >= 2"):
        _recipe(tiny_model_dir, tiny_data_files, tmp_path, toy_objective.name, lr=0.1, k=1)
    bad = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(tiny_data_files["pairs"])},
        "objective": {"name": toy_objective.name, "mode": "offline"},
    }
    with pytest.raises(RecipeError, match="needs samples from the policy"):
        validate(Recipe, bad)
