"""The optimizer step: log-probs → objective → backward for each micro-batch, then one clipped step.

Each micro-batch loss is divided by the number of units in the WHOLE step over all processes and
scaled by the process count (DDP averages gradients), so summed micro-batch gradients equal the
full-batch gradient."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

import losses
from align.batches import StepBatch, _trim_left
from align.critic import completion_values
from align.logprobs import completion_logprobs
from align.models import Models, reference_model
from align.recipe import Recipe
from align.step_metrics import Sums, add_sums, finish, sequence_sums
from losses import LossBatch
from losses.base import select_pairs


def train_on_batch(
    recipe: Recipe, models: Models, objective: losses.Objective, batch: StepBatch, optimizer, scheduler, accelerator
) -> dict[str, float] | None:
    """``train.updates_per_batch`` passes over the rollout batch, each one optimizer step per
    mini-batch (``train.mini_batches``; TRL's PPO epochs × mini-batches). Returns the last pass's
    metrics, merged exactly over its mini-batches and every process (align/step_metrics.py), or
    None when a step was skipped."""
    mini_batches = recipe.train.mini_batches
    reads = set(objective.stats_read)
    # π_old for every row before the first step: later mini-batches, or statistics that read it
    # (replayed batches carry their samplers' already)
    if batch.old_logprobs is None and (mini_batches > 1 or reads & {"old_logprobs", "ref_logprobs", "old_values"}):
        keep_rollout_logprobs(recipe, models, objective, batch, accelerator)
    stats = whole_batch_stats(objective, batch, accelerator) if reads else None
    last_pass: Sums = {}
    for update in range(recipe.train.updates_per_batch):
        last_pass = {}
        for mini_batch in range(mini_batches):
            step = optimizer_step(
                recipe, models, objective, batch, optimizer, scheduler, accelerator, update, mini_batch, stats
            )
            if step is None:
                return None
            sums, grad_norm = step
            add_sums(last_pass, sums)
    metrics = finish(last_pass, accelerator)
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = scheduler.get_last_lr()[0]
    metrics.update(batch.metrics)
    return metrics


@torch.no_grad()
def whole_batch_stats(objective: losses.Objective, batch: StepBatch, accelerator) -> dict[str, Tensor]:
    """The objective's ``batch_stats`` over every scored row of the rollout batch (π_old, the
    reference and V_old as kept before the first step), summed over processes: the same sums on
    every process, whatever the micro-batching."""
    live = torch.cat(batch.micro_batches)
    mask = batch.completion_mask[live].float()

    def rows_of(name: str) -> Tensor | None:
        value = getattr(batch, name)
        if value is not None:
            return value[live]
        # a process whose samples all went unscored kept none: zero rows of it add nothing
        return torch.zeros_like(mask) if name in objective.stats_read and live.numel() == 0 else None

    old = rows_of("old_logprobs")
    full = _loss_batch(
        batch,
        logprobs=old if old is not None else torch.zeros_like(mask),
        rows=live,
        mask=mask,
        ref=rows_of("ref_logprobs"),
        old=old,
        old_values=rows_of("old_values"),
    )
    stats = objective.batch_stats(full)
    if accelerator.num_processes > 1:
        stats = {key: accelerator.reduce(stats[key].contiguous(), reduction="sum") for key in sorted(stats)}
    return stats


def optimizer_step(
    recipe: Recipe,
    models: Models,
    objective: losses.Objective,
    batch: StepBatch,
    optimizer,
    scheduler,
    accelerator,
    update: int = 0,
    mini_batch: int = 0,
    stats: dict[str, Tensor] | None = None,
) -> tuple[Sums, float | None] | None:
    """logprobs → objective → backward for each micro-batch, then one clipped optimizer step.

    ``update`` counts the passes over this batch (``train.updates_per_batch``) and ``mini_batch``
    which of its ``train.mini_batches`` this step trains on. With one mini-batch, the first pass
    keeps the policy's log-probs as π_old (``batch.old_logprobs``) and the reference's, so later
    passes read their importance ratios against the sampling policy and skip the reference
    forward; with several, ``keep_rollout_logprobs`` has kept them before the first step. ``stats``:
    the objective's whole-batch statistics (``whole_batch_stats``). Returns this process's metric
    sums (align/step_metrics.py) and the gradient norm, or None when the step was skipped
    (non-finite loss or gradient).
    """
    updates = recipe.train.updates_per_batch
    temperature = recipe.generation.temperature if recipe.objective.online else 1.0
    micro_batches = mini_batch_rows(batch, recipe.train.mini_batches, mini_batch)
    live = torch.cat(micro_batches)  # every row unless unscored samples were dropped
    whole = live.numel() == batch.completion_ids.shape[0]
    width = batch.completion_mask.shape[1]
    zeros = torch.zeros(len(live), width, device=batch.completion_mask.device)
    full = _loss_batch(batch, logprobs=zeros, rows=None if whole else live)
    local_units = torch.tensor(float(objective.count_units(full)), device=accelerator.device)
    global_units = (
        float(accelerator.reduce(local_units, reduction="sum")) if accelerator.num_processes > 1 else float(local_units)
    )
    global_units = max(global_units, 1.0)  # a step whose samples all went unscored trains on nothing
    scale = accelerator.num_processes  # DDP averages gradients over processes; our loss is already global
    sums: Sums = {}
    policy_lp, ref_lp, value_lp = [], [], []
    critic = models.critic
    finite = True
    for i, rows in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # a micro-batch emptied by unscored samples still runs (a sharded forward is collective), at zero weight
        placeholder = rows.numel() == 0
        if placeholder:
            rows = torch.zeros(1, dtype=torch.long, device=rows.device)
        # gradients are all-reduced (DDP) / the DeepSpeed engine steps only on the last micro-batch
        accelerator.gradient_state._set_sync_gradients(last)
        with _no_sync_unless(last, accelerator, models.policy, critic):
            p_ids, p_mask, c_ids, c_mask = micro_inputs(batch, rows)
            width = c_ids.shape[1]
            kept = batch.sampler_probs  # only ever kept for a step of one micro-batch (reuse_sampler_probs)
            logprobs = completion_logprobs(
                models.policy, p_ids, p_mask, c_ids, c_mask, temperature, None if kept is None else kept[:width]
            )
            if batch.ref_logprobs is not None:
                ref = batch.ref_logprobs[rows][:, :width]
            elif objective.uses_reference:
                with torch.no_grad(), reference_model(models, accelerator) as ref_model:
                    ref = completion_logprobs(ref_model, p_ids, p_mask, c_ids, c_mask, temperature)
            else:
                ref = None
            old = None if batch.old_logprobs is None else batch.old_logprobs[rows][:, :width]
            values = old_values = None
            if critic is not None:
                values = completion_values(critic, p_ids, p_mask, c_ids, c_mask.to(logprobs.dtype))
                old_values = None if batch.old_values is None else batch.old_values[rows][:, :width]
            micro = _loss_batch(
                batch, logprobs=logprobs, rows=rows, mask=c_mask, ref=ref, old=old, values=values, old_values=old_values
            )
            micro.stats = stats
            loss, metric_sums = objective.evaluate(micro, num_units=global_units)
            if placeholder:
                loss = loss * 0.0
            loss_value = float(loss.detach())
            if not torch.isfinite(loss) or not torch.isfinite(logprobs.detach()).all():
                finite = False
            # accelerate (and DeepSpeed) divide by the accumulation count; our loss is already
            # normalised by the global unit count, so undo it
            accelerator.backward(loss * scale * accelerator.gradient_accumulation_steps)
        # the loss is already normalised by the step's global unit count: processes' losses add up
        add_sums(sums, {"loss": (loss_value, 0.0), **metric_sums}, weight=0.0 if placeholder else 1.0)
        if placeholder:
            continue
        policy_lp.append(_pad_to(logprobs.detach(), batch.completion_mask.shape[1]))
        if ref is not None:
            ref_lp.append(_pad_to(ref.detach(), batch.completion_mask.shape[1]))
        if values is not None:
            value_lp.append(_pad_to(values.detach(), batch.completion_mask.shape[1]))
    batch.sampler_probs = None  # the backward has consumed it in place
    params = list(models.policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    if recipe.train.max_grad_norm is not None:  # policy and critic clipped together, as TRL's PPO does
        norm = accelerator.clip_grad_norm_(params, recipe.train.max_grad_norm)
    else:
        grads = [p.grad.norm() for p in params if p.grad is not None]
        norm = torch.norm(torch.stack(grads)) if grads else None
    grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
    if not finite or (grad_norm is not None and not math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    # π_old and the reference, for the passes that follow (kept already with several mini-batches)
    if update == 0 and updates > 1 and policy_lp and batch.old_logprobs is None:
        kept = torch.cat(policy_lp)  # rows in ``live`` order, padded to the batch's width
        batch.old_logprobs = kept.new_zeros(batch.completion_mask.shape[0], kept.shape[1])
        batch.old_logprobs[live] = kept
        if ref_lp and batch.ref_logprobs is None:
            batch.ref_logprobs = torch.zeros_like(batch.old_logprobs)
            batch.ref_logprobs[live] = torch.cat(ref_lp)
        if value_lp:  # V_old: the advantages and value clip of later updates read the rollout's critic
            batch.old_values = torch.zeros_like(batch.old_logprobs)
            batch.old_values[live] = torch.cat(value_lp)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if policy_lp:  # the step's rows in micro-batch order (``live``)
        old = None if batch.old_logprobs is None else batch.old_logprobs[live]
        full = _loss_batch(
            batch, logprobs=torch.cat(policy_lp), rows=live, ref=torch.cat(ref_lp) if ref_lp else None, old=old
        )
    else:  # every sample went unscored: report the names the other processes do, adding nothing
        empty = torch.zeros(0, batch.completion_mask.shape[1], device=batch.completion_mask.device)
        with_ref = batch.ref_logprobs is not None or objective.uses_reference
        full = _loss_batch(batch, logprobs=empty, rows=live, ref=empty if with_ref else None)
    if update == updates - 1:  # once per batch: a moving baseline absorbs each batch once
        objective.after_step(_gather_batch(full, accelerator) if _stateful(objective) else full)
    add_sums(sums, sequence_sums(full, offline_pairs=batch.pairs is not None))
    return sums, grad_norm


def mini_batch_rows(batch: StepBatch, mini_batches: int, index: int) -> list[Tensor]:
    """The micro-batches of mini-batch ``index``: the batch's micro-batches in ``mini_batches``
    equal consecutive runs (each one optimizer step of gradient_accumulation_steps micro-batches)."""
    per = len(batch.micro_batches) // mini_batches
    return batch.micro_batches[index * per : (index + 1) * per]


def micro_inputs(batch: StepBatch, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A micro-batch's prompts (re-padded as short as they can be) and completions (cut to its longest)."""
    p_ids, p_mask = _trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
    c_ids, c_mask = batch.completion_ids[rows], batch.completion_mask[rows]
    width = max(int(c_mask.sum(-1).max()), 1)
    return p_ids, p_mask, c_ids[:, :width], c_mask[:, :width]


