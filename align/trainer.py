"""The shared trainer: one readable loop for online and offline objectives.

    for step:  batch = rollout_batch(...) | offline_batch(...)   # align/batches.py
               train_on_batch(...)                                # align/step.py
               log_step(...); maybe save_checkpoint(...)          # here, align/checkpoint.py

Loss normalisation follows losses/base.py: each micro-batch loss is divided by the number of
units (sequences, pairs or tokens) in the WHOLE optimizer step over all processes, and scaled
by the number of processes because DDP averages gradients. Summed micro-batch gradients then
equal the full-batch gradient: batch 8 × accumulation 1 = batch 1 × accumulation 8 = 2
processes × batch 4.
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
from torch import Tensor

from align.allocator import tune_allocator
from align.batches import (
    StepBatch,
    cache_reference_logprobs,
    offline_batch,
    rollout_batch,
)
from align.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from align.config import RecipeError, dump_recipe
from align.distributed import (
    configure_deepspeed,
    loading_whole_models,
    make_accelerator,
    params_sharded,
    prepare_reference,
    run_info,
    sharding,
)
from align.metrics_log import MetricsLog, postfix, progress_bar, read_metrics
from align.model_card import write_model_card
from align.models import Models, check_loadable, check_positions, load_models, load_tokenizer
from align.recipe import Recipe
from align.replay import ReplayBuffer
from align.resume_check import check_resume, record_changes
from align.rewards_adapter import RewardFunction, build_reward
from align.run_data import OfflineData, OnlineData
from align.rundir import claim_run_dir
from align.signals import StopSignal, agreed_signal
from align.step import keep_rollout_logprobs, train_on_batch


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, ...); the message says why."""


# --------------------------------------------------------------------------------------------
# the run


def _fused_optimizer_ok(params: list[Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all parameters, ~2.5× faster than the per-tensor
    default on CPU) where every parameter is a floating tensor on a device it supports."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


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
) -> dict:
    """Run a recipe to the end (or to a signal); returns the summary written to summary.json.

    The recipe's assets must exist: ``prepare:`` is the job layer's (``align.jobs.train.run``).
    ``on_step(step, record)`` is called after each logged step (evaluation hooks, tests);
    ``on_end(run)`` on the main process after a run that finished, its dict merged into the summary.
    """
    from accelerate.utils import set_seed

    tune_allocator()  # reuse the step's large buffers instead of page-faulting them in every step
    accelerator = accelerator or make_accelerator(recipe.train.gradient_accumulation_steps)
    set_seed(recipe.train.seed)
    run_dir = Path(recipe.output.dir)
    resume_from = resolve_resume(recipe.resume, run_dir)
    lock = claim_run_dir(run_dir, recipe.resume is not None, recipe.output.overwrite, accelerator)
    try:
        changes = check_resume(recipe, resume_from) if resume_from is not None else {}
        return _run(recipe, accelerator, on_step, on_end, run_dir, resume_from, changes)
    finally:
        lock.release()


@dataclass
class Run:
    """Everything one run holds between steps; ``state()`` is what a checkpoint saves besides weights."""

    recipe: Recipe
    objective: Any
    dataset: OnlineData | OfflineData
    reward: RewardFunction | None
    models: Models
    optimizer: torch.optim.Optimizer
    scheduler: Any
    replay: ReplayBuffer | None = None
    step: int = 0
    bad_steps: int = 0

    def state(self) -> dict:
        return {
            "replay": self.replay.state_dict() if self.replay is not None else {},
            "step": self.step,
            "bad_steps": self.bad_steps,
            "scheduler": self.scheduler.state_dict(),
            "recipe": json.dumps(self.recipe.model_dump(mode="json")),  # checked on resume
            "objective": self.objective.state_dict(),
            "reward": self.reward.state_dict() if self.reward is not None else {},
        }


