"""The shared trainer: one readable loop for online and offline objectives.

    for step:  batch = make_batch(run, step)          # rollout → score → batch (align/batches.py)
               train_step(run, batch)                 # align/step.py
               log_step(...); maybe save(...)         # here; align/checkpoint.py

A run's setup (models, data, optimizer, the rollout engine) is align/run_setup.py. Loss
normalisation follows losses/base.py: each micro-batch loss is divided by the number of units
(sequences, pairs or tokens) in the WHOLE optimizer step over all processes, and scaled by the
number of processes because DDP averages gradients. Summed micro-batch gradients then equal the
full-batch gradient: batch 8 × accumulation 1 = batch 1 × accumulation 8 = 2 processes × batch 4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align import files
from align.allocator import tune_allocator
from align.async_rollouts import AheadRollouts, ServerShadow, ShadowPolicy
from align.batches import BatchLayout, StepBatch, local_rows, offline_batch, rollout_batch
from align.checkpoint import resolve_resume, save_checkpoint
from align.config import RecipeError, dump_recipe
from align.distributed import loading_whole_models, make_accelerator, params_sharded, run_info
from align.metrics_log import MetricsLog, postfix, progress_bar, read_metrics
from align.model_card import write_model_card
from align.models import Models
from align.native_engine import NativeEngine
from align.periodic_eval import evaluate_step, keep_best
from align.recipe import Recipe
from align.resume_check import check_resume, record_changes
from align.rewards_adapter import RewardFunction
from align.rollout import EngineUnavailable, Rollout, RolloutEngine
from align.run_data import OfflineData, OnlineData
from align.run_setup import Run, RunSettings, restore, setup_run
from align.rundir import claim_run_dir
from align.sampling import sample_keys
from align.scoring import RolloutScores, ScoreSettings, all_ranks, pair_rewards, score_rollout
from align.signals import StopSignal, agreed_signal
from align.step import StepSettings, keep_rollout_logprobs, train_on_batch
from align.vllm_server import VLLMServerEngine
from losses.correction import Correction


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, ...); the message says why."""


@dataclass
class FinishedRun:
    """What an ``on_end`` hook sees of a run that reached its last step (the end-of-run report)."""

    recipe: Recipe
    models: Models
    prompts: OnlineData | None  # the online prompts; None for an offline objective
    reward: RewardFunction | None
    run_dir: Path
    accelerator: Any
    checkpoint: Path  # the last checkpoint (its model/ is a whole HF directory)
    sharded: bool  # the live models hold shards: call them from every process or not at all
    held_out: OfflineData | None = None  # offline pair objectives: the held-out pairs (data.eval_*)


