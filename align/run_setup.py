"""A run's setup: the recipe resolved once into the settings the loop reads (``RunSettings``), and
everything a run holds between steps (``Run``): data, reward, models, optimizer, LR schedule,
replay buffer, rollout engine. Built in the order that fails fastest; restored from a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import losses
from align.batches import BatchLayout, cache_reference_logprobs, reuse_sampler_probs
from align.checkpoint import load_checkpoint
from align.config import RecipeError
from align.distributed import configure_deepspeed, prepare_reference, sharding
from align.evaluation import eval_prompts
from align.models import (
    Models,
    check_loadable,
    check_positions,
    check_quantisation,
    load_models,
    load_tokenizer,
    model_config,
    position_limit,
)
from align.native_engine import NativeEngine
from align.periodic_eval import PeriodicEval, best_so_far
from align.recipe import Recipe
from align.replay import ReplayBuffer
from align.rewards_adapter import RewardFunction, build_reward
from align.rollout import RolloutEngine, SamplingSettings, sampling_settings
from align.run_data import OfflineData, OnlineData
from align.scoring import ScoreSettings
from align.step import StepContext, StepSettings


@dataclass(frozen=True)
class RunSettings:
    """A recipe resolved, once, into what a run reads (``align.trainer.train`` makes it): the loop's
    settings as plain values, and the validated recipe itself for the loaders (model, data,
    reward), the checkpoint and the model card."""

    recipe: Recipe
    run_dir: Path
    resume: str | None
    overwrite: bool
    steps: int
    online: bool
    k: int  # completions per prompt (online)
    layout: BatchLayout
    step: StepSettings
    scoring: ScoreSettings
    max_bad_steps: int
    save_every: int
    keep_last: int
    sample_every: int
    disable_dropout: bool


@dataclass
class Run:
    """Everything one run holds between steps; ``state()`` is what a checkpoint saves besides weights."""

    recipe: Recipe
    settings: RunSettings
    objective: losses.Objective
    dataset: OnlineData | OfflineData
    reward: RewardFunction | None
    models: Models
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    replay: ReplayBuffer | None = None
    engine: RolloutEngine | None = None  # online: where rollouts come from (align/rollout.py's seam)
    sampling: SamplingSettings | None = None  # online: how they are sampled
    evaluator: PeriodicEval | None = None  # eval.every: evaluation during training (align/periodic_eval.py)
    step: int = 0
    bad_steps: int = 0
    ahead: Any = None  # train.async: the rollouts generated ahead (align/async_rollouts.py AheadRollouts)

    @property
    def step_context(self) -> StepContext:
        """What the optimizer steps work with (align/step.py)."""
        return StepContext(
            self.settings.step, self.models, self.objective, self.optimizer, self.scheduler, self.accelerator
        )

    def state(self) -> dict:
        return {
            "replay": self.replay.state_dict() if self.replay is not None else {},
            "step": self.step,
            "bad_steps": self.bad_steps,
            "scheduler": self.scheduler.state_dict(),
            "recipe": json.dumps(self.recipe.model_dump(mode="json")),  # checked on resume
            "objective": self.objective.state_dict(),
            "reward": self.reward.state_dict() if self.reward is not None else {},
            # every process's rollouts in flight (each generates its own rows): gathered to the saver
            "async": gather_states(self.ahead.state_dict(), self.accelerator) if self.ahead is not None else [],
        }


def gather_states(state: dict, accelerator) -> list[dict]:
    """One picklable state per process, in process order, on every process."""
    if accelerator.num_processes == 1:
        return [state]
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def setup_run(settings: RunSettings, accelerator) -> Run:
    """Data, reward, models, optimizer and LR schedule, in the order that fails fastest; offline
    data's reference log-probs (cached once); the rollout engine for an online objective."""
    from transformers import get_scheduler

    recipe = settings.recipe
    objective = recipe.build_objective()
    tokenizer, dataset = load_run_data(recipe)
    settings = steps_of_epochs(settings, len(dataset), accelerator.num_processes)
    need_critic = "values" in objective.needs
    if need_critic and sharding(accelerator) in ("zero2", "zero3", "fsdp2"):
        # accelerate prepares one trained model under FSDP2 and one per DeepSpeed engine
        raise RecipeError(
            f"critic: {objective.name!r} trains a critic beside the policy, and accelerate prepares only "
            f"one trained model under {sharding(accelerator)}; launch with DDP (one or more processes)"
        )
    if recipe.eval.every and sharding(accelerator) in ("zero3", "fsdp2"):
        # the sampled evaluation would make every forward a collective of the sharded model
        raise RecipeError(
            f"eval.every: evaluation during training runs on whole models, not under {sharding(accelerator)}; "
            "remove it (the end-of-run report evaluates the final model)"
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
    if cfg.gradient_checkpointing:
        enable_checkpointing(models)
    groups = [[p for p in models.policy.parameters() if p.requires_grad]]
    if models.critic is not None:
        groups.append([p for p in models.critic.parameters() if p.requires_grad])
    param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, base_lrs(recipe))]
    trainable = [p for params in groups for p in params]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        fused = fused_optimizer_ok(trainable)
        optimizer = torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused
        )
    passes = cfg.updates_per_batch * cfg.mini_batches  # optimizer steps per training step
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * passes,
        num_training_steps=settings.steps * passes,
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
        k, pad_id = recipe.objective.k, models.pad_token_id
        replay = ReplayBuffer(cfg.replay.capacity_steps, cfg.replay.mix, k, cfg.batch_size, pad_id, cfg.seed)
    if not settings.online and objective.uses_reference:
        cache_reference_logprobs(models, dataset, cfg.batch_size, accelerator)
    models.policy.train(not settings.disable_dropout)
    if models.critic is not None:
        models.critic.train(not settings.disable_dropout)
    engine = sampling = None
    if settings.online:
        sampling = sampling_settings(recipe.generation, models.eos_token_id, models.pad_token_id)
        engine = make_engine(settings, sampling, models, accelerator)
    return Run(
        recipe,
        settings,
        objective,
        dataset,
        reward,
        models,
        optimizer,
        scheduler,
        accelerator,
        replay,
        engine,
        sampling,
        evaluator=make_evaluator(recipe, dataset, tokenizer, settings.run_dir),
    )


