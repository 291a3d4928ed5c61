"""The optimizer step: log-probs → objective → backward for each micro-batch, then one clipped step.

Each micro-batch loss is divided by the number of units in the WHOLE step over all processes and
scaled by the process count (DDP averages gradients), so summed micro-batch gradients equal the
full-batch gradient."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

import losses
from align.batches import KeptLogprobs, StepBatch, keep_mismatched_logprobs
from align.critic import completion_values
from align.logprobs import completion_logprobs
from align.models import Models, reference_model
from align.rollout import pad_to, trim_left
from align.step_metrics import Sums, add_sums, finish, sequence_sums
from losses import LossBatch
from losses.base import select_pairs
from losses.correction import Correction


@dataclass(frozen=True)
class StepSettings:
    """What the optimizer step reads of the recipe, resolved once per run."""

    updates_per_batch: int = 1  # passes over each batch (TRL's PPO epochs)
    mini_batches: int = 1  # optimizer steps per pass
    max_grad_norm: float | None = 1.0  # None: no clipping
    temperature: float = 1.0  # of the loss's log-probs: the sampler's (online), 1 (offline rows)
    correction: Correction | None = None  # importance weights π_old/π_engine (losses/correction.py)
    gradient_checkpointing: bool = False  # the training forwards in training mode (HF checkpoints only then)


@dataclass(frozen=True)
class StepContext:
    """What every optimizer step of a run works with."""

    settings: StepSettings
    models: Models
    objective: losses.Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    # the step's reference forwards timed: wall seconds (CPU), or CUDA event pairs read once at the
    # step's end (a host sync per forward would stall the device's queue)
    reference_s: list[float] = field(default_factory=list)
    reference_events: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: this process's metric sums, the gradient norm (None: DeepSpeed clips
    inside its engine) and the per-token values later passes over the batch read."""

    sums: Sums
    grad_norm: float | None
    kept: KeptLogprobs


def train_on_batch(ctx: StepContext, batch: StepBatch, kept: KeptLogprobs | None = None) -> dict[str, float] | None:
    """``updates_per_batch`` passes over the batch, each one optimizer step per mini-batch (TRL's
    PPO epochs × mini-batches). ``kept``: π_old (and the reference's log-probs, V_old) of every row
    where already known (a replayed batch carries its samplers'). Returns the last pass's metrics,
    merged exactly over its mini-batches and every process (align/step_metrics.py), or None when a
    step was skipped."""
    settings, objective = ctx.settings, ctx.objective
    started = time.perf_counter()
    ctx.reference_s.clear()
    ctx.reference_events.clear()
    reads = set(objective.stats_read)
    kept = kept or KeptLogprobs(ref_logprobs=batch.ref_logprobs)
    if "mismatched_logprobs" in objective.needs and kept.mismatched_logprobs is None:  # KTO's KL estimate
        kept = keep_mismatched_logprobs(ctx.models, batch, kept, ctx.accelerator, settings.temperature)
    # π_old for every row before the first step: later mini-batches, or statistics that read it
    if kept.old_logprobs is None and (
        settings.mini_batches > 1 or reads & {"old_logprobs", "ref_logprobs", "old_values"}
    ):
        kept = keep_rollout_logprobs(ctx, batch, kept)
    stats = whole_batch_stats(objective, batch, kept, ctx.accelerator) if reads else None
    last_pass: Sums = {}
    for update in range(settings.updates_per_batch):
        last_pass = {}
        for mini_batch in range(settings.mini_batches):
            rows = mini_batch_rows(batch, settings.mini_batches, mini_batch)
            step = optimizer_step(ctx, batch, kept, stats, rows, update)
            if step is None:
                return None
            add_sums(last_pass, step.sums)
            kept = step.kept
    metrics = finish(last_pass, ctx.accelerator)
    metrics["grad_norm"] = step.grad_norm
    metrics["lr"] = ctx.scheduler.get_last_lr()[0]
    metrics.update(batch.metrics)
    # where the step went (beside generation_s and scoring_s): the reference's forwards, and the rest
    if ctx.reference_events:
        ctx.reference_events[-1][1].synchronize()
    reference = sum(ctx.reference_s) + sum(a.elapsed_time(b) for a, b in ctx.reference_events) / 1000
    metrics["reference_s"] = reference
    metrics["training_s"] = time.perf_counter() - started - reference
    return metrics


