"""The training recipe: every field `align train` / `align sft` reads, validated before any model loads.

A recipe is YAML; every section forbids unknown keys; overrides on the command line use dotted
keys (``objective.beta=0.1 train.steps=50``). The objective entry (``ObjectiveConfig``,
align/objective.py) is the one every recipe kind shares.
"""

from __future__ import annotations

import string
from pathlib import PurePath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

import losses
from align.config import Strict
from align.generation_config import CorrectionConfig, GenerationConfig
from align.objective import RUN_QUANTITY_SOURCES, ObjectiveConfig
from align.train_config import ReplayConfig, TrainConfig  # noqa: F401 -- re-exported


class LoraConfig(Strict):
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(None, description="module names; None lets peft pick")


class ModelConfig(Strict):
    path: str = Field(..., description="hub id or local directory of an AutoModelForCausalLM")
    tokenizer: str | None = Field(None, description="tokenizer hub id or path (default: model path)")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters; the reference is the base with adapters off"
    )
    disable_dropout: bool = Field(True, description="RL and DPO train with dropout off (TRL does the same)")
    load_in_4bit: bool = Field(
        False, description="QLoRA: the base in 4-bit NF4 (bitsandbytes, a CUDA GPU), model.lora trained over it"
    )

    @model_validator(mode="after")
    def quantised_needs_adapters(self) -> ModelConfig:
        if self.load_in_4bit and self.lora is None:
            raise ValueError("load_in_4bit: a 4-bit base cannot be trained itself; add model.lora (QLoRA)")
        return self


