"""``align overopt``'s study recipe: the proxy, evaluation and best-of-n settings, the objectives
to sweep, and how each (objective, seed) run's trainer recipe and directory are derived (the rest of
a study recipe, its checks and its runs' directories: ``align.jobs.study``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from align.config import Seed, Strict
from align.jobs import study as engine
from align.jobs.rm import RMTrain
from align.jobs.study import (  # noqa: F401 -- re-exported
    EvalConfig,
    ObjectiveSpec,
    checkpoint_output,
    eval_steps,
    run_dir,
    run_recipe,
)
from align.recipe import RewardComponent

PAIR_SEED_OFFSET = 20_011  # proxy-pair samples never reuse a training or evaluation key
BON_SEED_OFFSET = 30_011


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
    seed: Seed = Field(0, description="which prompts, which samples, which labels (bradley_terry)")


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


class OveroptRecipe(engine.StudyRecipe):
    job: ClassVar[str] = "overopt"

    out: str = Field("runs/overopt", description="study directory: proxy, runs, report")
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="train.seed of each run")
    gold: list[RewardComponent] = Field(..., min_length=1, description="the gold reward (never optimised)")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    bon: BonConfig = Field(default_factory=BonConfig)

    def run_reward(self) -> list[dict]:
        """Every run trains against the proxy reward model."""
        return [{"name": "reward_model", "label": "proxy", "options": {"model": str(proxy_dir(self))}}]


def load_study(path: str | Path | None, overrides: list[str] | None = None) -> OveroptRecipe:
    """The study recipe, with every run's training recipe validated (RecipeError: one line)."""
    return engine.load_study(OveroptRecipe, path, overrides)


def proxy_dir(study: OveroptRecipe) -> Path:
    return Path(study.out) / "proxy" / "model"