@torch.no_grad()
def whole_batch_stats(
    objective: losses.Objective, batch: StepBatch, kept: KeptLogprobs, accelerator
) -> dict[str, Tensor]:
    """The objective's ``batch_stats`` over every scored row of the batch (π_old, the reference and
    V_old as kept before the first step), summed over processes: the same sums on every process,
    whatever the micro-batching."""
    live = torch.cat(batch.micro_batches)
    mask = batch.completion_mask[live].float()

    def rows_of(name: str) -> Tensor | None:
        value = getattr(kept, name)
        if value is not None:
            return value[live]
        # a process whose samples all went unscored kept none: zero rows of it add nothing
        return torch.zeros_like(mask) if name in objective.stats_read and live.numel() == 0 else None

    old = rows_of("old_logprobs")
    full = loss_batch(
        batch,
        logprobs=old if old is not None else torch.zeros_like(mask),
        rows=live,
        mask=mask,
        ref=rows_of("ref_logprobs"),
        old=old,
        old_values=rows_of("old_values"),
    )
    stats = objective.batch_stats(replace(full, **_mismatched(kept, live)))
    if accelerator.num_processes > 1:
        stats = {key: accelerator.reduce(stats[key].contiguous(), reduction="sum") for key in sorted(stats)}
    return stats


def optimizer_step(
    ctx: StepContext,
    batch: StepBatch,
    kept: KeptLogprobs,
    stats: dict[str, Tensor] | None,
    micro_batches: list[Tensor],
    update: int,
) -> StepResult | None:
    """log-probs → objective → backward for each of ``micro_batches`` (one mini-batch), then one
    clipped optimizer step; None when it was skipped (a non-finite loss or gradient). ``update``
    counts the passes over the batch: with one mini-batch the first of several keeps its log-probs
    as π_old (and the reference's, the critic's V_old) for the passes that follow, which read their
    importance ratios against the sampling policy and skip the reference forward."""
    settings, models, objective, accelerator = ctx.settings, ctx.models, ctx.objective, ctx.accelerator
    live = torch.cat(micro_batches)  # every row unless unscored samples were dropped
    units = global_units(objective, batch, live, accelerator)
    sums: Sums = {}
    outputs, finite = [], True
    for i, rows in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # gradients are all-reduced (DDP) / the DeepSpeed engine steps only on the last micro-batch
        accelerator.gradient_state._set_sync_gradients(last)
        with _no_sync_unless(last, accelerator, models.policy, models.critic), _checkpointing(settings, models):
            out = micro_batch_backward(ctx, batch, kept, stats, rows, units)
        # the loss is already normalised by the step's global unit count: processes' losses add up
        add_sums(sums, {"loss": (out.loss, 0.0), **out.metric_sums}, weight=0.0 if out.placeholder else 1.0)
        finite = finite and out.finite
        if not out.placeholder:
            outputs.append(out)
    grad_norm = clip_gradients(models, settings.max_grad_norm, accelerator)
    if not finite or (grad_norm is not None and not math.isfinite(grad_norm)):
        ctx.optimizer.zero_grad(set_to_none=True)
        return None
    width = batch.completion_mask.shape[1]
    policy_lp = [pad_to(out.logprobs, width) for out in outputs]
    ref_lp = [pad_to(out.ref, width) for out in outputs if out.ref is not None]
    if update == 0 and settings.updates_per_batch > 1 and policy_lp and kept.old_logprobs is None:
        kept = first_pass_kept(
            batch, kept, live, policy_lp, ref_lp, [pad_to(o.values, width) for o in outputs if o.values is not None]
        )
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    if policy_lp:  # the step's rows in micro-batch order (``live``)
        old = None if kept.old_logprobs is None else kept.old_logprobs[live]
        ref = torch.cat(ref_lp) if ref_lp else None
        full = loss_batch(batch, logprobs=torch.cat(policy_lp), rows=live, ref=ref, old=old)
    else:  # every sample went unscored: report the names the other processes do, adding nothing
        empty = torch.zeros(0, width, device=batch.completion_mask.device)
        with_ref = kept.ref_logprobs is not None or objective.uses_reference
        full = loss_batch(batch, logprobs=empty, rows=live, ref=empty if with_ref else None)
    if update == settings.updates_per_batch - 1:  # once per batch: a moving baseline absorbs each batch once
        objective.after_step(_gather_batch(full, accelerator) if _stateful(objective) else full)
    add_sums(sums, sequence_sums(full, offline_pairs=batch.pairs is not None or batch.offline))
    return StepResult(sums, grad_norm, kept)