def _run(recipe: Recipe, accelerator, on_step, on_end, run_dir: Path, resume_from: Path | None, changes: dict) -> dict:
    run = setup_run(recipe, accelerator)
    if resume_from is not None:
        restore(run, accelerator, resume_from, changes)
    if not recipe.objective.online and run.objective.uses_reference:
        cache_reference_logprobs(recipe, run.models, run.dataset, accelerator)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None or not (run_dir / "recipe.yaml").exists():
            dump_recipe(recipe, run_dir / "recipe.yaml")  # what the run started with; changes go to the history
        record_changes(run_dir, run.step, changes)
    main = accelerator.is_main_process
    log = MetricsLog(
        run_dir,
        run.step,
        main,
        recipe.output.report_to,
        recipe.model_dump(mode="json"),
        recipe.output.wandb_project,
        recipe.output.run_name,
    )
    bar = progress_bar(recipe.train.steps, run.step, main, run.objective.name)
    run.models.policy.train(not recipe.model.disable_dropout)
    if run.models.critic is not None:
        run.models.critic.train(not recipe.model.disable_dropout)

    def save() -> Path:
        return save_checkpoint(
            accelerator,
            run.models.policy,
            run.models.tokenizer,
            run.state(),
            run_dir,
            recipe.output.keep_last,
            critic=run.models.critic,
        )

    stopped_by = None
    with StopSignal() as stop:
        while run.step < recipe.train.steps:
            started = time.perf_counter()
            make_batch = rollout_batch if recipe.objective.online else offline_batch
            batch = make_batch(recipe, run.models, run.dataset, run.reward, run.step, accelerator)
            if run.replay is not None:  # this step's groups join the buffer; the step trains on a mix
                if run.objective.sampling_logprobs:  # kept with the groups: their sampler's log-probs
                    keep_rollout_logprobs(recipe, run.models, run.objective, batch, accelerator)
                run.replay.add(batch, run.step)
                batch = run.replay.mix_into(batch, run.step, accelerator.process_index)
            models, objective = run.models, run.objective
            metrics = train_on_batch(recipe, models, objective, batch, run.optimizer, run.scheduler, accelerator)
            run.step += 1
            if metrics is None:
                run.bad_steps += 1
                if main:
                    bar.write(
                        f"step {run.step}: non-finite loss, log-probs or gradient; step skipped "
                        f"({run.bad_steps} so far)"
                    )
                metrics = {"skipped": 1.0}
            record = log_step(recipe, run.step, metrics, batch, time.perf_counter() - started, run.bad_steps)
            log.log(record)
            if run.bad_steps > recipe.train.max_bad_steps:
                # the step that ends the run is logged and checkpointed, so it can be inspected and resumed
                log.close()
                bar.close()
                raise TrainingError(
                    f"{run.bad_steps} steps skipped for non-finite values (train.max_bad_steps="
                    f"{recipe.train.max_bad_steps}); lower train.lr or check the reward; last checkpoint {save()}"
                )
            bar.update(1)
            bar.set_postfix(postfix(record), refresh=False)
            if on_step is not None:
                on_step(run.step, record)
            received = agreed_signal(stop.received, accelerator)
            if received is not None:
                stopped_by = signal.Signals(received).name
                break
            if recipe.output.save_every and run.step % recipe.output.save_every == 0 and run.step < recipe.train.steps:
                save()
    bar.close()
    log.close()
    return finish_run(run, accelerator, save(), stopped_by, on_end, run_dir)


def setup_run(recipe: Recipe, accelerator) -> Run:
    """Data, reward, models, optimizer and LR schedule, in the order that fails fastest."""
    from transformers import get_scheduler

    objective = recipe.build_objective()
    # data and prompt budgets are checked with the tokenizer and config alone: a bad row or an
    # over-long prompt fails in seconds, before any weights (policy, reference, reward) load
    tokenizer = load_tokenizer(recipe)
    if recipe.objective.online:
        dataset = OnlineData(recipe, tokenizer)
    else:
        dataset = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    check_loadable(recipe)  # a hub id that cannot be resolved: one line, before anything loads
    check_positions(recipe, dataset)
    need_critic = "values" in objective.needs
    if need_critic and sharding(accelerator) in ("zero2", "zero3", "fsdp2"):
        # accelerate prepares one trained model under FSDP2 and one per DeepSpeed engine
        raise RecipeError(
            f"critic: {objective.name!r} trains a critic beside the policy, and accelerate prepares only "
            f"one trained model under {sharding(accelerator)}; launch with DDP (one or more processes)"
        )
    reward = build_reward(recipe.reward, accelerator.device) if recipe.reward else None
    models = load_models(
        recipe,
        accelerator.device,
        need_reference=objective.uses_reference,
        tokenizer=tokenizer,
        need_critic=need_critic,
    )
    cfg = recipe.train
    groups = [[p for p in models.policy.parameters() if p.requires_grad]]
    if models.critic is not None:
        groups.append([p for p in models.critic.parameters() if p.requires_grad])
    param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, base_lrs(recipe))]
    trainable = [p for params in groups for p in params]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            param_groups,
            lr=cfg.lr,
            betas=cfg.adam_betas,
            weight_decay=cfg.weight_decay,
            fused=_fused_optimizer_ok(trainable),
        )
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * cfg.updates_per_batch * cfg.mini_batches,
        num_training_steps=cfg.steps * cfg.updates_per_batch * cfg.mini_batches,
    )
    configure_deepspeed(accelerator, cfg.batch_size, cfg.max_grad_norm)
    if models.critic is not None:
        models.policy, models.critic, optimizer = accelerator.prepare(models.policy, models.critic, optimizer)
    else:
        models.policy, optimizer = accelerator.prepare(models.policy, optimizer)
    models.reference = prepare_reference(models.reference, accelerator)  # placed like the policy
    # the scheduler is not prepared: accelerate's wrapper steps once per process, which would make
    # the schedule depend on the process count; its state goes into trainer_state.pt (plain types,
    # loaded with weights_only=True) rather than accelerate's pickle of custom objects
    replay = None
    if cfg.replay is not None:
        replay = ReplayBuffer(
            cfg.replay.capacity_steps, cfg.replay.mix, recipe.objective.k, cfg.batch_size, models.pad_token_id, cfg.seed
        )
    return Run(recipe, objective, dataset, reward, models, optimizer, scheduler, replay)


