"""The study engine ``align overopt`` and ``align compare`` share: objectives × seeds, each run
trained by the one trainer from the same SFT policy on the same prompts, its checkpoints scored on
held-out prompts by a study's own ``evaluate(recipe, policy)``, and what each run cost, measured.
What a study recipe shares (``StudyRecipe``: objectives, seeds, ``base``, ``eval``), how each run's
training recipe is derived (``run_recipe``), the study's start and its command (``main``) live here
too; a study adds its reward, its own sections and its evaluation.

Each run trains in a process of its own (``align train`` on the run's recipe), so its cost is its
own: the steps' seconds, completion tokens per second of step time, and the peak resident memory
of that process (evaluation excluded; it runs in the study's process).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from pydantic import Field, model_validator

from align.config import RecipeError, Seed, Strict, dump_recipe, load_recipe, validate
from align.recipe import ObjectiveConfig, Recipe


class EvalConfig(Strict):
    every: int = Field(20, gt=0, description="evaluate a checkpoint every N training steps (and step 0 and the last)")
    prompts: str | None = Field(None, description="held-out prompt file (default: base data.eval_prompts)")
    n_prompts: int = Field(128, gt=0, description="held-out prompts used (the first N)")


# a study's objective entry is the one every recipe shares (align/objective.py): label, per-run
# train changes, run_name and objective_section live there
ObjectiveSpec = ObjectiveConfig


# --------------------------------------------------------------------------------------------
# the study recipe

STUDY_KEYS = ("objective", "reward", "output", "resume", "prepare")  # set by the study, not by ``base``


class StudyRecipe(Strict):
    """What every study recipe holds: objectives × seeds, the training recipe their runs share
    (``base``), the held-out evaluation and the study directory. A study adds its own sections and
    says what its runs train on: ``run_reward`` (the reward section) and ``run_train`` (what it sets
    in the train section besides the objective's own changes and the seed)."""

    job: ClassVar[str]  # the command, ``align {job}``
    offline_hint: ClassVar[str] = ""  # how this study's recipe trains offline objectives, if it can

    description: str = ""
    prepare: Literal["quickstart"] | None = Field(None, description="build the quickstart assets first if missing")
    out: str = Field(..., description="study directory")
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1, description="train.seed of each run")
    base: dict[str, Any] = Field(
        ..., description="training recipe shared by every run, without objective/reward/output"
    )
    objectives: list[ObjectiveSpec] = Field(..., min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    threads: int | None = Field(None, gt=0, description="torch CPU threads (small models: 1 is often fastest)")
    keep_checkpoints: bool = Field(False, description="keep each run's checkpoints after they are evaluated")
    overwrite: bool = Field(False, description="replace the study ``out`` already holds (else it is refused)")

    @model_validator(mode="after")
    def runs_consistent(self) -> StudyRecipe:
        names = [o.run_name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: names must be unique (set label), got {names}")
        offline = [o.name for o in self.objectives if not o.online]
        if offline and not self.offline_data():
            raise ValueError(
                f"objectives: {offline} train on a fixed dataset; align {self.job} trains on the policy's samples"
                + self.offline_hint
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be unique, got {self.seeds}")
        taken = sorted(set(STUDY_KEYS) & set(self.base))
        if taken:
            raise ValueError(f"base: {taken} are set by the study; remove them")
        model = self.base.get("model")
        if isinstance(model, dict) and model.get("lora") is not None:
            raise ValueError(f"base.model.lora: {self.job} evaluates full checkpoints; LoRA is not supported")
        return self

    @abstractmethod
    def run_reward(self) -> list[dict]:
        """The reward section every run trains against."""

    def run_train(self, spec: ObjectiveSpec) -> dict:
        return {}

    def offline_data(self) -> bool:
        """The study builds a dataset its offline objectives train on (``run_data``)."""
        return False

    def run_data(self, spec: ObjectiveSpec) -> dict:
        """What the study sets in a run's data section (an offline run's training file)."""
        return {}

    def runs(self) -> list[tuple[ObjectiveSpec, int]]:
        """Every (objective, seed), objective-major."""
        return [(spec, seed) for spec in self.objectives for seed in self.seeds]


Study = TypeVar("Study", bound=StudyRecipe)


def load_study(schema: type[Study], path: str | Path | None, overrides: list[str] | None = None) -> Study:
    """The study recipe, with every run's training recipe validated (RecipeError: one line)."""
    if path is None:
        raise RecipeError(f"recipe: align {schema.job} needs a recipe YAML (e.g. recipes/{schema.job}/quickstart.yaml)")
    study = load_recipe(schema, path, overrides)
    for spec in study.objectives:
        run_recipe(study, spec, study.seeds[0], source=f"recipe {str(path)!r}")
    if not (study.eval.prompts or run_recipe(study, study.objectives[0], study.seeds[0]).data.eval_prompts):
        raise RecipeError(f"recipe {str(path)!r}: field 'eval.prompts': held-out prompts are required")
    return study


def run_dir(study: StudyRecipe, spec: ObjectiveSpec, seed: int) -> Path:
    return Path(study.out) / "runs" / spec.run_name / f"seed{seed}"


def run_recipe(study: StudyRecipe, spec: ObjectiveSpec, seed: int, source: str = "recipe") -> Recipe:
    """The training recipe of one (objective, seed) run: ``base`` + the objective + the study's
    reward and train settings, a checkpoint every ``eval.every`` steps in the run's directory."""
    raw = copy.deepcopy(study.base)
    raw["objective"] = spec.objective_section()
    raw["reward"] = study.run_reward()
    raw["train"] = {**(raw.get("train") or {}), **spec.train, **study.run_train(spec), "seed": seed}
    raw["data"] = {**(raw.get("data") or {}), **study.run_data(spec)}
    if spec.generation:
        raw["generation"] = {**(raw.get("generation") or {}), **spec.generation}
    where = f"{source}: run {spec.run_name}"
    steps = validate(Recipe, {**raw, "output": {}}, source=where).train.steps
    raw["output"] = checkpoint_output(run_dir(study, spec, seed), steps, study.eval.every)
    return validate(Recipe, raw, source=where)


STUDY_MARKER = ".align-study"  # what overwrite may replace: a directory a study made, nothing else


def claim_study_dir(out: Path, overwrite: bool) -> None:
    """The study directory, made or taken: a directory holding another study is replaced only with
    ``overwrite=true``; one holding anything a study did not write is never touched."""
    from align import files

    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise RecipeError(f"out: {str(out)!r} is a file, not a directory; choose another out")
    if entries and not (out / STUDY_MARKER).is_file():
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RecipeError(f"out: {str(out)!r} holds {shown}, which no align study wrote; choose another out")
    if entries and not overwrite:
        raise RecipeError(
            f"out: {str(out)!r} already holds a study; replace it with overwrite=true, or choose another out"
        )
    if entries:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / STUDY_MARKER, json.dumps({"started": time.time()}) + "\n")


def start_study(study: StudyRecipe) -> tuple[Recipe, Any, torch.device]:
    """The study directory with the study's ``recipe.yaml``, the quickstart assets if the study
    prepares them, and the SFT policy and its reference, loaded once for every evaluation.
    Returns the first run's recipe, the models and the device."""
    from align.models import load_models

    first = run_recipe(study, study.objectives[0], study.seeds[0])
    if study.prepare == "quickstart":
        from align.jobs.quickstart.pipeline import prepare_quickstart

        prepare_quickstart(first)
    from align.run_setup import load_run_data

    for spec in study.objectives:  # each run's data, read here: a bad file is one line, not a failed child
        if spec.online:  # an offline run's data is built by the study (``run_data``), read once it is
            load_run_data(run_recipe(study, spec, study.seeds[0]))
    out = Path(study.out)
    claim_study_dir(out, study.overwrite)
    dump_recipe(study, out / "recipe.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(first, device, need_reference=True)
    models.policy.to(device).eval()
    return first, models, device


def main(
    args: Any,
    schema: type[Study],
    run_study: Callable[[Study], dict],
    print_summary: Callable[[dict], None],
) -> int:
    """A study's command: load the recipe, run the study, print its summary and where its report is."""
    study = load_study(schema, args.recipe, list(args.overrides))
    if study.threads:
        torch.set_num_threads(study.threads)
    quiet_libraries()
    report = run_study(study)
    print_summary(report)
    print(f"align {schema.job}: report in {Path(study.out) / 'report.md'} ({report['seconds']:.0f} s)", file=sys.stdout)
    return 0


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def read_prompts(source: str, column: str, limit: int | None = None) -> list[str]:
    from align import data as data_lib

    table = data_lib.load_table(source)
    prompts = data_lib.read_columns(source, table, [column], [column])[column]
    return prompts[:limit] if limit else prompts


@torch.no_grad()
def sample(recipe: Recipe, models, policy, prompts: list[str], seed: int, k: int, device, chunk: int = 64) -> list[str]:
    """k samples per prompt (prompt-major: prompt i's samples at i·k … i·k+k−1), keyed by seed."""
    from align.evaluation import sample_prompts

    texts: list[str] = []
    for lo in range(0, len(prompts), chunk):
        texts += sample_prompts(recipe, models, policy, prompts[lo : lo + chunk], seed, k, device, first_index=lo).texts
    return texts


def load_policy(path: Path, recipe: Recipe, device):
    from align.models import load_saved_policy

    return load_saved_policy(recipe, path, device)


# --------------------------------------------------------------------------------------------
# cost


def train_measured(recipe: Recipe, threads: int | None = None) -> tuple[dict, dict]:
    """Train one run in a process of its own (``align train``); its summary and its measured cost.

    A process per run makes the peak resident memory that run's alone (``wait4``'s ru_maxrss of
    that child), not the high-water mark of everything trained before it in the study's process.
    ``seconds`` is the training steps' own time (metrics ``step_s``), ``wall_seconds`` includes the
    process start and model loading."""
    import os
    import subprocess
    import sys

    from align.config import dump_recipe
    from align.metrics_log import read_metrics

    out = Path(recipe.output.dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    path, log = out.with_suffix(".yaml"), out.with_suffix(".log")
    dump_recipe(recipe, path)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(
            [sys.executable, "-m", "align.cli", "train", str(path)], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except KeyboardInterrupt:  # the child got the same SIGINT: it saves a checkpoint and stops
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"run {out} failed (exit code {child.returncode}); {log}:\n" + "\n".join(tail))
    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out)
    tokens = math.fsum(r.get("tokens", 0.0) for r in records)
    step_seconds = math.fsum(r.get("step_s", 0.0) for r in records)
    cost = {
        "seconds": step_seconds,
        "wall_seconds": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / step_seconds if step_seconds else float("nan"),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # kB on Linux
    }
    return summary, cost


# --------------------------------------------------------------------------------------------
# the grid


def train_and_evaluate(
    recipe: Recipe,
    evaluate: Callable[[Any], dict],
    initial: dict,
    device,
    bar,
    keep_checkpoints: bool = False,
    threads: int | None = None,
) -> tuple[list[dict], dict]:
    """Train one run, then score step 0 (``initial``, shared by the runs of a seed) and each of its
    checkpoints with ``evaluate(policy)``; writes ``eval.json`` beside the run's metrics."""
    from align.checkpoint import list_checkpoints

    out = Path(recipe.output.dir)
    shutil.rmtree(out, ignore_errors=True)
    summary, cost = train_measured(recipe, threads)
    bar.update(recipe.train.steps)
    if summary.get("stopped_by"):  # the trainer saved and returned on SIGINT/SIGTERM: the study stops too
        raise KeyboardInterrupt
    records = [{"step": 0, **initial}]
    for checkpoint in list_checkpoints(out):
        step = int(checkpoint.name.split("-")[1])
        policy = load_policy(checkpoint / "model", recipe, device)
        records.append({"step": step, **evaluate(policy)})
        del policy
        bar.update(1)
    (out / "eval.json").write_text(json.dumps({"records": records, "cost": cost}, indent=2))
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return records, cost


def checkpoint_output(run_dir: Path, steps: int, every: int) -> dict:
    """The output section of a study run: a checkpoint every ``every`` steps, all of them kept
    until they are scored, no report or final model of its own."""
    return {
        "dir": str(run_dir),
        "save_every": every,
        "keep_last": steps // every + 1,
        "sample_every": 0,
        "report": False,
        "save_model": False,
    }


def eval_steps(recipe: Recipe, every: int) -> list[int]:
    """Step 0 (the initial policy), every ``every`` steps, and the last step."""
    steps = list(range(0, recipe.train.steps, every))
    return steps + [recipe.train.steps]


def quiet_libraries() -> None:
    """Per-checkpoint load reports and accelerate's shared-tensor warning, once per save, are noise here."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
