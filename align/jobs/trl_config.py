"""``align train --from-trl grpo|rloo|dpo TRL_CONFIG.yaml [key=value ...]``: a TRL trainer's config
(the YAML ``trl grpo --config`` reads: GRPOConfig / RLOOConfig / DPOConfig fields plus the script's
``model_name_or_path`` and ``dataset_name``) translated into an align recipe, meaning kept:

- TRL's ``per_device_train_batch_size`` counts completions for GRPO and RLOO; align's
  ``train.batch_size`` counts prompts, each sampled ``objective.k`` (``num_generations``) times, so
  it becomes per_device_train_batch_size / num_generations (which must divide): a step trains on
  the same number of completions as TRL's (× gradient_accumulation_steps × processes on both sides).
- GRPO's ``loss_type``: ``grpo`` → aggregation seq_mean_token_mean, ``dr_grpo`` → the dr_grpo
  objective, ``dapo`` / ``bnpo`` → token_mean, ``cispo`` → the cispo objective (its cap
  ``clip_max`` is TRL's ``epsilon_high``); ``importance_sampling_level: sequence`` → the gspo
  objective (TRL's ε 0.2 kept where the config gives none); ``scale_rewards``: group / true → true,
  none / false → false; ``epsilon`` / ``epsilon_high`` → clip_low / clip_high; ``num_iterations`` →
  train.updates_per_batch. DPO's ``loss_type``: sigmoid → dpo, ipo → ipo (summed, as TRL's
  ``ipo`` is length-averaged: average_logprobs true), sigmoid_norm → dpo with average_logprobs.
- Fields of the same meaning map through ``align.config.TRL_NAMES`` (the table "did you mean"
  answers a TRL name with); DPO's ``max_completion_length`` truncates its pairs' completions
  (``data.max_completion_tokens``), as it samples nothing.
- TRL's defaults where align's differ and the config leaves them out: GRPO β 0 and loss_type dapo,
  RLOO β 0.05, DPO β 0.1.

A value align cannot honour is one line naming the field (exit 2); fields with no bearing on what
is trained (logging, hub, precision flags align sets elsewhere) are listed once as ignored. Reward
functions are code in TRL scripts: give the recipe's ``reward`` as an override (``reward=length``).
"""

from __future__ import annotations

import sys
from typing import Any

from align.config import TRL_NAMES, RecipeError

TRAINERS = ("grpo", "rloo", "dpo")
# the TRL names align.config.TRL_NAMES maps whose value this module turns into something else
TRANSLATED_HERE = {
    "per_device_train_batch_size", "num_generations", "beta", "epsilon", "importance_sampling_level",
    "use_vllm", "vllm_mode", "vllm_importance_sampling_correction", "eval_strategy",
}  # fmt: skip
# the script's own arguments beside the config's (TRL's ScriptArguments), not recipe names
SCRIPT = {"dataset_name": "data.train", "dataset_train_split": "data.split"}
IGNORED = {
    "logging_steps", "logging_strategy", "bf16", "fp16", "tf32", "push_to_hub", "hub_model_id", "save_strategy",
    "eval_strategy", "per_device_eval_batch_size", "log_completions", "num_completions_to_print",
    "dataloader_num_workers", "remove_unused_columns", "overwrite_output_dir", "use_liger_kernel",
    "torch_dtype", "dtype", "attn_implementation", "log_level", "disable_tqdm",
}  # fmt: skip


def direct_fields(trainer: str) -> dict[str, str]:
    """TRL field -> recipe field, value unchanged: align.config.TRL_NAMES (the names "did you mean"
    answers with) less the ones translated here; DPO has no sampling, and its max_completion_length
    truncates the data's completions."""
    table = {name: target for name, (target, _) in TRL_NAMES.items() if name not in TRANSLATED_HERE}
    table.update(SCRIPT)
    if trainer == "dpo":
        table = {k: v for k, v in table.items() if not v.startswith("generation.") and v != "train.updates_per_batch"}
        table["max_completion_length"] = "data.max_completion_tokens"
    return table