def make_evaluator(recipe: Recipe, dataset, tokenizer, run_dir: Path) -> PeriodicEval | None:
    """``eval.every``'s held-out prompts (read once) and the best value a resumed run reached."""
    ev = recipe.eval
    if not ev.every:
        return None
    keep = None if ev.keep_best is None else ev.keep_best.removeprefix("eval/")
    prompts, columns, messages = [], {}, None
    if recipe.objective.online:
        prompts, columns, _, messages = eval_prompts(recipe, dataset, tokenizer, limit=ev.prompts)
    evaluator = PeriodicEval(ev.every, keep, ev.greater_is_better, prompts, columns, messages)
    evaluator.best = best_so_far(run_dir, keep)
    return evaluator


def steps_of_epochs(settings: RunSettings, rows: int, processes: int) -> RunSettings:
    """``train.epochs`` as optimizer steps: every step takes batch_size × gradient_accumulation_steps
    rows on each process, drawn from per-epoch permutations (align/data.py ``step_rows``)."""
    epochs = settings.recipe.train.epochs
    if epochs is None:
        return settings
    per_step = settings.layout.batch_size * settings.layout.gradient_accumulation_steps * processes
    return replace(settings, steps=max(1, math.ceil(epochs * rows / per_step)))


def make_engine(settings: RunSettings, sampling: SamplingSettings, models: Models, accelerator) -> RolloutEngine:
    """The recipe's rollout engine (``generation.engine``)."""
    recipe = settings.recipe
    if recipe.generation.engine == "vllm" and recipe.generation.vllm.mode == "server":
        from align.vllm_server import VLLMServerEngine

        return VLLMServerEngine(recipe, models, accelerator)
    if recipe.generation.engine == "vllm":
        from align.vllm_engine import VLLMEngine

        max_len = recipe.data.max_prompt_tokens + recipe.generation.max_new_tokens
        limit = position_limit(recipe)
        return VLLMEngine(recipe, models, accelerator, min(max_len, limit) if limit else max_len)
    return NativeEngine(models.policy, models.tokenizer, accelerator, keep_probs(settings, sampling, models))


