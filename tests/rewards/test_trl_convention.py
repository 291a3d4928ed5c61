"""Rewards written for TRL work unchanged: called with keywords (``prompts=``, ``completions=``,
the dataset's columns), registered as plain functions, or named in a recipe from a file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import rewards
from align.config import RecipeError, validate
from align.recipe import Recipe
from rewards.base import call_reward


def trl_style(completions, **kwargs):  # TRL's documented shape: no prompts parameter at all
    return [float(len(c)) for c in completions]


def test_a_trl_reward_is_called_with_keywords():
    seen = {}

    def spy(prompts, completions, reference, **kwargs):
        seen.update(prompts=prompts, reference=reference)
        return [0.0] * len(completions)

    call_reward("spy", spy, ["p1", "p2"], ["a", "b"], reference=["r1", "r2"])
    assert seen == {"prompts": ["p1", "p2"], "reference": ["r1", "r2"]}
    assert call_reward("trl", trl_style, ["p"], ["abc"]) == [3.0]


def test_register_accepts_a_plain_function():
    rewards.register(trl_style)
    try:
        assert rewards.options("trl_style") == {}
        assert rewards.build("trl_style")(prompts=["p"], completions=["ab"]) == [2.0]
    finally:
        rewards.REGISTRY.pop("trl_style")


def _recipe(model_dir, data_file, run_dir, options: dict) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_file)},
        "objective": {"name": "rloo", "k": 2, "beta": 0.05},
        "reward": [{"name": "python", "options": options}],
        "generation": {"max_new_tokens": 6},
        "train": {"steps": 1, "batch_size": 4},
        "output": {"dir": str(run_dir), "report": False, "sample_every": 0},
    }


def test_a_reward_from_a_file_trains_from_the_command_line(tiny_model_dir, tiny_data_files, tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def score(completions, **kwargs):\n    return [1.0 * len(c) for c in completions]\n"
    )
    import yaml

    path = tmp_path / "r.yaml"
    raw = _recipe(
        tiny_model_dir, tiny_data_files["prompts"], tmp_path / "run", {"path": "my_rewards.py", "function": "score"}
    )
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["reward_mean"] > 0  # the characters of the completions, as the file says


@pytest.mark.parametrize(
    "options,message",
    [
        ({"path": "nope.py", "function": "score"}, "options.path 'nope.py': no such file"),
        ({"path": "my_rewards.py", "function": "missing"}, "has no function 'missing'"),
        (
            {"module": "no_such_module_here", "function": "score"},
            "options.module 'no_such_module_here' failed to import",
        ),
        ({"function": "score"}, "exactly one of options.path"),
    ],
)
def test_a_python_reward_that_does_not_load_is_one_line(
    options, message, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def score(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RecipeError, match=message) as caught:
        validate(Recipe, _recipe(tiny_model_dir, tiny_data_files["prompts"], tmp_path / "run", options))
    assert "\n" not in str(caught.value)