def from_trl(config: dict[str, Any], trainer: str) -> dict[str, Any]:
    """The recipe (a dict, validated by the caller) that trains what ``config`` asks TRL to."""
    if trainer not in TRAINERS:
        raise RecipeError(f"--from-trl: expected one of {list(TRAINERS)}, got {trainer!r}")
    config = dict(config)
    recipe: dict[str, Any] = {"output": {"report": True}}
    for field, target in direct_fields(trainer).items():
        if field in config:
            put(recipe, target, config.pop(field))
    if config.pop("vllm_mode", "colocate") != "colocate":
        raise RecipeError("--from-trl: vllm_mode: align's vLLM engine is colocated (a server is not built yet)")
    if config.pop("use_vllm", False):
        put(recipe, "generation.engine", "vllm")
    if config.pop("vllm_importance_sampling_correction", True) is False:
        put(recipe, "generation.importance_correction.mode", "none")
    objective = dpo_objective(config, recipe) if trainer == "dpo" else online_objective(config, trainer, recipe)
    recipe["objective"] = objective
    ignored = sorted(k for k in config if k in IGNORED)
    unknown = sorted(k for k in config if k not in IGNORED)
    if unknown:
        raise RecipeError(f"--from-trl: {unknown[0]!r} has no align counterpart (fields: {unknown}); remove it")
    if ignored:
        print(f"align: --from-trl: ignored (no bearing on what is trained here): {', '.join(ignored)}", file=sys.stderr)
    return recipe


def online_objective(config: dict, trainer: str, recipe: dict) -> dict:
    k = int(config.pop("num_generations", 8))
    completions = int(config.pop("per_device_train_batch_size", 8))
    if completions % k:
        raise RecipeError(
            f"--from-trl: per_device_train_batch_size ({completions}) counts completions and must be a multiple "
            f"of num_generations ({k}); align's train.batch_size counts prompts"
        )
    put(recipe, "train.batch_size", completions // k)
    beta = float(config.pop("beta", 0.0 if trainer == "grpo" else 0.05))
    objective: dict[str, Any] = {"name": trainer, "k": k, "beta": beta}
    if trainer == "rloo":
        return objective
    options: dict[str, Any] = {}
    loss = config.pop("loss_type", "dapo")
    level = config.pop("importance_sampling_level", "token")
    if level not in ("token", "sequence") or (level == "sequence" and loss == "cispo"):
        raise RecipeError(f"--from-trl: importance_sampling_level {level!r}: expected token, or sequence (gspo)")
    aggregation = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "bnpo": "token_mean", "cispo": "token_mean"}
    if loss == "dr_grpo":
        objective["name"] = "dr_grpo"
    elif loss in aggregation:
        options["aggregation"] = aggregation[loss]
    else:
        raise RecipeError(f"--from-trl: loss_type {loss!r}: expected one of grpo, dr_grpo, dapo, bnpo, cispo")
    if level == "sequence":  # GSPO: its defaults are the paper's ε, TRL's stay 0.2
        objective["name"] = "gspo"
        options.update(aggregation=options.get("aggregation", "seq_mean_token_sum_norm"), clip_low=0.2, clip_high=0.2)
    if loss == "cispo":  # the weight's cap is epsilon_high itself, which TRL defaults to epsilon
        objective["name"] = "cispo"
        options["clip_max"] = float(config.pop("epsilon_high", config.pop("epsilon", 0.2)))
    scale = config.pop("scale_rewards", "group" if loss != "dr_grpo" else "none")
    if scale not in ("group", "none", True, False):
        raise RecipeError(f"--from-trl: scale_rewards {scale!r}: align scales by the group's std (group) or not (none)")
    options["scale_rewards"] = scale in ("group", True)
    if "epsilon" in config:
        options["clip_low"] = options["clip_high"] = float(config.pop("epsilon"))
    if "epsilon_high" in config:
        options["clip_high"] = float(config.pop("epsilon_high"))
    # TRL puts GRPO's KL (beta > 0) in the loss, as k3; its reward stays unpenalised
    options["kl"] = "loss"
    objective["options"] = options
    return objective


def dpo_objective(config: dict, recipe: dict) -> dict:
    if "per_device_train_batch_size" in config:  # pairs on both sides
        put(recipe, "train.batch_size", int(config.pop("per_device_train_batch_size")))
    beta = float(config.pop("beta", 0.1))
    loss = config.pop("loss_type", "sigmoid")
    names = {"sigmoid": ("dpo", False), "sigmoid_norm": ("dpo", True), "ipo": ("ipo", True)}
    if loss not in names:
        raise RecipeError(f"--from-trl: loss_type {loss!r}: expected one of {list(names)}")
    name, averaged = names[loss]
    objective: dict[str, Any] = {"name": name, "beta": beta}
    if averaged:
        objective["options"] = {"average_logprobs": True}
    return objective


def put(recipe: dict, dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = recipe
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