def train(
    recipe: Recipe,
    accelerator=None,
    on_step: Callable[[int, dict], None] | None = None,
    on_end: Callable[[FinishedRun], dict] | None = None,
    on_save: Callable[[Path], None] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run a recipe to the end (or to a signal); returns the summary written to summary.json.

    The recipe's assets must exist: ``prepare:`` is the job layer's (``align.jobs.train.run``).
    ``on_step(step, record)`` is called after each logged step (evaluation hooks, tests);
    ``on_end(run)`` on the main process after a run that finished, its dict merged into the summary;
    ``on_save(checkpoint)`` on the main process after each checkpoint is complete (the last included);
    ``on_eval(step, metrics)`` after each evaluation of ``eval.every`` with its ``eval/`` metrics.
    """
    tune_allocator()  # reuse the step's large buffers instead of page-faulting them in every step
    return run_training(run_settings(recipe), accelerator, Hooks(on_step, on_end, on_save, on_eval))


def run_settings(recipe: Recipe) -> RunSettings:
    """The recipe read once into the settings the run reads (and the loaders its sections)."""
    train_section, online = recipe.train, recipe.objective.online
    demonstrations = recipe.data.demonstration_column if "demo_rewards" in recipe.objective.needs else None
    return RunSettings(
        recipe=recipe,
        run_dir=Path(recipe.output.dir),
        resume=recipe.resume,
        overwrite=recipe.output.overwrite,
        steps=train_section.steps,
        online=online,
        k=recipe.objective.k,
        layout=BatchLayout(
            train_section.batch_size,
            train_section.gradient_accumulation_steps,
            train_section.mini_batches,
            train_section.seed,
        ),
        step=StepSettings(
            updates_per_batch=train_section.updates_per_batch,
            mini_batches=train_section.mini_batches,
            max_grad_norm=train_section.max_grad_norm,
            temperature=recipe.generation.temperature if online else 1.0,
            correction=correction(recipe),
            gradient_checkpointing=train_section.gradient_checkpointing,
        ),
        scoring=ScoreSettings(steps=train_section.steps, demonstration_column=demonstrations),
        max_bad_steps=train_section.max_bad_steps,
        save_every=recipe.output.save_every,
        keep_last=recipe.output.keep_last,
        sample_every=recipe.output.sample_every,
        disable_dropout=recipe.model.disable_dropout,
    )


def correction(recipe: Recipe) -> Correction | None:
    """The run's sampler-mismatch correction (``generation.importance_correction``), as the step applies it."""
    chosen = recipe.sampler_correction()
    return None if chosen is None else Correction(chosen.mode, chosen.clip_max, chosen.clip_min)


@dataclass(frozen=True)
class Hooks:
    """The caller's callbacks (``train``'s keywords), called on the main process except ``on_step``."""

    on_step: Callable[[int, dict], None] | None = None
    on_end: Callable[[FinishedRun], dict] | None = None
    on_save: Callable[[Path], None] | None = None
    on_eval: Callable[[int, dict], None] | None = None


def run_training(settings: RunSettings, accelerator, hooks: Hooks) -> dict:
    """Claim the run directory, set the run up (or restore it), and run its loop."""
    from accelerate.utils import set_seed

    accelerator = accelerator or make_accelerator(settings.layout.gradient_accumulation_steps)
    set_seed(settings.layout.seed)
    run_dir = settings.run_dir
    resume_from = resolve_resume(settings.resume, run_dir, accelerator)
    lock = claim_run_dir(run_dir, settings.resume is not None, settings.overwrite, accelerator)
    try:
        changes = check_resume(settings.recipe, resume_from) if resume_from is not None else {}
        run = setup_run(settings, accelerator)
        run.ahead = ahead_rollouts(run, accelerator)
        if resume_from is not None:
            restore(run, accelerator, resume_from, changes)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None or not (run_dir / "recipe.yaml").exists():
                dump_recipe(settings.recipe, run_dir / "recipe.yaml")  # as the run started; changes go to the history
            record_changes(run_dir, run.step, changes)
        try:
            return run_loop(run, accelerator, run_dir, hooks)
        finally:
            if run.ahead is not None:
                run.ahead.close()
    finally:
        lock.release()


def run_loop(run: Run, accelerator, run_dir: Path, hooks: Hooks) -> dict:
    """Step until the last step, a signal or too many non-finite steps; then the final save."""
    recipe, settings, main = run.recipe, run.settings, accelerator.is_main_process
    output = recipe.output
    log = MetricsLog(
        run_dir, run.step, main, output.report_to, recipe.model_dump(mode="json"), output.wandb_project, output.run_name
    )
    bar = progress_bar(settings.steps, run.step, main, run.objective.name)
    stopped_by = None
    try:  # the bar and the log are closed however the loop ends, before anything is said of it
        with StopSignal() as stop:
            while run.step < settings.steps:
                try:
                    record = train_step(run, accelerator)
                except EngineUnavailable as err:  # the rollouts' server died: keep what was trained
                    raise TrainingError(f"{err}; checkpoint {save(run, accelerator, run_dir)}") from None
                evaluate(run, accelerator, record, run_dir, hooks)
                if record.get("skipped") and main:
                    skipped = f"step skipped ({run.bad_steps} so far)"
                    bar.write(f"step {run.step}: non-finite loss, log-probs or gradient; {skipped}")
                log.log(record)
                if run.bad_steps > settings.max_bad_steps:
                    # the step that ends the run is logged and checkpointed, so it can be inspected and resumed
                    raise TrainingError(
                        f"{run.bad_steps} steps skipped for non-finite values (train.max_bad_steps="
                        f"{settings.max_bad_steps}); lower train.lr or check the reward; last checkpoint "
                        f"{save(run, accelerator, run_dir)}"
                    )
                bar.update(1)
                bar.set_postfix(postfix(record), refresh=False)
                if hooks.on_step is not None:
                    hooks.on_step(run.step, record)
                received = agreed_signal(stop.received, accelerator)
                if received is not None:
                    stopped_by = signal.Signals(received).name
                    break
                if settings.save_every and run.step % settings.save_every == 0 and run.step < settings.steps:
                    saved(save(run, accelerator, run_dir), hooks.on_save, main)
    finally:
        bar.close()
        log.close()
    last = saved(save(run, accelerator, run_dir), hooks.on_save, main)
    return finish_run(run, accelerator, last, stopped_by, hooks.on_end, run_dir)


def saved(checkpoint: Path, on_save, main: bool) -> Path:
    """A complete checkpoint, announced to the ``on_save`` hook (main process)."""
    if on_save is not None and main:
        on_save(checkpoint)
    return checkpoint


def evaluate(run: Run, accelerator, record: dict, run_dir: Path, hooks: Hooks) -> None:
    """Every ``eval.every`` steps: the held-out ``eval/`` metrics into the step's record, and the
    model kept in ``best/`` when ``eval.keep_best`` improved (a checkpoint is saved for it)."""
    evaluator = run.evaluator
    if evaluator is None or run.step % evaluator.every:
        return
    metrics = evaluate_step(evaluator, run, accelerator)
    record.update(metrics)
    if hooks.on_eval is not None and accelerator.is_main_process:
        hooks.on_eval(run.step, metrics)
    if evaluator.improved(record):
        checkpoint = saved(save(run, accelerator, run_dir), hooks.on_save, accelerator.is_main_process)
        if accelerator.is_main_process:
            keep_best(checkpoint, run_dir, run.step, evaluator.keep_best, evaluator.best)


def train_step(run: Run, accelerator) -> dict:
    """One training step: its batch (a scored rollout, or offline rows), mixed with replayed groups
    where the recipe keeps them, then ``train_on_batch``; returns the step's log record. The batch
    lives only here, so a kept softmax is freed before the next rollout allocates its own."""
    started = time.perf_counter()
    batch = make_batch(run, run.step, accelerator)
    kept = None
    if run.replay is not None:  # this step's groups join the buffer; the step trains on a mix
        if run.objective.sampling_logprobs:  # kept with the groups: their sampler's log-probs
            kept = keep_rollout_logprobs(run.step_context, batch)
        run.replay.add(batch, kept, run.step)
        batch, kept = run.replay.mix_into(batch, run.step, accelerator.process_index)
    metrics = train_on_batch(run.step_context, batch, kept)
    run.step += 1
    if metrics is None:
        run.bad_steps += 1
        metrics = {"skipped": 1.0}
    return log_step(run, metrics, batch, time.perf_counter() - started)


def make_batch(run: Run, step: int, accelerator) -> StepBatch:
    """The step's batch: this process's rows of the dataset, as a scored rollout (online) or as
    fixed pairs / rows (offline)."""
    rows = local_rows(run.settings.layout, len(run.dataset), step, accelerator.num_processes, accelerator.process_index)
    if not run.settings.online:
        rewards = None
        if run.dataset.paired and "rewards" in run.objective.needs:  # copg on a pair file: rewards per text
            rewards = pair_rewards(run.dataset, run.reward, rows, all_ranks(accelerator))
        mismatched = None  # KTO: each row's prompt with the completion of the step's row before it
        if "mismatched_logprobs" in run.objective.needs:
            layout, n = run.settings.layout, len(run.dataset)
            mismatched = local_rows(layout, n, step, accelerator.num_processes, accelerator.process_index, rotated=True)
        return offline_batch(
            run.settings.layout, run.dataset, rows, run.models.pad_token_id, accelerator.device, rewards, mismatched
        )
    if run.ahead is not None:  # generated ahead (train.async): by the weights of an earlier step
        sampled, timing = run.ahead.take(step)
    else:
        started = time.perf_counter()
        sampled = rollout(run, rows, step)
        timing = {"generation_s": time.perf_counter() - started}
    started = time.perf_counter()
    scores = score(run, sampled, rows, step, accelerator)
    timing = {**timing, "scoring_s": time.perf_counter() - started}
    prompts = [run.dataset.prompts[i] for i in rows for _ in range(run.settings.k)]
    return rollout_batch(sampled, scores, run.settings.layout, prompts, accelerator.device, timing)


def rollout(
    run: Run, rows: list[int], step: int, engine: RolloutEngine | None = None, version: int | None = None
) -> Rollout:
    """k completions for each prompt of ``rows`` from the run's engine (or ``engine``), keyed by
    (seed, step, row); ``version``: the weights' version when they are not this step's own."""
    keys = sample_keys(run.settings.layout.seed, step, torch.tensor(rows), run.settings.k)
    prompts = [run.dataset.prompt_ids[i] for i in rows]
    version = step if version is None else version
    return (engine or run.engine).generate(prompts, keys, run.settings.k, run.sampling, policy_version=version)


def ahead_rollouts(run: Run, accelerator) -> AheadRollouts | None:
    """The generator of ``train.async`` (align/async_rollouts.py): a shadow copy of the policy in a
    worker thread where the native engine samples whole weights, a vLLM server generating while the
    step trains (one training process), in line otherwise."""
    config = run.recipe.train.async_
    if config is None:
        return None
    layout, n_rows = run.settings.layout, len(run.dataset)

    def produce(step: int, engine: RolloutEngine, version: int) -> Rollout:
        rows = local_rows(layout, n_rows, step, accelerator.num_processes, accelerator.process_index)
        return rollout(run, rows, step, engine, version)

    policy = accelerator.unwrap_model(run.models.policy)
    shadow = None
    if isinstance(run.engine, NativeEngine) and not params_sharded(accelerator):
        tokenizer = run.models.tokenizer
        shadow = ShadowPolicy(policy, lambda model: NativeEngine(model, tokenizer, accelerator))
    elif isinstance(run.engine, VLLMServerEngine) and accelerator.num_processes == 1:
        shadow = ServerShadow(run.engine)  # the server generates while the step trains
    elif config.mode == "bounded":
        raise RecipeError(
            "train.async.mode: bounded generates beside training on whole weights, or from a vLLM server with one "
            "training process; this launch has neither: use mode: fixed"
        )
    return AheadRollouts(produce, config, run.engine, run.settings.steps, shadow, policy)


def score(run: Run, sampled: Rollout, rows: list[int], step: int, accelerator) -> RolloutScores:
    """The recipe's reward on the rollout's samples (and RCfD's demonstrations)."""
    completion_ids = None
    if run.reward.takes_trl_inputs:
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(sampled.completion_ids, sampled.completion_mask)]
    return score_rollout(
        run.reward,
        run.dataset,
        rows,
        list(sampled.texts),
        completion_ids,
        run.models.tokenizer,
        run.settings.scoring,
        step,
        all_ranks(accelerator),
    )


