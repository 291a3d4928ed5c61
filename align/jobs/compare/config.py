"""``align compare``'s recipe: one task (prompts, reward, SFT policy), the objectives to compare,
the seeds, a sample budget every objective shares, and how each run's trainer recipe is derived
(the rest of a study recipe, its checks and its runs' directories: ``align.jobs.study``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

import losses
from align.jobs import study as engine
from align.jobs.compare.preferences import PreferenceSet, data_file
from align.jobs.compare.staleness import StalenessAxis, expand
from align.jobs.study import ObjectiveSpec, run_dir, run_recipe  # noqa: F401 -- re-exported
from align.recipe import RewardComponent


class CompareRecipe(engine.StudyRecipe):
    job: ClassVar[str] = "compare"
    offline_hint: ClassVar[str] = "; add a preferences section to train them on pairs built from the task"

    out: str = Field("runs/compare", description="study directory: runs, report")
    reward: list[RewardComponent] = Field(..., min_length=1, description="the task's reward every objective trains on")
    gold: list[RewardComponent] | None = Field(
        None, description="the judge of the win-rate against the SFT policy (default: the task's reward)"
    )
    samples_per_step: int = Field(
        ...,
        gt=0,
        description="completions per optimizer step for every objective: batch_size = samples_per_step / k "
        "(offline: samples_per_step / 2 pairs, or samples_per_step unpaired rows)",
    )
    staleness: StalenessAxis | None = Field(
        None,
        description="every online objective once per max_staleness N (train.async, fixed) and correction; "
        "expanded into the objectives (labels NAME_sN[_MODE]) when the recipe is read",
    )
    preferences: PreferenceSet | None = Field(
        None,
        description="direct alignment: offline objectives train on one preference set the study builds from the "
        "task (two SFT samples per prompt, labelled by the gold reward plus a length bonus)",
    )

    @model_validator(mode="before")
    @classmethod
    def staleness_axis(cls, data: Any) -> Any:
        """The axis as the objective entries it stands for (so a saved recipe.yaml lists the runs)."""
        if isinstance(data, dict) and data.get("staleness") and isinstance(data.get("objectives"), list):
            axis = StalenessAxis.model_validate(data["staleness"])
            data = {**data, "objectives": expand(data["objectives"], axis), "staleness": None}
        return data

    @model_validator(mode="after")
    def same_budget(self) -> CompareRecipe:
        for spec in self.objectives:
            if not spec.online:
                if self.samples_per_step % 2:
                    raise ValueError(
                        f"samples_per_step: {self.samples_per_step} is odd; {spec.run_name} trains on "
                        "samples_per_step / 2 pairs per step"
                    )
                continue
            if self.samples_per_step % spec.k:
                raise ValueError(
                    f"samples_per_step: {self.samples_per_step} is not a multiple of {spec.run_name}'s k = {spec.k}; "
                    "every objective gets the same number of samples per step"
                )
        if self.preferences is not None and not (self.base.get("data") or {}).get("train"):
            raise ValueError("base.data.train: the prompts the preference set is sampled for are required")
        if "batch_size" in (self.base.get("train") or {}):
            raise ValueError("base.train.batch_size: set by samples_per_step / k for each objective; remove it")
        return self

    def run_reward(self) -> list[dict]:
        return [c.model_dump(mode="json") for c in self.reward]

    def run_train(self, spec: ObjectiveSpec) -> dict:
        """samples_per_step / k prompts per step: every objective samples as many completions; an
        offline objective trains on as many completions (pairs of two, or unpaired rows)."""
        if not spec.online:
            paired = losses.REGISTRY[spec.name].paired
            return {"batch_size": self.samples_per_step // 2 if paired else self.samples_per_step}
        return {"batch_size": self.samples_per_step // spec.k}

    def offline_data(self) -> bool:
        return self.preferences is not None

    def run_data(self, spec: ObjectiveSpec) -> dict:
        if spec.online or self.preferences is None:
            return {}
        return {"train": data_file(self.out, losses.REGISTRY[spec.name].paired)}


def load_study(path: str | Path | None, overrides: list[str] | None = None) -> CompareRecipe:
    """The study recipe, with every run's training recipe validated (RecipeError: one line)."""
    return engine.load_study(CompareRecipe, path, overrides)