def enable_checkpointing(models: Models) -> None:
    """transformers' gradient checkpointing, non-reentrant (frozen inputs and LoRA need no input
    gradients), on the policy and the critic's backbone; it acts in training mode only (align/step.py)."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    for model in (models.policy, getattr(models.critic, "backbone", None)):
        if model is None:
            continue
        if not getattr(model, "supports_gradient_checkpointing", True):
            raise RecipeError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; remove it")
        model.gradient_checkpointing_enable(**kwargs)


def load_run_data(recipe: Recipe) -> tuple[Any, OnlineData | OfflineData]:
    """The tokenizer and the run's data, every file the recipe names read as the run reads it,
    the model ids resolved and the prompt budget checked: with the tokenizer and configs alone, so
    a bad row, a missing file or an over-long prompt fails in seconds, before any weights load."""
    tokenizer = load_tokenizer(recipe)
    if recipe.objective.online:
        dataset = OnlineData(recipe, tokenizer)
    else:
        dataset = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    check_loadable(recipe)  # a hub id that cannot be resolved: one line, before anything loads
    check_quantisation(recipe)
    check_positions(recipe, dataset)
    if recipe.objective.online and recipe.generation.engine == "vllm" and recipe.generation.vllm.mode == "server":
        from align.vllm_server import check_server

        needed, limit = recipe.data.max_prompt_tokens + recipe.generation.max_new_tokens, position_limit(recipe)
        check_server(recipe, min(needed, limit) if limit else needed)
    elif recipe.objective.online and recipe.generation.engine == "vllm":
        from align.vllm_engine import check_vllm

        check_vllm(recipe, model_config(recipe))
    if recipe.data.eval_prompts and recipe.output.report:  # the report's prompts, read as it will read them
        eval_prompts(recipe, dataset if recipe.objective.online else None, tokenizer)
    return tokenizer, dataset


def keep_probs(settings: RunSettings, sampling: SamplingSettings, models: Models) -> bool:
    """Whether the native engine keeps its softmax for the step's training forward (``reuse_sampler_probs``)."""
    prompts = settings.layout.batch_size * settings.layout.gradient_accumulation_steps * settings.layout.mini_batches
    per_call = sampling.prompts_per_call or prompts
    async_ = settings.recipe.train.async_
    if async_ is not None and async_.max_staleness > 0:  # trained by later weights than sampled: recomputed
        return False
    return reuse_sampler_probs(
        models.policy,
        online=settings.online,
        one_pass=settings.step.updates_per_batch == 1 and settings.step.mini_batches == 1,
        one_micro_batch=settings.layout.gradient_accumulation_steps == 1,
        one_call=-(-prompts // per_call) == 1,
        max_new_tokens=sampling.max_new_tokens,
        rows=prompts * settings.k,
    )


def base_lrs(recipe: Recipe) -> list[float]:
    """The learning rate of each optimizer parameter group: the policy's, then the critic's."""
    critic = recipe.critic.lr if recipe.critic is not None and recipe.critic.lr is not None else None
    return [recipe.train.lr, critic if critic is not None else recipe.train.lr]


def fused_optimizer_ok(params: list[Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all parameters, ~2.5× faster than the per-tensor
    default on CPU) where every parameter is a floating tensor on a device it supports."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


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
    saved_ahead = state.get("async") or []
    if run.ahead is not None and len(saved_ahead) == accelerator.num_processes:
        run.ahead.load_state_dict(saved_ahead[accelerator.process_index])
