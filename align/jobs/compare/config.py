"""``align compare``'s recipe: one task (prompts, reward, SFT policy), the objectives to compare,
the seeds, a sample budget every objective shares, and how each run's trainer recipe is derived
(the rest of a study recipe, its checks and its runs' directories: ``align.jobs.study``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from align.jobs import study as engine
from align.jobs.study import ObjectiveSpec, run_dir, run_recipe  # noqa: F401 -- re-exported
from align.recipe import RewardComponent


class CompareRecipe(engine.StudyRecipe):
    job: ClassVar[str] = "compare"

    out: str = Field("runs/compare", description="study directory: runs, report")
    reward: list[RewardComponent] = Field(..., min_length=1, description="the task's reward every objective trains on")
    gold: list[RewardComponent] | None = Field(
        None, description="the judge of the win-rate against the SFT policy (default: the task's reward)"
    )
    samples_per_step: int = Field(
        ..., gt=0, description="completions per optimizer step for every objective: batch_size = samples_per_step / k"
    )

    @model_validator(mode="after")
    def same_budget(self) -> CompareRecipe:
        for spec in self.objectives:
            if self.samples_per_step % spec.k:
                raise ValueError(
                    f"samples_per_step: {self.samples_per_step} is not a multiple of {spec.run_name}'s k = {spec.k}; "
                    "every objective gets the same number of samples per step"
                )
        if "batch_size" in (self.base.get("train") or {}):
            raise ValueError("base.train.batch_size: set by samples_per_step / k for each objective; remove it")
        return self

    def run_reward(self) -> list[dict]:
        return [c.model_dump(mode="json") for c in self.reward]

    def run_train(self, spec: ObjectiveSpec) -> dict:
        """samples_per_step / k prompts per step: every objective samples as many completions."""
        return {"batch_size": self.samples_per_step // spec.k}


def load_study(path: str | Path | None, overrides: list[str] | None = None) -> CompareRecipe:
    """The study recipe, with every run's training recipe validated (RecipeError: one line)."""
    return engine.load_study(CompareRecipe, path, overrides)
