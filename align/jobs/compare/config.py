"""``align compare``'s recipe: one task (prompts, reward, SFT policy), the objectives to compare,
the seeds, a sample budget every objective shares, and how each run's trainer recipe is derived."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from align.config import RecipeError, Strict, load_recipe, validate
from align.jobs.study import EvalConfig, ObjectiveSpec, checkpoint_output
from align.recipe import Recipe, RewardComponent

STUDY_KEYS = ("objective", "reward", "output", "resume", "prepare")  # set by the study, not by ``base``


class CompareRecipe(Strict):
    description: str = ""
    prepare: Literal["quickstart"] | None = Field(None, description="build the quickstart assets first if missing")
    out: str = Field("runs/compare", description="study directory: runs, report")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1, description="train.seed of each run")
    reward: list[RewardComponent] = Field(..., min_length=1, description="the task's reward every objective trains on")
    gold: list[RewardComponent] | None = Field(
        None, description="the judge of the win-rate against the SFT policy (default: the task's reward)"
    )
    samples_per_step: int = Field(
        ..., gt=0, description="completions per optimizer step for every objective: batch_size = samples_per_step / k"
    )
    base: dict[str, Any] = Field(
        ..., description="training recipe shared by every run, without objective/reward/output"
    )
    objectives: list[ObjectiveSpec] = Field(..., min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    threads: int | None = Field(None, gt=0, description="torch CPU threads (small models: 1 is often fastest)")
    keep_checkpoints: bool = Field(False, description="keep each run's checkpoints after they are evaluated")

    @model_validator(mode="after")
    def consistent(self) -> CompareRecipe:
        names = [o.run_name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: names must be unique (set label), got {names}")
        offline = [o.name for o in self.objectives if not o.online]
        if offline:
            raise ValueError(f"objectives: {offline} train on a fixed dataset; the comparison samples the policy")
        for spec in self.objectives:
            if self.samples_per_step % spec.k:
                raise ValueError(
                    f"samples_per_step: {self.samples_per_step} is not a multiple of {spec.run_name}'s k = {spec.k}; "
                    "every objective gets the same number of samples per step"
                )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be unique, got {self.seeds}")
        taken = sorted(set(STUDY_KEYS) & set(self.base))
        if taken:
            raise ValueError(f"base: {taken} are set by the study; remove them")
        if isinstance(self.base.get("model"), dict) and self.base["model"].get("lora") is not None:
            raise ValueError("base.model.lora: compare evaluates full checkpoints; LoRA is not supported")
        if "batch_size" in (self.base.get("train") or {}):
            raise ValueError("base.train.batch_size: set by samples_per_step / k for each objective; remove it")
        return self


def load_study(path: str | Path | None, overrides: list[str] | None = None) -> CompareRecipe:
    """The study recipe, with every run's training recipe validated (RecipeError: one line)."""
    if path is None:
        raise RecipeError("recipe: a compare recipe YAML is required (e.g. recipes/compare/quickstart.yaml)")
    study = load_recipe(CompareRecipe, path, overrides)
    for spec in study.objectives:
        run_recipe(study, spec, study.seeds[0], source=f"recipe {str(path)!r}")
    if not (study.eval.prompts or run_recipe(study, study.objectives[0], study.seeds[0]).data.eval_prompts):
        raise RecipeError(f"recipe {str(path)!r}: field 'eval.prompts': held-out prompts are required")
    return study


def run_dir(study: CompareRecipe, spec: ObjectiveSpec, seed: int) -> Path:
    return Path(study.out) / "runs" / spec.run_name / f"seed{seed}"


def run_recipe(study: CompareRecipe, spec: ObjectiveSpec, seed: int, source: str = "recipe") -> Recipe:
    """One (objective, seed) run: ``base`` + objective + the task's reward, samples_per_step / k prompts."""
    raw = copy.deepcopy(study.base)
    raw["objective"] = spec.objective_section()
    raw["reward"] = [c.model_dump(mode="json") for c in study.reward]
    raw["train"] = {
        **(raw.get("train") or {}),
        **spec.train,
        "batch_size": study.samples_per_step // spec.k,
        "seed": seed,
    }
    steps = validate(Recipe, {**raw, "output": {}}, source=f"{source}: run {spec.run_name}").train.steps
    raw["output"] = checkpoint_output(run_dir(study, spec, seed), steps, study.eval.every)
    return validate(Recipe, raw, source=f"{source}: run {spec.run_name}")