def global_units(objective: losses.Objective, batch: StepBatch, live: Tensor, accelerator) -> float:
    """The units (sequences, pairs or tokens) the step trains on, over every process."""
    whole = live.numel() == batch.completion_ids.shape[0]
    zeros = torch.zeros(len(live), batch.completion_mask.shape[1], device=batch.completion_mask.device)
    full = loss_batch(batch, logprobs=zeros, rows=None if whole else live)
    local = torch.tensor(float(objective.count_units(full)), device=accelerator.device)
    units = float(accelerator.reduce(local, reduction="sum")) if accelerator.num_processes > 1 else float(local)
    return max(units, 1.0)  # a step whose samples all went unscored trains on nothing


@dataclass(frozen=True)
class MicroBatchOutput:
    """What a micro-batch's forward and backward leave for the rest of the step (detached)."""

    loss: float
    metric_sums: dict[str, tuple[float, float]]
    finite: bool
    placeholder: bool  # a micro-batch emptied by unscored samples, run at zero weight
    logprobs: Tensor
    ref: Tensor | None
    values: Tensor | None


def micro_batch_backward(
    ctx: StepContext, batch: StepBatch, kept: KeptLogprobs, stats: dict[str, Tensor] | None, rows: Tensor, units: float
) -> MicroBatchOutput:
    """One micro-batch's log-probs (policy, reference, critic), loss and backward."""
    settings, models, objective, accelerator = ctx.settings, ctx.models, ctx.objective, ctx.accelerator
    # a micro-batch emptied by unscored samples still runs (a sharded forward is collective), at zero weight
    placeholder = rows.numel() == 0
    if placeholder:
        rows = torch.zeros(1, dtype=torch.long, device=rows.device)
    p_ids, p_mask, c_ids, c_mask = micro_inputs(batch, rows)
    width = c_ids.shape[1]
    probs = batch.sampler_probs  # only ever kept for a step of one micro-batch (reuse_sampler_probs)
    logprobs = completion_logprobs(
        models.policy, p_ids, p_mask, c_ids, c_mask, settings.temperature, None if probs is None else probs[:width]
    )
    if kept.ref_logprobs is not None:
        ref = kept.ref_logprobs[rows][:, :width]
    elif objective.uses_reference:
        with torch.no_grad(), timed_reference(ctx) as ref_model:
            ref = completion_logprobs(ref_model, p_ids, p_mask, c_ids, c_mask, settings.temperature)
    else:
        ref = None
    old = None if kept.old_logprobs is None else kept.old_logprobs[rows][:, :width]
    values = old_values = None
    if models.critic is not None:
        values = completion_values(models.critic, p_ids, p_mask, c_ids, c_mask.to(logprobs.dtype))
        old_values = None if kept.old_values is None else kept.old_values[rows][:, :width]
    weights, correction_sums = None, {}
    if settings.correction is not None and batch.sampler_logprobs is not None:
        sampler = batch.sampler_logprobs[rows][:, :width]  # π_old: kept, or these weights' own log-probs
        weights, correction_sums = settings.correction.weights(logprobs if old is None else old, sampler, c_mask)
    micro = loss_batch(
        batch, logprobs, rows=rows, mask=c_mask, ref=ref, old=old, values=values, old_values=old_values, stats=stats
    )
    micro = replace(micro, **_mismatched(kept, rows))
    micro = micro if weights is None else replace(micro, sampler_weights=weights)
    loss, metric_sums = objective.evaluate(micro, num_units=units)
    metric_sums.update(correction_sums)
    if placeholder:
        loss = loss * 0.0
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(logprobs.detach()).all())
    # accelerate (and DeepSpeed) divide by the accumulation count, and DDP averages over processes;
    # our loss is already normalised by the step's global unit count, so undo both
    accelerator.backward(loss * accelerator.num_processes * accelerator.gradient_accumulation_steps)
    return MicroBatchOutput(
        loss=float(loss.detach()),
        metric_sums=metric_sums,
        finite=finite,
        placeholder=placeholder,
        logprobs=logprobs.detach(),
        ref=None if ref is None else ref.detach(),
        values=None if values is None else values.detach(),
    )


