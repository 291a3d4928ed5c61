"""The study engine ``align overopt`` and ``align compare`` share: objectives × seeds, each run
trained by the one trainer from the same SFT policy on the same prompts, its checkpoints scored on
held-out prompts by a study's own ``evaluate(recipe, policy)``, and what each run cost, measured.

Each run trains in a process of its own (``align train`` on the run's recipe), so its cost is its
own: the steps' seconds, completion tokens per second of step time, and the peak resident memory
of that process (evaluation excluded; it runs in the study's process).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import losses
from align.config import Strict
from align.recipe import ObjectiveConfig, Recipe


class EvalConfig(Strict):
    every: int = Field(20, gt=0, description="evaluate a checkpoint every N training steps (and step 0 and the last)")
    prompts: str | None = Field(None, description="held-out prompt file (default: base data.eval_prompts)")
    n_prompts: int = Field(128, gt=0, description="held-out prompts used (the first N)")


class ObjectiveSpec(ObjectiveConfig):
    label: str | None = Field(None, description="name in the report (default: NAME_betaBETA)")
    train: dict[str, Any] = Field(
        default_factory=dict, description="this run's changes to the base train section (replay, updates_per_batch)"
    )

    @property
    def effective_beta(self) -> float | None:
        if self.beta is not None:
            return self.beta
        beta = {**losses.options(self.name), **self.options}.get("beta")
        return beta if isinstance(beta, (int, float)) else None

    @property
    def run_name(self) -> str:
        if self.label:
            return self.label
        beta = self.effective_beta
        return self.name if beta is None else f"{self.name}_beta{beta:g}"

    def objective_section(self) -> dict:
        return self.model_dump(mode="json", exclude={"label", "train"}, exclude_none=True)


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
    from align.jobs.report import sample_prompts
    from align.rollout import decode_completions

    texts: list[str] = []
    for lo in range(0, len(prompts), chunk):
        rollout = sample_prompts(recipe, models, policy, prompts[lo : lo + chunk], seed, k, device, first_index=lo)
        stops = recipe.generation.stop_strings
        texts += decode_completions(rollout, models.tokenizer, stops, models.pad_token_id)
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