@torch.no_grad()
def keep_rollout_logprobs(
    recipe: Recipe, models: Models, objective: losses.Objective, batch: StepBatch, accelerator
) -> None:
    """π_old, the reference's log-probs and V_old for every row, before the batch's first optimizer
    step: with several mini-batches the later ones are trained after the weights have moved, so
    their ratios must read the policy that sampled (TRL's PPO computes them in its rollout too).
    The same micro-batches, widths and mode as the training forward, so a ratio the first step
    reads is exactly 1."""
    temperature = recipe.generation.temperature
    n, width = batch.completion_mask.shape
    kept: dict[str, Tensor] = {}

    def keep(name: str, rows: Tensor, value: Tensor) -> None:
        if name not in kept:
            kept[name] = value.new_zeros(n, width)
        kept[name][rows, : value.shape[1]] = value

    for rows in batch.micro_batches:
        placeholder = rows.numel() == 0  # a sharded forward is collective: every process runs as many
        p_ids, p_mask, c_ids, c_mask = micro_inputs(batch, rows.new_zeros(1) if placeholder else rows)
        policy_lp = completion_logprobs(models.policy, p_ids, p_mask, c_ids, c_mask, temperature)
        ref_lp = values = None
        if objective.uses_reference and batch.ref_logprobs is None:
            with reference_model(models, accelerator) as ref_model:
                ref_lp = completion_logprobs(ref_model, p_ids, p_mask, c_ids, c_mask, temperature)
        if models.critic is not None:
            values = completion_values(models.critic, p_ids, p_mask, c_ids, c_mask.to(policy_lp.dtype))
        if placeholder:
            continue
        for name, value in (("old", policy_lp), ("ref", ref_lp), ("values", values)):
            if value is not None:
                keep(name, rows, value)
    if "old" not in kept:  # every sample went unscored: the steps train on nothing
        return
    batch.old_logprobs = kept["old"]
    batch.ref_logprobs = kept.get("ref", batch.ref_logprobs)
    batch.old_values = kept.get("values")


def _no_sync_unless(last: bool, accelerator, *models) -> contextlib.AbstractContextManager:
    """Gradients are all-reduced only on a step's last micro-batch, for every trained model."""
    stack = contextlib.ExitStack()
    if not last:
        for model in models:
            if model is not None:
                stack.enter_context(accelerator.no_sync(model))
    return stack


def _stateful(objective: losses.Objective) -> bool:
    return bool(objective.state_dict())


def _pad_to(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _loss_batch(
    batch: StepBatch,
    logprobs: Tensor,
    rows: Tensor | None = None,
    mask: Tensor | None = None,
    ref: Tensor | None = None,
    old: Tensor | None = None,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
) -> LossBatch:
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
    )


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