def base_lrs(recipe: Recipe) -> list[float]:
    """The learning rate of each optimizer parameter group: the policy's, then the critic's."""
    critic = recipe.critic.lr if recipe.critic is not None and recipe.critic.lr is not None else None
    return [recipe.train.lr, critic if critic is not None else recipe.train.lr]


def restore(run: Run, accelerator, checkpoint: Path, changes: dict) -> None:
    """Weights, optimizer and RNG states, step counters, LR schedule, objective and reward state."""
    state = load_checkpoint(accelerator, checkpoint)
    run.step, run.bad_steps = state["step"], state["bad_steps"]
    scheduler = run.scheduler
    scheduler.load_state_dict(state["scheduler"])
    if "train.lr" in changes or "critic.lr" in changes:  # applied from this step on, not replaced by the saved one
        scheduler.base_lrs = base_lrs(run.recipe)[: len(scheduler.base_lrs)]
        for group, base, factor in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    run.objective.load_state_dict(state["objective"])
    if run.replay is not None:
        run.replay.load_state_dict(state.get("replay", {}))
    if run.reward is not None:
        run.reward.load_state_dict(state.get("reward", {}))


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
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(checkpoint / "model", final)
            records = read_metrics(run_dir)
            write_model_card(final, run.recipe, summary, records[-1] if records else {})
        summary["final_model"] = str(final)
        if (checkpoint / "critic").is_dir():
            if accelerator.is_main_process:
                shutil.rmtree(run_dir / "final_critic", ignore_errors=True)
                shutil.copytree(checkpoint / "critic", run_dir / "final_critic")
            summary["final_critic"] = str(run_dir / "final_critic")
        if run.recipe.output.merge_lora and run.recipe.model.lora is not None:
            if accelerator.is_main_process:
                merge_adapters(run.recipe, final, run_dir / "final_merged", accelerator)
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
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def merge_adapters(recipe: Recipe, final: Path, out: Path, accelerator) -> None:
    """The base model with final/'s LoRA adapters merged in: a plain HF directory (written atomically)."""
    from align.models import load_saved_policy

    with loading_whole_models(accelerator):
        merged = load_saved_policy(recipe, final, "cpu").merge_and_unload()
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        if (final / name).is_file():
            shutil.copy2(final / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def log_step(recipe: Recipe, step: int, metrics: dict, batch: StepBatch, seconds: float, bad_steps: int) -> dict:
    record = {"step": step, **metrics, "step_s": seconds, "skipped_steps": bad_steps}
    if "tokens" in metrics:
        record["tokens_per_s"] = metrics["tokens"] / max(seconds, 1e-9)
    if torch.cuda.is_available():  # peak since the run started, for benchmarks/gpu_check.sh
        record["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    every = recipe.output.sample_every
    if every and step % every == 0 and batch.texts:
        record["samples"] = [{"prompt": p, "completion": c} for p, c in list(zip(batch.prompts, batch.texts))[:4]]
    return record