def clip_gradients(models: Models, max_grad_norm: float | None, accelerator) -> float | None:
    """The policy's and critic's gradients clipped together (as TRL's PPO does); their norm, or
    None where DeepSpeed clips inside its engine."""
    critic = models.critic
    params = list(models.policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    if max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad.norm() for p in params if p.grad is not None]
        norm = torch.norm(torch.stack(grads)) if grads else None
    return None if norm is None else float(norm)


def first_pass_kept(
    batch: StepBatch,
    kept: KeptLogprobs,
    live: Tensor,
    policy_lp: list[Tensor],
    ref_lp: list[Tensor],
    value_lp: list[Tensor],
) -> KeptLogprobs:
    """π_old, the reference's log-probs and V_old from the first pass's own forwards, for the
    passes that follow (rows in ``live`` order, padded to the batch's width)."""
    rows = batch.completion_mask.shape[0]

    def scatter(parts: list[Tensor]) -> Tensor:
        values = torch.cat(parts)
        out = values.new_zeros(rows, values.shape[1])
        out[live] = values
        return out

    return KeptLogprobs(
        old_logprobs=scatter(policy_lp),
        ref_logprobs=scatter(ref_lp) if ref_lp and kept.ref_logprobs is None else kept.ref_logprobs,
        # V_old: the advantages and value clip of later updates read the rollout's critic
        old_values=scatter(value_lp) if value_lp else kept.old_values,
    )


def mini_batch_rows(batch: StepBatch, mini_batches: int, index: int) -> list[Tensor]:
    """The micro-batches of mini-batch ``index``: the batch's micro-batches in ``mini_batches``
    equal consecutive runs (each one optimizer step of gradient_accumulation_steps micro-batches)."""
    per = len(batch.micro_batches) // mini_batches
    return batch.micro_batches[index * per : (index + 1) * per]


