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
from losses import LossBatch
from losses.base import select_pairs


def train_on_batch(
    recipe: Recipe, models: Models, objective: losses.Objective, batch: StepBatch, optimizer, scheduler, accelerator
) -> dict[str, float] | None:
    """``train.updates_per_batch`` passes over the rollout batch, each one optimizer step per
    mini-batch (``train.mini_batches``; TRL's PPO epochs × mini-batches). Returns the last pass's
    metrics (over its mini-batches, weighted by their scored samples; ``tokens`` summed), or None
    when a step was skipped."""
    mini_batches = recipe.train.mini_batches
    if mini_batches > 1:
        keep_rollout_logprobs(recipe, models, objective, batch, accelerator)
    last_pass: list[dict[str, float]] = []
    for update in range(recipe.train.updates_per_batch):
        last_pass = []
        for mini_batch in range(mini_batches):
            metrics = optimizer_step(
                recipe, models, objective, batch, optimizer, scheduler, accelerator, update, mini_batch
            )
            if metrics is None:
                return None
            last_pass.append(metrics)
    if len(last_pass) == 1:
        return last_pass[0]
    # each mini-batch's means weighted by its scored samples: the whole batch's means (an emptied one counts 0)
    rows = [sum(r.numel() for r in mini_batch_rows(batch, mini_batches, j)) for j in range(mini_batches)]
    merged = {"lr": last_pass[-1]["lr"], "grad_norm": last_pass[-1]["grad_norm"]}
    for key in dict.fromkeys(k for m in last_pass for k in m if k not in merged):
        pairs = [(m[key], n) for m, n in zip(last_pass, rows) if n and m.get(key) is not None]
        if key == "tokens":
            merged[key] = sum(v for v, _ in pairs)
        elif pairs:
            merged[key] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    return merged


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
) -> dict[str, float] | None:
    """logprobs → objective → backward for each micro-batch, then one clipped optimizer step.

    ``update`` counts the passes over this batch (``train.updates_per_batch``) and ``mini_batch``
    which of its ``train.mini_batches`` this step trains on. With one mini-batch, the first pass
    keeps the policy's log-probs as π_old (``batch.old_logprobs``) and the reference's, so later
    passes read their importance ratios against the sampling policy and skip the reference
    forward; with several, ``keep_rollout_logprobs`` has kept them before the first step. Returns
    the step metrics, or None when the step was skipped (non-finite loss or gradient).
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
    totals: dict[str, float] = {}
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
            loss, metrics = objective(micro, num_units=global_units)
            if placeholder:
                loss = loss * 0.0
            loss_value = float(loss.detach())
            if not torch.isfinite(loss) or not torch.isfinite(logprobs.detach()).all():
                finite = False
            # accelerate (and DeepSpeed) divide by the accumulation count; our loss is already
            # normalised by the global unit count, so undo it
            accelerator.backward(loss * scale * accelerator.gradient_accumulation_steps)
        if placeholder:
            continue
        weight = objective.count_units(micro) / max(global_units / accelerator.num_processes, 1)
        for key, value in {"loss": loss_value * scale, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + (value if key == "loss" else value * weight)
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
        full = _loss_batch(batch, logprobs=torch.cat(policy_lp), rows=live, ref=torch.cat(ref_lp) if ref_lp else None)
    if update == updates - 1:  # once per batch: a moving baseline absorbs each batch once
        objective.after_step(_gather_batch(full, accelerator) if _stateful(objective) else full)
    totals["grad_norm"] = grad_norm
    totals["lr"] = scheduler.get_last_lr()[0]
    totals.update(sequence_stats(full, batch))
    return totals


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


def sequence_stats(full: LossBatch, batch: StepBatch) -> dict[str, float]:
    """Reward, KL (k1, k3), entropy proxy and length statistics of the step's sequences."""
    out: dict[str, float] = {}
    lengths = full.mask.sum(-1)
    out["completion_length"] = float(lengths.float().mean())
    out["tokens"] = float(full.mask.sum())
    if full.rewards is not None:
        r = full.rewards if full.rewards.dim() == 1 else full.rewards.sum(-1)
        out["reward_mean"] = float(r.float().mean())
        out["reward_std"] = float(r.float().std()) if r.numel() > 1 else 0.0
    if full.ref_logprobs is not None and batch.pairs is not None:
        # offline rows are not samples of the policy: their log-ratio is not a KL estimate
        out["log_ratio"] = float(((full.logprobs - full.ref_logprobs) * full.mask).sum(-1).mean())
    elif full.ref_logprobs is not None:
        out["kl_k1"] = float(losses.sequence_kl(full.logprobs, full.ref_logprobs, full.mask, "k1").mean())
        out["kl_k3"] = float(losses.sequence_kl(full.logprobs, full.ref_logprobs, full.mask, "k3").mean())
    # −mean log π(y_t) of sampled tokens: a Monte-Carlo estimate of the per-token entropy
    out["entropy"] = float(-(full.logprobs * full.mask).sum() / full.mask.sum().clamp(min=1))
    out.update(batch.metrics)
    return out
