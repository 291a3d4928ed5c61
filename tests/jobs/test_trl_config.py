"""`align train --from-trl grpo|rloo|dpo CONFIG.yaml` (align/jobs/trl_config.py): a TRL config's
fields mean the same after translation -- a GRPO step trains on TRL's number of completions
(per_device_train_batch_size × gradient_accumulation_steps), its loss_type picks the aggregation --
and what cannot be honoured is one line, exit 2."""

from __future__ import annotations

import pytest
import yaml
from helpers import register_test_reward, run_metrics

from align.cli import main
from align.config import RecipeError, validate
from align.jobs.trl_config import from_trl
from align.recipe import Recipe

GRPO = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,  # completions
    "num_generations": 4,
    "gradient_accumulation_steps": 2,
    "max_completion_length": 6,
    "beta": 0.04,
    "loss_type": "grpo",
    "max_steps": 2,
    "logging_steps": 1,
    "bf16": False,
}


def test_a_grpo_config_trains_trls_number_of_completions_per_step(tiny_model_dir, tiny_data_files, tmp_path, capsys):
    seen = []
    register_test_reward("counted", lambda n, completions: seen.append(len(completions)) or [0.0] * len(completions))
    config = {
        **GRPO,
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(tiny_data_files["prompts"]),
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--from-trl", "grpo", str(path), "reward=counted", "output.report=false"]) == 0
    assert "ignored (no bearing on what is trained here): bf16, logging_steps" in capsys.readouterr().err
    # TRL: 8 completions per device per micro-batch × 2 accumulation steps = 16 a step
    assert len(run_metrics(tmp_path / "run")) == 2 and sum(seen) == 2 * 16
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["objective"]["k"] == 4 and saved["train"]["batch_size"] == 2
    assert saved["objective"]["options"]["aggregation"] == "seq_mean_token_mean"
    assert saved["objective"]["options"]["scale_rewards"] is True and saved["objective"]["beta"] == 0.04


@pytest.mark.parametrize(
    "trainer, config, expected",
    [
        ("grpo", {"loss_type": "dr_grpo"}, {"name": "dr_grpo", "beta": 0.0}),
        ("grpo", {"epsilon": 0.2, "epsilon_high": 0.28}, {"name": "grpo"}),
        ("rloo", {"per_device_train_batch_size": 8, "num_generations": 2}, {"name": "rloo", "k": 2, "beta": 0.05}),
        ("dpo", {"loss_type": "sigmoid_norm", "beta": 0.2}, {"name": "dpo", "beta": 0.2}),
        ("dpo", {"loss_type": "ipo"}, {"name": "ipo", "beta": 0.1}),
    ],
)
def test_each_trainers_fields_are_translated(trainer, config, expected, tiny_model_dir, tiny_data_files):
    data = tiny_data_files["pairs" if trainer == "dpo" else "prompts"]
    raw = from_trl({"model_name_or_path": str(tiny_model_dir), "dataset_name": str(data), **config}, trainer)
    if trainer != "dpo":
        raw["reward"] = {"name": "length", "options": {"target": 8}}
    recipe = validate(Recipe, raw)
    dumped = recipe.objective.model_dump()
    assert {key: dumped[key] for key in expected} == expected
    if "epsilon_high" in config:
        assert recipe.objective.options["clip_low"] == 0.2 and recipe.objective.options["clip_high"] == 0.28
    if config.get("loss_type") in ("sigmoid_norm", "ipo"):
        assert recipe.objective.options == {"average_logprobs": True}


def test_a_dpo_configs_completion_length_cuts_its_data(tiny_model_dir, tiny_data_files):
    """DPO samples nothing: TRL's max_completion_length truncates the pairs' completions."""
    raw = {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(tiny_data_files["pairs"])}
    recipe = validate(Recipe, from_trl({**raw, "max_completion_length": 12, "learning_rate": 5e-7}, "dpo"))
    assert recipe.data.max_completion_tokens == 12 and recipe.train.lr == 5e-7


@pytest.mark.parametrize(
    "config, message",
    [
        ({"per_device_train_batch_size": 6, "num_generations": 4}, r"must be a multiple of num_generations \(4\)"),
        ({"loss_type": "sapo"}, "loss_type 'sapo'"),
        ({"importance_sampling_level": "sequence", "loss_type": "cispo"}, "importance_sampling_level 'sequence'"),
        ({"scale_rewards": "batch"}, "scale_rewards 'batch'"),
        ({"use_liger_loss": True}, "'use_liger_loss' has no align counterpart"),
        ({"use_vllm": True, "vllm_mode": "server"}, "vllm_mode: align's vLLM engine is colocated"),
    ],
)
def test_what_cannot_be_honoured_is_one_line(config, message):
    with pytest.raises(RecipeError, match=message):
        from_trl(config, "grpo")


@pytest.mark.parametrize(
    "config, name, options",
    [
        # GSPO: TRL's ε where the config gives none (gspo's own defaults are the paper's 3e-4 / 4e-4)
        ({"importance_sampling_level": "sequence", "loss_type": "grpo"}, "gspo", {"clip_low": 0.2, "clip_high": 0.2}),
        ({"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}, "gspo", {"clip_high": 4e-4}),
        ({"loss_type": "cispo", "epsilon_high": 5.0}, "cispo", {"clip_max": 5.0, "aggregation": "token_mean"}),
        ({"loss_type": "cispo"}, "cispo", {"clip_max": 0.2}),  # TRL's epsilon_high defaults to epsilon
    ],
)
def test_gspo_and_cispo_configs_are_translated(config, name, options, tiny_model_dir, tiny_data_files):
    raw = from_trl(
        {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(tiny_data_files["prompts"]), **config}, "grpo"
    )
    raw["reward"] = {"name": "length", "options": {"target": 8}}
    objective = validate(Recipe, raw).objective
    assert objective.name == name and {k: objective.options[k] for k in options} == options
    expected = {"grpo": "seq_mean_token_mean"}.get(config.get("loss_type"), "token_mean")  # TRL's default: dapo
    assert objective.options["aggregation"] == expected


def test_importance_sampling_level_in_a_recipe_points_to_gspo():
    raw = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "importance_sampling_level": "sequence"}
    with pytest.raises(RecipeError, match=r"did you mean 'objective.name'\? \('sequence' is the objective gspo\)"):
        validate(Recipe, raw)