def micro_inputs(batch: StepBatch, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A micro-batch's prompts (re-padded as short as they can be) and completions (cut to its longest)."""
    p_ids, p_mask = trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
    c_ids, c_mask = batch.completion_ids[rows], batch.completion_mask[rows]
    width = max(int(c_mask.sum(-1).max()), 1)
    return p_ids, p_mask, c_ids[:, :width], c_mask[:, :width]


@torch.no_grad()
def keep_rollout_logprobs(ctx: StepContext, batch: StepBatch, kept: KeptLogprobs | None = None) -> KeptLogprobs:
    """π_old, the reference's log-probs and V_old for every row, before the batch's first optimizer
    step: with several mini-batches the later ones are trained after the weights have moved, so
    their ratios must read the policy that sampled (TRL's PPO computes them in its rollout too).
    The same micro-batches, widths and mode as the training forward, so a ratio the first step
    reads is exactly 1. ``kept``: what is known already (a cached reference is not recomputed)."""
    settings, models, objective = ctx.settings, ctx.models, ctx.objective
    kept = kept or KeptLogprobs(ref_logprobs=batch.ref_logprobs)
    n, width = batch.completion_mask.shape
    out: dict[str, Tensor] = {}

    def keep(name: str, rows: Tensor, value: Tensor) -> None:
        if name not in out:
            out[name] = value.new_zeros(n, width)
        out[name][rows, : value.shape[1]] = value

    for rows in batch.micro_batches:
        placeholder = rows.numel() == 0  # a sharded forward is collective: every process runs as many
        p_ids, p_mask, c_ids, c_mask = micro_inputs(batch, rows.new_zeros(1) if placeholder else rows)
        policy_lp = completion_logprobs(models.policy, p_ids, p_mask, c_ids, c_mask, settings.temperature)
        ref_lp = values = None
        if objective.uses_reference and kept.ref_logprobs is None:
            with timed_reference(ctx) as ref_model:
                ref_lp = completion_logprobs(ref_model, p_ids, p_mask, c_ids, c_mask, settings.temperature)
        if models.critic is not None:
            values = completion_values(models.critic, p_ids, p_mask, c_ids, c_mask.to(policy_lp.dtype))
        if placeholder:
            continue
        for name, value in (("old", policy_lp), ("ref", ref_lp), ("values", values)):
            if value is not None:
                keep(name, rows, value)
    if "old" not in out:  # every sample went unscored: the steps train on nothing
        return kept
    return KeptLogprobs(out["old"], out.get("ref", kept.ref_logprobs), out.get("values"))


@contextlib.contextmanager
def timed_reference(ctx: StepContext):
    """The reference model for a forward, its time added to the step's ``reference_s``: the wall
    clock on a CPU, CUDA events on a GPU (the device's time, without waiting for it here)."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with reference_model(ctx.models, ctx.accelerator) as ref_model:
            yield ref_model
        end.record()
        ctx.reference_events.append((start, end))
        return
    started = time.perf_counter()
    with reference_model(ctx.models, ctx.accelerator) as ref_model:
        yield ref_model
    ctx.reference_s.append(time.perf_counter() - started)


def _no_sync_unless(last: bool, accelerator, *models) -> contextlib.AbstractContextManager:
    """Gradients are all-reduced only on a step's last micro-batch, for every trained model."""
    stack = contextlib.ExitStack()
    if not last:
        for model in models:
            if model is not None:
                stack.enter_context(accelerator.no_sync(model))
    return stack


@contextlib.contextmanager
def _checkpointing(settings: StepSettings, models: Models):
    """With gradient checkpointing, the policy and critic in training mode for the step's forward and
    backward (transformers checkpoints a layer only in training mode; dropout is off by p = 0 under
    ``model.disable_dropout``), back in their own mode after (generation needs eval mode: training
    mode with checkpointing turns the KV cache off)."""
    trained = [m for m in (models.policy, models.critic) if m is not None] if settings.gradient_checkpointing else []
    modes = [m.training for m in trained]
    for model in trained:
        model.train()
    try:
        yield
    finally:
        for model, mode in zip(trained, modes):
            model.train(mode)


def _stateful(objective: losses.Objective) -> bool:
    return bool(objective.state_dict())


def loss_batch(
    batch: StepBatch,
    logprobs: Tensor,
    rows: Tensor | None = None,
    mask: Tensor | None = None,
    ref: Tensor | None = None,
    old: Tensor | None = None,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    stats: dict[str, Tensor] | None = None,
) -> LossBatch:
    """The objective's view of ``rows`` of the batch (all rows: None) with these per-token values."""
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])
    pairs = batch.pairs
    if pairs is not None and rows is not None:
        pairs = select_pairs(pairs, rows, batch.completion_ids.shape[0])
    return LossBatch(
        logprobs=logprobs,
        mask=(mask if mask is not None else pick(batch.completion_mask)).to(logprobs.dtype),
        ref_logprobs=ref,
        rewards=None if batch.rewards is None else pick(batch.rewards),
        group=None if batch.group is None else pick(batch.group),
        pairs=pairs,
        demo_rewards=None if batch.demo_rewards is None else pick(batch.demo_rewards),
        old_logprobs=old,
        values=values,
        old_values=old_values,
        stats=stats,
    )


def _mismatched(kept: KeptLogprobs, rows: Tensor) -> dict[str, Tensor]:
    """The kept ℓ(y′|x) of policy and reference of ``rows`` as LossBatch fields (KTO's); {} where none."""
    if kept.mismatched_logprobs is None:
        return {}
    return {
        "mismatched_logprobs": kept.mismatched_logprobs[rows],
        "mismatched_ref_logprobs": kept.mismatched_ref_logprobs[rows],
    }


def _gather_batch(full: LossBatch, accelerator) -> LossBatch:
    """The whole step's batch over all processes, for stateful objectives (REINFORCE's baseline)."""
    if accelerator.num_processes == 1:
        return full

    def gather(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return accelerator.gather(accelerator.pad_across_processes(x, dim=1) if x.dim() == 2 else x)

    return LossBatch(
        logprobs=gather(full.logprobs),
        mask=gather(full.mask),
        ref_logprobs=gather(full.ref_logprobs),
        rewards=gather(full.rewards),
    )
