"""The Python API: a recipe as a dict, an in-memory dataset, a TRL-convention reward callable;
it returns the trained model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file


def test_train_from_python_with_a_dataset_and_a_reward_callable(tiny_model_dir, tmp_path):
    import datasets

    from align import Recipe, train

    calls = []

    def vowels(completions, prompts, **kwargs):
        calls.append((len(prompts), len(completions)))
        return [float(sum(ch in "aeiou" for ch in c)) for c in completions]

    table = datasets.Dataset.from_list([{"prompt": f"the plot {i}"} for i in range(8)])
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": "unused.jsonl"},
        "objective": {"name": "rloo", "k": 2, "beta": 0.05},
        "reward": {"name": "length", "options": {"target": 8}},  # one component as a mapping, as YAML allows
        "generation": {"max_new_tokens": 6},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3},
        "output": {"dir": str(tmp_path / "run"), "report": False, "sample_every": 0},
    }
    result = train(recipe, dataset=table, reward_funcs=[vowels])
    assert result.summary["steps"] == 2 and result.run_dir == tmp_path / "run"
    assert calls and all(n_prompts == n_completions == 8 for n_prompts, n_completions in calls)  # 4 prompts × k 2
    assert (tmp_path / "run" / "data" / "train.parquet").is_file()
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    live = result.model.state_dict()
    assert all(torch.equal(live[k], saved[k]) for k in saved)
    assert result.tokenizer("the plot")["input_ids"]
    import yaml

    import rewards

    saved_rewards = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["reward"]
    assert [c["name"] for c in saved_rewards][0] == "length" and len(saved_rewards) == 2
    assert not any(name.startswith("api_") for name in rewards.REGISTRY)  # this call's callables are gone
    import align.recipe

    assert Recipe is align.recipe.Recipe


def test_a_callable_that_is_not_a_reward_is_refused(tiny_model_dir, tmp_path):
    from align import train

    recipe = {"model": {"path": str(tiny_model_dir)}, "data": {"train": "x.jsonl"}}
    with pytest.raises(TypeError, match="reward_funcs: .* is not a reward function"):
        train(recipe, reward_funcs=[lambda x: [0.0]])