class DataConfig(Strict):
    train: str = Field(..., description="local .jsonl/.json/.csv/.parquet file, or a hub dataset name")
    split: str = "train"
    subset: str | None = None
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    reward_column: str = Field("reward", description="offline copg on (prompt, completion, reward) rows")
    demonstration_column: str = Field("demonstration", description="RCfD: a demonstration per prompt")
    prompt_template: str | None = Field(
        None, description="build the prompt from row columns, e.g. '{document}\\n\\nTL;DR:' (else prompt_column)"
    )
    messages_column: str = Field(
        "messages", description="TRL's conversational SFT column: the last assistant turn is the completion"
    )
    text_column: str = Field(
        "text", description="TRL's language-modeling SFT rows: the whole text is trained on, after the BOS"
    )
    label_column: str = Field(
        "label", description="TRL's unpaired preference rows (prompt, completion, label): the label is the reward"
    )
    chat_template: bool = Field(
        False, description="wrap each prompt as a user message and apply the tokenizer's chat template"
    )
    system_prompt: str | None = Field(
        None, description="a system turn put before every chat prompt that has none of its own"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keywords of apply_chat_template, e.g. {enable_thinking: false}"
    )
    max_prompt_tokens: int = Field(
        256,
        gt=0,
        description="a longer prompt is cut inside its source column (the template's fixed text and special "
        "tokens stay); a templated source keeps its beginning, a bare prompt its end",
    )

    @field_validator("prompt_template")
    @classmethod
    def template_parses(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
            except ValueError as err:
                raise ValueError(f"not a format string ({err}); columns go in braces, e.g. '{{document}}'") from None
            if any(not name.isidentifier() for name in fields):
                raise ValueError("fields must be column names in braces, e.g. '{document}'")
        return template

    truncate_column: str | None = Field(
        None, description="the column cut to fit max_prompt_tokens (default: the template's longest text column)"
    )
    max_completion_tokens: int = Field(256, gt=0, description="offline completions are truncated to this")
    eval_prompts: str | None = Field(None, description="held-out prompts for the before/after report")
    eval_pairs: str | None = Field(
        None, description="offline pair objectives: held-out pairs the report scores (margin, accuracy)"
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="offline pair objectives: hold out this fraction of the prompts' pairs instead"
    )

    @model_validator(mode="after")
    def one_held_out_set(self) -> DataConfig:
        if self.eval_pairs and self.eval_fraction:
            raise ValueError("give data.eval_pairs (a file) or data.eval_fraction (a split), not both")
        return self


class CriticConfig(Strict):
    path: str | None = Field(
        None, description="the critic's backbone: hub id or directory (default: model.path, the SFT policy)"
    )
    lr: float | None = Field(None, gt=0, description="the critic's learning rate (default: train.lr)")


class RewardComponent(Strict):
    name: str = Field(..., description="a name in rewards.REGISTRY")
    weight: float = 1.0
    normalize: bool = Field(False, description="running whitening of this component before weighting")
    clip: tuple[float, float] | None = Field(None, description="clip the (normalised) component to [lo, hi]")
    label: str | None = Field(None, description="the component's name in logs (default: the reward name)")
    options: dict[str, Any] = Field(default_factory=dict, description="the reward's own options")

    @model_validator(mode="after")
    def known(self) -> RewardComponent:
        import rewards

        rewards.check_options(self.name, self.options)  # name, unknown/missing options, option types
        if self.clip is not None and self.clip[0] > self.clip[1]:
            raise ValueError(f"clip: expected [lo, hi] with lo <= hi, got {list(self.clip)}")
        return self


class EvalConfig(Strict):
    """Evaluation during training (align/periodic_eval.py); TRL's eval_strategy="steps" / eval_steps."""

    every: int = Field(0, ge=0, description="evaluate every N steps on held-out data (0: only the end-of-run report)")
    prompts: int = Field(64, gt=0, description="online: held-out prompts sampled (data.eval_prompts, else training)")
    keep_best: str | None = Field(
        None, description="copy the model to DIR/best when this eval/ metric improves, e.g. reward, reward_accuracy"
    )
    greater_is_better: bool = Field(True, description="keep_best: whether a higher value is better")


class OutputConfig(Strict):
    dir: str = Field("runs/align", description="run directory: checkpoints, metrics.jsonl, report")
    overwrite: bool = Field(False, description="replace the run already in dir (else a new run there is refused)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1)
    sample_every: int = Field(10, ge=0, description="log sample completions every N steps (0: never)")
    report_to: list[Literal["wandb", "tensorboard", "trackio"]] = Field(
        default_factory=list, description="trackers, each imported only when named (a missing one: exit 2)"
    )
    wandb_project: str | None = Field(
        None, description="the wandb / trackio project (default: $WANDB_PROJECT, else 'align')"
    )
    run_name: str | None = Field(None, description="the run's name in the trackers (default: the run dir's name)")
    merge_lora: bool = Field(False, description="LoRA: also write DIR/final_merged, the adapters merged into the base")
    push_to_hub: str | None = Field(None, description="a hub repo id to upload final/ to at the end")

    @field_validator("report_to", mode="before")
    @classmethod
    def none_is_no_tracker(cls, value: Any) -> Any:
        """TRL's ``report_to: none`` (or ``[none]``): no tracker."""
        if value in ("none", None) or value == ["none"]:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def trackers_installed(cls, trackers: list[str]) -> list[str]:
        import importlib.util

        for tracker in trackers:
            if importlib.util.find_spec(tracker) is None:
                raise ValueError(f"{tracker!r} is not installed (pip install {tracker})")
        return trackers

    report: bool = Field(True, description="write a summary with plots at the end")
    save_model: bool = Field(True, description="save the final policy in HF format under DIR/final")


class Recipe(Strict):
    description: str = ""
    prepare: Literal["quickstart", "summarize"] | None = Field(
        None,
        description="build the embedded assets if missing: quickstart (corpus, tokenizer, SFT model) or "
        "summarize (documents, NLI model, SFT summariser)",
    )
    model: ModelConfig
    reference: str | None = Field(None, description="reference model path (default: a frozen copy of the policy)")
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    reward: list[RewardComponent] = Field(default_factory=list)
    critic: CriticConfig | None = Field(
        None, description="objectives that read values (ppo): the value model trained beside the policy"
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    resume: str | None = Field(None, description="'latest' or a checkpoint directory")

    @field_validator("reward", mode="before")
    @classmethod
    def one_or_many(cls, value: Any) -> Any:
        if isinstance(value, (dict, str)):
            value = [value]
        return [{"name": v} if isinstance(v, str) else v for v in value or []]

    @model_validator(mode="after")
    def consistent(self) -> Recipe:
        name = self.objective.name
        declared = losses.REGISTRY[name]
        if self.objective.online and not self.reward:
            raise ValueError(f"reward: objective {name!r} is trained online and needs a reward")
        if self.objective.online and "online" not in declared.feeds:
            raise ValueError(f"objective.mode: {name!r} is trained on a fixed dataset, not online")
        if not self.objective.online and "offline" not in declared.feeds:
            raise ValueError(f"objective.mode: {name!r} needs samples from the policy (online)")
        min_k = self.objective.build().min_k  # an instance may need more than its class (a group baseline)
        if self.objective.online and self.objective.k < min_k:
            raise ValueError(f"objective.k: {name!r} needs k >= {min_k} samples per prompt")
        if self.objective.online:
            self._no_sampling_filters()
            if self.train.epochs is not None:
                raise ValueError(
                    f"train.epochs: {name!r} samples fresh completions every step (no epochs of data); set train.steps"
                )
        elif self.train.updates_per_batch > 1:
            raise ValueError(
                f"train.updates_per_batch: {name!r} is trained on a fixed dataset (fresh rows every step); expected 1"
            )
        elif self.train.mini_batches > 1:
            raise ValueError(
                f"train.mini_batches: {name!r} is trained on a fixed dataset (batch_size × "
                "gradient_accumulation_steps rows per step); expected 1"
            )
        elif self.train.replay is not None:
            raise ValueError(f"train.replay: {name!r} is trained on a fixed dataset, not on its own samples; remove it")
        if self.train.async_ is not None:
            self._async_fits(name)
        self._engine_fits(declared)
        self._eval_fits(declared)
        if self.critic is not None and "values" not in declared.needs:
            raise ValueError(f"critic: {name!r} reads no values (ppo does); remove the critic section")
        if self.reference is not None and declared.reference_free:
            raise ValueError(f"reference: {name!r} is reference-free (its loss reads no reference model); remove it")
        held_out = (
            "data.eval_pairs" if self.data.eval_pairs else "data.eval_fraction" if self.data.eval_fraction else None
        )
        if held_out and (self.objective.online or not declared.paired):
            raise ValueError(
                f"{held_out}: held-out pairs are for offline pair objectives (dpo, ipo, offline copg); "
                f"{name!r} is measured on data.eval_prompts"
            )
        if self.prepare is not None and PurePath(self.model.path).name != "sft_model":
            raise ValueError(
                f"model.path: prepare: {self.prepare} builds its policy at <dir>/sft_model (default "
                f".cache/{self.prepare}/sft_model), got {self.model.path!r}; fix the path, or remove prepare: "
                "to train a model of your own"
            )
        declared_inputs = declared.run_inputs
        for option, quantity in declared_inputs.items():
            if option in self.objective.options:
                raise ValueError(
                    f"objective.options.{option}: {name!r} takes {RUN_QUANTITY_SOURCES[quantity]}; remove it"
                )
        if "reward_weights" in declared_inputs.values():  # it combines the raw components itself
            for i, component in enumerate(self.reward):
                if component.normalize:
                    raise ValueError(
                        f"reward[{i}].normalize: {name!r} compares each raw (clipped) component with the "
                        "demonstration's and whitens the squared gaps itself; expected false"
                    )
        self.objective.refuse(
            "objective",
            {
                "data": "a bandit entry's source of samples; a training recipe sets objective.mode",
                "train": "a study run's changes to its base train section; set this recipe's train section",
                "generation": "a study run's changes to its base generation section; set this recipe's generation",
            },
        )
        return self

    def run_quantities(self) -> dict[str, Any]:
        """What this run knows that an objective may declare it takes (``losses.base.RunQuantity``)."""
        return {
            "reward_weights": [c.weight for c in self.reward] or None,
            "max_new_tokens": self.generation.max_new_tokens,
            "k": self.objective.k,
        }

    def build_objective(self) -> losses.Objective:
        """The objective, with the run quantities it declares it takes (``Objective.run_inputs``,
        ``run_defaults``): RCfD the reward components' weights, Dr. GRPO the generation budget."""
        return self.objective.build(self.run_quantities())

    def _async_fits(self, name: str) -> None:
        mode = self.train.async_.mode
        if not self.objective.online:
            raise ValueError(f"train.async: {name!r} is trained on a fixed dataset; nothing is generated ahead")
        if self.train.replay is not None:
            raise ValueError("train.async: with train.replay the samples' age is the buffer's; use one or the other")
        colocated = self.generation.engine == "vllm" and self.generation.vllm.mode == "colocate"
        if mode == "bounded" and colocated:
            raise ValueError(
                "train.async.mode: bounded generates beside training, with the native engine or a vLLM server; "
                "the colocated vLLM engine shares the trainer's devices (fixed generates in line with it)"
            )

    def sampler_correction(self) -> CorrectionConfig | None:
        """The importance correction the run applies: the recipe's, else TRL's default with a vLLM
        engine or stale samples (``train.async``) for an objective that takes it; None: off."""
        gen, declared = self.generation, losses.REGISTRY[self.objective.name]
        chosen = gen.importance_correction
        stale = self.train.async_ is not None and self.train.async_.max_staleness > 0
        mismatched = gen.engine == "vllm" or stale  # a sampler that is not the trained policy
        if chosen is None and mismatched and declared.corrects_sampler and self.train.replay is None:
            chosen = CorrectionConfig()
        return None if chosen is None or chosen.mode == "none" else chosen

    def _eval_fits(self, declared: type[losses.Objective]) -> None:
        ev, name = self.eval, self.objective.name
        if ev.keep_best is not None and not ev.every:
            raise ValueError("eval.keep_best: set eval.every (the evaluations it keeps the best of)")
        if not ev.every:
            return
        if not self.objective.online and not (declared.paired and (self.data.eval_pairs or self.data.eval_fraction)):
            raise ValueError(
                f"eval.every: {name!r} is evaluated on held-out pairs: set data.eval_pairs or data.eval_fraction"
                if declared.paired
                else f"eval.every: {name!r} trains on rows with no held-out measure; remove it"
            )
        metrics = (
            ("reward", "kl_k1", "kl_k3", "length", "win_rate")
            if self.objective.online
            else ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "loglik_accuracy")
        )
        if ev.keep_best is not None and ev.keep_best.removeprefix("eval/") not in metrics:
            raise ValueError(f"eval.keep_best: expected one of {list(metrics)}, got {ev.keep_best!r}")

    def _engine_fits(self, declared: type[losses.Objective]) -> None:
        gen, name = self.generation, self.objective.name
        if gen.engine != "native" and not self.objective.online:
            raise ValueError(f"generation.engine: {name!r} trains on a fixed dataset and samples nothing; remove it")
        chosen = gen.importance_correction
        if chosen is None or chosen.mode == "none":
            return
        if not self.objective.online or not declared.corrects_sampler:
            raise ValueError(
                f"generation.importance_correction: {name!r} takes no importance weights (policy-gradient "
                "objectives do: reinforce, rloo, vanilla_pg, ppo, grpo, dr_grpo, rcfd); remove it"
            )
        if self.train.replay is not None:
            raise ValueError(
                "generation.importance_correction: replayed groups keep no engine log-probs; remove train.replay "
                "or set importance_correction.mode: none"
            )

    def _no_sampling_filters(self) -> None:
        """The online loss and its KL use log-probs of softmax(logits / T) over the whole
        vocabulary; samples drawn from a filtered distribution would make both biased (the class
        of bug of trl#4159), so filters are refused rather than silently mis-scored."""
        gen = self.generation
        for field, active, off in (
            ("top_k", gen.top_k != 0, "0"),
            ("top_p", gen.top_p != 1.0, "1.0"),
            ("min_new_tokens", gen.min_new_tokens != 0, "0"),
        ):
            if active:
                raise ValueError(
                    f"generation.{field}: online objectives sample from the full softmax(logits / temperature) "
                    f"their log-probs score; expected {off} (stop_strings and max_new_tokens are fine)"
                )
