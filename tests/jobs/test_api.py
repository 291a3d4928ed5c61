"""The Python API: a recipe as a dict, an in-memory dataset, a TRL-convention reward callable;
it returns the trained model."""

from __future__ import annotations

import json

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
        "output": {"dir": str(tmp_path / "run"), "report": False, "sample_every": 0, "save_every": 1},
    }
    steps, saves = [], []

    def on_save(checkpoint):  # called once the checkpoint is whole
        saves.append((checkpoint, (checkpoint / "manifest.json").is_file()))

    result = train(
        recipe, dataset=table, reward_funcs=[vowels], on_step=lambda step, record: steps.append(record), on_save=on_save
    )
    assert result.summary["steps"] == 2 and result.run_dir == tmp_path / "run"
    assert [r["step"] for r in steps] == [1, 2] and all("reward_mean" in r for r in steps)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert saves == [(checkpoints / "step-000001", True), (checkpoints / "step-000002", True)]
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


def test_a_refused_or_resumed_call_never_swaps_the_runs_training_data(tiny_model_dir, tmp_path):
    """A second call into a run directory is refused before data/train.parquet is touched; a resume
    with other rows is refused too (it would train the old run on new data); the same rows resume."""
    import datasets

    from align import train
    from align.config import RecipeError

    def table(tag: str):
        return datasets.Dataset.from_list([{"prompt": f"{tag} {i}"} for i in range(8)])

    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": "unused.jsonl"},
        "objective": {"name": "rloo", "k": 2},
        "reward": {"name": "length", "options": {"target": 8}},
        "generation": {"max_new_tokens": 4},
        "train": {"steps": 1, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "report": False, "save_model": False},
    }
    train(recipe, dataset=table("A"))
    saved = tmp_path / "run" / "data" / "train.parquet"
    original = saved.read_bytes()
    with pytest.raises(RecipeError, match="already holds a run"):
        train(recipe, dataset=table("B"))
    assert saved.read_bytes() == original
    resumed = {**recipe, "resume": "latest", "train": {**recipe["train"], "steps": 2}}
    with pytest.raises(RecipeError, match="dataset: the resumed run .* trained on train.parquet"):
        train(resumed, dataset=table("B"))
    assert saved.read_bytes() == original and not list(saved.parent.glob(".tmp-*"))
    assert train(resumed, dataset=table("A")).summary["steps"] == 2


def test_trl_style_arguments_a_list_a_dataset_dict_held_out_pairs_and_a_peft_config(tiny_model_dir, tmp_path):
    """What a TRL user passes: rows as a list or a DatasetDict, DPO's ``eval_dataset`` of pairs (held
    out, reported), ``peft_config=LoraConfig(...)`` (trained as the recipe's model.lora)."""
    import json

    import datasets
    from peft import LoraConfig

    from align import train
    from align.config import RecipeError

    rows = [{"prompt": f"the plot {i}", "chosen": " was good .", "rejected": " was bad ."} for i in range(12)]
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": "unused.jsonl"},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2},
        "output": {"dir": str(tmp_path / "run")},
    }
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    result = train(
        recipe,
        dataset=datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8])}),
        eval_dataset=rows[8:],
        peft_config=lora,
    )
    assert result.summary["steps"] == 2
    held = json.loads((tmp_path / "run" / "report.json").read_text())["held_out_pairs"]
    assert held["pairs"] == 4 and held["reward_margin"] != 0.0
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["target_modules"] == ["c_attn"]
    with pytest.raises(RecipeError, match="dataset: expected a datasets.Dataset"):
        train({**recipe, "output": {"dir": str(tmp_path / "other")}}, dataset="rows.jsonl")


def test_an_importable_reward_function_resumes_and_samples_from_a_new_process(tiny_model_dir, tmp_path, monkeypatch):
    """A module-level reward passed as ``reward_funcs`` is recorded as a ``python`` reward naming
    its module: another process resumes the run and scores samples with it, no registry needed."""
    import os
    import subprocess
    import sys

    import datasets
    import yaml

    from align import train

    (tmp_path / "my_scores.py").write_text(
        "def vowels(prompts, completions, **kwargs):\n"
        "    return [float(sum(ch in 'aeiou' for ch in c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_scores

    run = tmp_path / "run"
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": "unused.jsonl"},
        "objective": {"name": "rloo", "k": 2},
        "generation": {"max_new_tokens": 4},
        "train": {"steps": 1, "batch_size": 4},
        "output": {"dir": str(run), "report": False},
    }
    table = datasets.Dataset.from_list([{"prompt": f"the plot {i}"} for i in range(8)])
    train(recipe, dataset=table, reward_funcs=[my_scores.vowels])
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["reward"]
    assert saved == [
        {**saved[0], "name": "python", "label": "vowels", "options": {"module": "my_scores", "function": "vowels"}}
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def align(*argv):
        return subprocess.run([sys.executable, "-m", "align.cli", *argv], capture_output=True, text=True, env=env)

    resumed = align("train", str(run / "recipe.yaml"), "resume=latest", "train.steps=2")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    sampled = align("sample", str(run), "n=2", f"out={tmp_path / 'samples.jsonl'}")
    assert sampled.returncode == 0, sampled.stderr[-1500:]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward"] == sum(ch in "aeiou" for ch in r["completion"]) for r in rows)