def log_step(run: Run, metrics: dict, batch: StepBatch, seconds: float) -> dict:
    """The step's log record: its metrics, timing, and a few samples every ``output.sample_every`` steps."""
    record = {"step": run.step, **metrics, "step_s": seconds, "skipped_steps": run.bad_steps}
    if "tokens" in metrics:
        record["tokens_per_s"] = metrics["tokens"] / max(seconds, 1e-9)
    if torch.cuda.is_available():  # peak since the run started, for benchmarks/gpu_check.sh
        record["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    every = run.settings.sample_every
    if every and run.step % every == 0 and batch.texts:
        record["samples"] = [{"prompt": p, "completion": c} for p, c in list(zip(batch.prompts, batch.texts))[:4]]
    return record


def save(run: Run, accelerator, run_dir: Path) -> Path:
    """A checkpoint of the run as it stands (align/checkpoint.py: atomic, the last few kept)."""
    models = run.models
    return save_checkpoint(
        accelerator, models.policy, models.tokenizer, run.state(), run_dir, run.settings.keep_last, critic=models.critic
    )


def finish_run(run: Run, accelerator, checkpoint: Path, stopped_by: str | None, on_end, run_dir: Path) -> dict:
    """final/ (a plain HF directory), the on_end hook, summary.json."""
    summary = {
        "steps": run.step,
        "skipped_steps": run.bad_steps,
        "stopped_by": stopped_by,
        "checkpoint": str(checkpoint),
        **run_info(accelerator),  # how it ran: distributed type, processes, mixed precision, sharding
    }
    if stopped_by is None and run.recipe.output.save_model:
        final = run_dir / "final"
        records = read_metrics(run_dir) if accelerator.is_main_process else []
        last = records[-1] if records else {}
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(checkpoint / "model", final)
            write_model_card(final, run.recipe, summary, last)
        summary["final_model"] = str(final)
        if (checkpoint / "critic").is_dir():
            if accelerator.is_main_process:
                shutil.rmtree(run_dir / "final_critic", ignore_errors=True)
                shutil.copytree(checkpoint / "critic", run_dir / "final_critic")
            summary["final_critic"] = str(run_dir / "final_critic")
        if run.recipe.output.merge_lora and run.recipe.model.lora is not None:
            if accelerator.is_main_process:
                merge_adapters(run.recipe, final, run_dir / "final_merged", accelerator)
                write_model_card(run_dir / "final_merged", run.recipe, summary, last, merged=True)
            summary["final_merged"] = str(run_dir / "final_merged")
    if stopped_by is None and on_end is not None and accelerator.is_main_process:
        prompts = run.dataset if run.recipe.objective.online else None
        held_out = None if run.recipe.objective.online else run.dataset.held_out
        finished = FinishedRun(
            run.recipe,
            run.models,
            prompts,
            run.reward,
            run_dir,
            accelerator,
            checkpoint,
            params_sharded(accelerator),
            held_out,
        )
        summary.update(on_end(finished))
    if accelerator.is_main_process:
        files.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def merge_adapters(recipe: Recipe, final: Path, out: Path, accelerator) -> None:
    """The base model with final/'s LoRA adapters merged in, and final/'s tokenizer with every file
    it has (chat template included): a plain HF directory, written atomically."""
    from transformers import AutoTokenizer

    from align.models import load_saved_policy

    with loading_whole_models(accelerator):
        merged = load_saved_policy(recipe, final, "cpu").merge_and_unload()
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(final).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
