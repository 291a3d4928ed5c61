"""``align overopt``'s study recipe: the proxy, evaluation and best-of-n settings, the objectives
to sweep, and how each (objective, seed) run's trainer recipe and directory are derived."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from align.config import RecipeError, Strict, load_recipe, validate
from align.jobs.rm import RMTrain
from align.jobs.study import EvalConfig, ObjectiveSpec, checkpoint_output, eval_steps  # noqa: F401 -- re-exported
from align.recipe import Recipe, RewardComponent

PAIR_SEED_OFFSET = 20_011  # proxy-pair samples never reuse a training or evaluation key
BON_SEED_OFFSET = 30_011
STUDY_KEYS = ("objective", "reward", "output", "resume", "prepare")  # set by the study, not by ``base``


# --------------------------------------------------------------------------------------------
# recipe


class ProxyConfig(Strict):
    pairs: int = Field(500, gt=0, description="gold-labelled pairs of SFT samples the proxy is trained on")
    labels: Literal["hard", "bradley_terry"] = Field(
        "hard", description="hard: the sample with the higher gold is chosen; bradley_terry: sampled, σ(Δgold/T)"
    )
    temperature: float = Field(1.0, gt=0, description="T of bradley_terry labels")
    model: str | None = Field(None, description="reward-model base (default: the policy's model.path); new scalar head")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="share of the pairs held out for the proxy's accuracy")
    train: RMTrain = Field(default_factory=RMTrain, description="align rm's train section")
    seed: int = Field(0, description="which prompts, which samples, which labels (bradley_terry)")


class BonConfig(Strict):
    n: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32], description="empty: no best-of-n baseline")
    n_prompts: int = Field(128, gt=0, description="held-out prompts used (the first N)")

    @field_validator("n")
    @classmethod
    def divides(cls, ns: list[int]) -> list[int]:
        if any(n < 1 for n in ns):
            raise ValueError("every n must be >= 1")
        if ns and any(max(ns) % n for n in ns):
            raise ValueError(f"every n must divide the largest ({max(ns)}): one pool of samples serves all n")
        return sorted(set(ns))


class OveroptRecipe(Strict):
    description: str = ""
    prepare: Literal["quickstart"] | None = Field(None, description="build the quickstart assets first if missing")
    out: str = Field("runs/overopt", description="study directory: proxy, runs, report")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="train.seed of each run")
    gold: list[RewardComponent] = Field(..., min_length=1, description="the gold reward (never optimised)")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    base: dict[str, Any] = Field(
        ..., description="training recipe shared by every run, without objective/reward/output"
    )
    objectives: list[ObjectiveSpec] = Field(..., min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    bon: BonConfig = Field(default_factory=BonConfig)
    threads: int | None = Field(None, gt=0, description="torch CPU threads (small models: 1 is often fastest)")
    keep_checkpoints: bool = Field(False, description="keep each run's checkpoints after they are evaluated")

    @model_validator(mode="after")
    def consistent(self) -> OveroptRecipe:
        names = [o.run_name for o in self.objectives]
        offline = [o.name for o in self.objectives if not o.online]
        if offline:
            raise ValueError(f"objectives: {offline} train on a fixed dataset; the study trains against the proxy")
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: names must be unique (set label), got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be unique, got {self.seeds}")
        taken = sorted(set(STUDY_KEYS) & set(self.base))
        if taken:
            raise ValueError(f"base: {taken} are set by the study; remove them")
        model = self.base.get("model")
        if isinstance(model, dict) and model.get("lora") is not None:
            raise ValueError("base.model.lora: overopt evaluates full checkpoints; LoRA is not supported")
        return self


def load_study(path: str | Path | None, overrides: list[str] | None = None) -> OveroptRecipe:
    """The study recipe, with every run's training recipe validated (RecipeError: one line)."""
    if path is None:
        raise RecipeError("recipe: a study recipe YAML is required (e.g. recipes/overopt/quickstart.yaml)")
    study = load_recipe(OveroptRecipe, path, overrides)
    for spec in study.objectives:
        run_recipe(study, spec, study.seeds[0], source=f"recipe {str(path)!r}")
    if not (study.eval.prompts or run_recipe(study, study.objectives[0], study.seeds[0]).data.eval_prompts):
        raise RecipeError(f"recipe {str(path)!r}: field 'eval.prompts': held-out prompts are required")
    return study


def run_dir(study: OveroptRecipe, spec: ObjectiveSpec, seed: int) -> Path:
    return Path(study.out) / "runs" / spec.run_name / f"seed{seed}"


def proxy_dir(study: OveroptRecipe) -> Path:
    return Path(study.out) / "proxy" / "model"


def run_recipe(study: OveroptRecipe, spec: ObjectiveSpec, seed: int, source: str = "recipe") -> Recipe:
    """The training recipe of one (objective, seed) run: ``base`` + objective + proxy reward."""
    raw = copy.deepcopy(study.base)
    raw["objective"] = spec.objective_section()
    raw["reward"] = [{"name": "reward_model", "label": "proxy", "options": {"model": str(proxy_dir(study))}}]
    raw["train"] = {**(raw.get("train") or {}), **spec.train, "seed": seed}
    steps = validate(Recipe, {**raw, "output": {}}, source=f"{source}: run {spec.run_name}").train.steps
    raw["output"] = checkpoint_output(run_dir(study, spec, seed), steps, study.eval.every)
    return validate(Recipe, raw, source=f"{source}: run {spec.run_name}")
