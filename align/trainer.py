"""The shared trainer: one readable loop for online and offline objectives.

    for step:  batch = rollout_batch(...) | offline_batch(...)   # prompts -> k completions -> rewards
               optimizer_step(...)                                # logprobs -> objective -> backward -> step
               log_step(...); maybe save_checkpoint(...)

Loss normalisation follows losses/base.py: each micro-batch loss is divided by the number of
units (sequences, pairs or tokens) in the WHOLE optimizer step over all processes, and scaled
by the number of processes because DDP averages gradients. Summed micro-batch gradients then
equal the full-batch gradient: batch 8 × accumulation 1 = batch 1 × accumulation 8 = 2
processes × batch 4.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import losses
from align import data as data_lib
from align.allocator import tune_allocator
from align.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from align.config import dump_recipe
from align.logging import MetricsLog, postfix, progress_bar
from align.logprobs import completion_logprobs, fused_head_weight
from align.models import Models, check_positions, load_models, load_tokenizer, reference_model
from align.recipe import Recipe
from align.resume_check import check_resume, record_changes
from align.rewards_adapter import RewardFunction, build_reward
from align.rollout import Rollout, decode_completions, generate_with, sample_keys
from align.rundir import claim_run_dir
from losses import LossBatch


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, ...); the message says why."""


# --------------------------------------------------------------------------------------------
# batches


@dataclass
class StepBatch:
    """Everything one optimizer step trains on, for this process, split into micro-batches later."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    micro_batches: list[Tensor]  # row indices of each micro-batch (whole groups / pairs)
    rewards: Tensor | None = None  # [B] or [B, C]
    group: Tensor | None = None
    pairs: Tensor | None = None
    demo_rewards: Tensor | None = None
    ref_logprobs: Tensor | None = None  # precomputed (offline cache)
    sampler_probs: Tensor | None = None  # [T, B, V] the rollout's softmax, for the policy's log-probs
    texts: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class OnlineData:
    """Prompts (plus the columns rewards read) for objectives trained on fresh samples."""

    def __init__(self, recipe: Recipe, tokenizer):
        cfg = recipe.data
        table = data_lib.load_table(cfg.train, cfg.split, cfg.subset)
        first = [] if cfg.prompt_template else [cfg.prompt_column]
        wanted = first + [c for c in table.column_names if c not in first]
        self.columns = data_lib.read_columns(cfg.train, table, wanted, non_empty=first)
        self.prompts, self.prompt_ids = data_lib.prompt_rows(tokenizer, self.columns, cfg, cfg.train)
        self.columns.pop(cfg.prompt_column, None)
        if recipe.objective.name == "rcfd" and cfg.demonstration_column not in self.columns:
            raise data_lib.DataError(
                f"data {cfg.train!r}: missing column {cfg.demonstration_column!r} (rcfd demonstrations)"
            )

    def __len__(self) -> int:
        return len(self.prompts)


class OfflineData:
    """Pairs (prompt, chosen, rejected) for dpo/ipo/copg, or (prompt, completion) rows for sft."""

    def __init__(self, recipe: Recipe, tokenizer, eos_token_id: int | None):
        cfg = recipe.data
        self.paired = losses.REGISTRY[recipe.objective.name].paired
        table = data_lib.load_table(cfg.train, cfg.split, cfg.subset)
        texts = [cfg.chosen_column, cfg.rejected_column] if self.paired else [cfg.completion_column]
        if self.paired and cfg.chosen_column not in table.column_names and cfg.reward_column in table.column_names:
            # (prompt, completion, reward) rows: every two completions of a prompt form a pair; an
            # objective that does not read rewards (DPO, IPO) learns only from each pair's order
            ordered = "rewards" not in losses.REGISTRY[recipe.objective.name].needs
            table, ties = data_lib.rows_to_pairs(
                table, cfg.prompt_column, cfg.completion_column, cfg.reward_column, ordered=ordered
            )
            if ties:
                print(f"data {cfg.train!r}: {ties} pair(s) with equal rewards dropped (no preference to learn)")
            texts = ["chosen", "rejected"]
        reward_cols = [c for c in ("chosen_reward", "rejected_reward") if c in table.column_names]
        prompt_cols = (
            [cfg.prompt_column]
            if not cfg.prompt_template
            else [c for c in table.column_names if c not in texts + reward_cols]
        )
        columns = data_lib.read_columns(
            cfg.train,
            table,
            [*prompt_cols, *texts, *reward_cols],
            non_empty=[*prompt_cols[:1], *texts] if not cfg.prompt_template else texts,
        )
        self.prompts, self.prompt_ids = data_lib.prompt_rows(
            tokenizer, {c: columns[c] for c in prompt_cols}, cfg, cfg.train
        )
        self.completion_texts = [[data_lib.message_text(v) for v in columns[c]] for c in texts]
        self.completion_ids = [
            data_lib.encode_completions(tokenizer, col, cfg.max_completion_tokens, eos_token_id)
            for col in self.completion_texts
        ]
        self.pair_rewards = [columns[c] for c in reward_cols] if len(reward_cols) == 2 else None
        self.ref_cache: list[Tensor] | None = None  # per dataset row: [n_texts, T] reference log-probs

    def __len__(self) -> int:
        return len(self.prompts)


def split_micro_batches(n_units: int, rows_per_unit: int, units_per_micro: int, layout: str) -> list[Tensor]:
    """Row indices of each micro-batch. layout 'grouped': unit u owns rows u·r … u·r+r−1;
    'paired': unit u owns rows u and n_units+u (chosen block, then rejected block)."""
    out = []
    for start in range(0, n_units, units_per_micro):
        units = torch.arange(start, min(start + units_per_micro, n_units))
        if layout == "paired":
            out.append(torch.cat([units, units + n_units]))
        else:
            out.append((units[:, None] * rows_per_unit + torch.arange(rows_per_unit)).reshape(-1))
    return out


def local_rows(recipe: Recipe, n_rows: int, step: int, accelerator) -> list[int]:
    per_process = recipe.train.batch_size * recipe.train.gradient_accumulation_steps
    rows = data_lib.step_rows(n_rows, step, per_process * accelerator.num_processes, recipe.train.seed)
    return rows[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]


def rollout_batch(
    recipe: Recipe, models: Models, dataset: OnlineData, reward: RewardFunction, step: int, accelerator
) -> StepBatch:
    """prompts → k completions each (KV cache, left padding) → rewards."""
    gen, k = recipe.generation, recipe.objective.k
    rows = local_rows(recipe, len(dataset), step, accelerator)
    prompt_ids, prompt_mask = data_lib.pad(
        [dataset.prompt_ids[i] for i in rows], models.pad_token_id, "left", accelerator.device
    )
    keys = sample_keys(recipe.train.seed, step, torch.tensor(rows), k)
    chunk = gen.batch_size or len(rows)
    policy = accelerator.unwrap_model(models.policy)
    keep_probs = reuse_sampler_probs(recipe, models, n_chunks=-(-len(rows) // chunk), rows=len(rows) * k)
    parts: list[Rollout] = []
    start = time.perf_counter()
    for lo in range(0, len(rows), chunk):
        sel = slice(lo, lo + chunk)
        # re-pad the chunk so its prompts are as short as they can be
        ids, mask = _trim_left(prompt_ids[sel], prompt_mask[sel])
        parts.append(generate_with(policy, ids, mask, keys[lo * k : (lo + chunk) * k], k, gen, models, keep_probs))
    rollout = _concat_rollouts(parts, models.pad_token_id)
    texts = decode_completions(rollout, models.tokenizer, gen.stop_strings, models.pad_token_id)
    generation_seconds = time.perf_counter() - start
    prompts = [dataset.prompts[i] for i in rows for _ in range(k)]
    columns = {name: [values[i] for i in rows for _ in range(k)] for name, values in dataset.columns.items()}
    rewards, components = reward.score(prompts, texts, columns, gather=_all_ranks(accelerator))
    batch = StepBatch(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        micro_batches=split_micro_batches(len(rows), k, recipe.train.batch_size, "grouped"),
        rewards=rewards.to(accelerator.device),
        group=torch.arange(len(rows), device=accelerator.device).repeat_interleave(k),
        texts=texts,
        prompts=prompts,
        metrics={f"reward/{n}": float(torch.tensor(v, dtype=torch.float64).mean()) for n, v in components.items()},
        sampler_probs=rollout.probs,
    )
    batch.metrics["generation_s"] = generation_seconds
    if recipe.objective.name == "rcfd":
        demos = columns[recipe.data.demonstration_column]
        batch.demo_rewards = reward.calibrate(reward.score_demonstrations(prompts, demos, columns))
        batch.demo_rewards = batch.demo_rewards.to(accelerator.device)
        batch.rewards = reward.calibrate(reward.last_components_tensor()).to(accelerator.device)
    return batch


def _all_ranks(accelerator) -> Callable[[list[float]], list[float]] | None:
    """Every process's list, concatenated in rank order (None on one process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return lambda values: [v for part in gather_object([list(values)]) for v in part]


CALIBRATION_ROWS = 1024  # demonstrations scored up front for RCfD's per-component moments


def fit_demo_calibration(reward: RewardFunction, dataset: OnlineData, column: str) -> None:
    """Score up to CALIBRATION_ROWS demonstrations, evenly spaced over the data set, once: the
    same rows on every process and on resume, so the calibration never changes a trajectory."""
    n = len(dataset)
    rows = sorted({i * n // min(n, CALIBRATION_ROWS) for i in range(min(n, CALIBRATION_ROWS))})
    columns = {name: [values[i] for i in rows] for name, values in dataset.columns.items()}
    reward.fit_calibration([dataset.prompts[i] for i in rows], columns[column], columns)


KEEP_PROBS_MAX_BYTES = 1 << 30  # the kept softmax is sized for max_new_tokens: at most 1 GiB of it


def reuse_sampler_probs(recipe: Recipe, models: Models, n_chunks: int, rows: int) -> bool:
    """Whether the rollout keeps its softmax for the policy's log-probs (its training forward then
    skips the LM head's matmul and softmax): the same weights see the same tokens in the same
    mode -- no dropout (``disable_dropout``, the policy in eval mode), one optimizer step per
    rollout (the online objectives) -- and the step is one generation call of ``rows`` sequences
    and one micro-batch (no gradient accumulation), so the buffer replaces the one the training
    forward would hold. It is allocated for ``max_new_tokens`` before the lengths are known, so
    beyond ``KEEP_PROBS_MAX_BYTES`` the training forward computes the softmax itself instead."""
    weight = fused_head_weight(models.policy)
    return (
        recipe.objective.online
        and n_chunks == 1
        and recipe.train.gradient_accumulation_steps == 1
        and not models.policy.training
        and weight is not None
        and recipe.generation.max_new_tokens * rows * weight.shape[0] * 4 <= KEEP_PROBS_MAX_BYTES
    )


def _trim_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    keep = int(mask.sum(-1).max())
    return ids[:, ids.shape[1] - keep :], mask[:, mask.shape[1] - keep :]


def _concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def left(x: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=value)

    def right(x: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    return Rollout(
        prompt_ids=torch.cat([left(p.prompt_ids, pad_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids, pad_id) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask, 0) for p in parts]),
    )


def offline_batch(
    recipe: Recipe, models: Models, dataset: OfflineData, reward: RewardFunction | None, step: int, accelerator
) -> StepBatch:
    """A step's pairs (chosen block, then rejected block: one forward for both) or SFT rows."""
    rows = local_rows(recipe, len(dataset), step, accelerator)
    n_texts = len(dataset.completion_ids)
    prompt_rows = [dataset.prompt_ids[i] for _ in range(n_texts) for i in rows]
    completion_rows = [dataset.completion_ids[t][i] for t in range(n_texts) for i in rows]
    prompt_ids, prompt_mask = data_lib.pad(prompt_rows, models.pad_token_id, "left", accelerator.device)
    completion_ids, completion_mask = data_lib.pad(completion_rows, models.pad_token_id, "right", accelerator.device)
    batch = StepBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        micro_batches=split_micro_batches(
            len(rows), 1, recipe.train.batch_size, "paired" if dataset.paired else "grouped"
        ),
        prompts=[dataset.prompts[i] for _ in range(n_texts) for i in rows],
    )
    if dataset.paired:
        n = len(rows)
        batch.pairs = torch.stack([torch.arange(n), torch.arange(n) + n], 1).to(accelerator.device)
        if recipe.objective.name == "copg":
            batch.rewards = pair_rewards(recipe, dataset, reward, rows, _all_ranks(accelerator)).to(accelerator.device)
    if dataset.ref_cache is not None:
        T = completion_ids.shape[1]
        cached = [dataset.ref_cache[i][t] for t in range(n_texts) for i in rows]
        batch.ref_logprobs = torch.stack([torch.nn.functional.pad(c, (0, T - c.shape[0]))[:T] for c in cached]).to(
            accelerator.device
        )
    return batch


def pair_rewards(
    recipe: Recipe, dataset: OfflineData, reward: RewardFunction | None, rows: list[int], gather=None
) -> Tensor:
    """Offline CoPG rewards: the pair file's chosen_reward/rejected_reward columns, else the
    recipe's reward on the texts, else ½ for chosen and 0 for rejected: with a reward gap of ½,
    CoPG's minimiser is IPO's at the same β, and its loss is β/2 times IPO's."""
    if dataset.pair_rewards is not None:
        return torch.tensor([dataset.pair_rewards[t][i] for t in range(2) for i in rows], dtype=torch.float32)
    if reward is not None:
        prompts = [dataset.prompts[i] for _ in range(2) for i in rows]
        texts = [dataset.completion_texts[t][i] for t in range(2) for i in rows]
        return reward.score(prompts, texts, {}, gather=gather)[0]
    return torch.cat([torch.full((len(rows),), 0.5), torch.zeros(len(rows))])


@torch.no_grad()
def cache_reference_logprobs(recipe: Recipe, models: Models, dataset: OfflineData, accelerator) -> None:
    """Offline data: reference log-probs computed once per row, in canonical chunks (dataset order,
    ``batch_size`` rows) so the values do not depend on step, resume or process count."""
    n, chunk = len(dataset), recipe.train.batch_size
    starts = list(range(0, n, chunk))[accelerator.process_index :: accelerator.num_processes]
    n_texts = len(dataset.completion_ids)
    local: dict[int, list[Tensor]] = {}
    with reference_model(models, accelerator) as ref:
        for lo in starts:
            rows = list(range(lo, min(lo + chunk, n)))
            p_ids, p_mask = data_lib.pad(
                [dataset.prompt_ids[i] for _ in range(n_texts) for i in rows],
                models.pad_token_id,
                "left",
                accelerator.device,
            )
            c_ids, c_mask = data_lib.pad(
                [dataset.completion_ids[t][i] for t in range(n_texts) for i in rows],
                models.pad_token_id,
                "right",
                accelerator.device,
            )
            lp = completion_logprobs(ref, p_ids, p_mask, c_ids, c_mask).cpu()
            for j, i in enumerate(rows):
                local[i] = [lp[t * len(rows) + j, : len(dataset.completion_ids[t][i])] for t in range(n_texts)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        merged: dict[int, list[Tensor]] = {}
        for part in gather_object([local]):
            merged.update(part)
        local = merged
    dataset.ref_cache = [_stack_ragged(local[i]) for i in range(n)]


def _stack_ragged(parts: list[Tensor]) -> Tensor:
    T = max(p.shape[0] for p in parts)
    return torch.stack([torch.nn.functional.pad(p, (0, T - p.shape[0])) for p in parts])


# --------------------------------------------------------------------------------------------
# the optimizer step


def optimizer_step(
    recipe: Recipe, models: Models, objective: losses.Objective, batch: StepBatch, optimizer, scheduler, accelerator
) -> dict[str, float] | None:
    """logprobs → objective → backward for each micro-batch, then one clipped optimizer step.

    Returns the step metrics, or None when the step was skipped (non-finite loss or gradient).
    """
    temperature = recipe.generation.temperature if recipe.objective.online else 1.0
    full = _loss_batch(batch, logprobs=torch.zeros_like(batch.completion_mask, dtype=torch.float32))
    local_units = torch.tensor(float(objective.count_units(full)), device=accelerator.device)
    global_units = (
        float(accelerator.reduce(local_units, reduction="sum")) if accelerator.num_processes > 1 else float(local_units)
    )
    scale = accelerator.num_processes  # DDP averages gradients over processes; our loss is already global
    totals: dict[str, float] = {}
    policy_lp, ref_lp = [], []
    finite = True
    for i, rows in enumerate(batch.micro_batches):
        last = i == len(batch.micro_batches) - 1
        # gradients are all-reduced (DDP) / the DeepSpeed engine steps only on the last micro-batch
        accelerator.gradient_state._set_sync_gradients(last)
        sync = contextlib.nullcontext() if last else accelerator.no_sync(models.policy)
        with sync:
            p_ids, p_mask = _trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
            c_ids, c_mask = batch.completion_ids[rows], batch.completion_mask[rows]
            width = max(int(c_mask.sum(-1).max()), 1)
            c_ids, c_mask = c_ids[:, :width], c_mask[:, :width]
            kept = batch.sampler_probs  # only ever kept for a step of one micro-batch (reuse_sampler_probs)
            logprobs = completion_logprobs(
                models.policy, p_ids, p_mask, c_ids, c_mask, temperature, None if kept is None else kept[:width]
            )
            if batch.ref_logprobs is not None:
                ref = batch.ref_logprobs[rows][:, :width]
            elif objective.name != "sft":
                with torch.no_grad(), reference_model(models, accelerator) as ref_model:
                    ref = completion_logprobs(ref_model, p_ids, p_mask, c_ids, c_mask, temperature)
            else:
                ref = None
            micro = _loss_batch(batch, logprobs=logprobs, rows=rows, mask=c_mask, ref=ref)
            loss, metrics = objective(micro, num_units=global_units)
            loss_value = float(loss.detach())
            if not torch.isfinite(loss) or not torch.isfinite(logprobs.detach()).all():
                finite = False
            # accelerate (and DeepSpeed) divide by the accumulation count; our loss is already
            # normalised by the global unit count, so undo it
            accelerator.backward(loss * scale * accelerator.gradient_accumulation_steps)
        weight = objective.count_units(micro) / max(global_units / accelerator.num_processes, 1)
        for key, value in {"loss": loss_value * scale, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + (value if key == "loss" else value * weight)
        policy_lp.append(_pad_to(logprobs.detach(), batch.completion_mask.shape[1]))
        if ref is not None:
            ref_lp.append(_pad_to(ref.detach(), batch.completion_mask.shape[1]))
    batch.sampler_probs = None  # the backward has consumed it in place
    if recipe.train.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(models.policy.parameters(), recipe.train.max_grad_norm)
    else:
        grads = [p.grad.norm() for p in models.policy.parameters() if p.grad is not None]
        norm = torch.norm(torch.stack(grads)) if grads else None
    grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
    if not finite or (grad_norm is not None and not math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    order = torch.cat(batch.micro_batches)
    full = _loss_batch(
        batch,
        logprobs=torch.cat(policy_lp)[_inverse(order)],
        ref=torch.cat(ref_lp)[_inverse(order)] if ref_lp else None,
    )
    objective.after_step(_gather_batch(full, accelerator) if _stateful(objective) else full)
    totals["grad_norm"] = grad_norm
    totals["lr"] = scheduler.get_last_lr()[0]
    totals.update(sequence_stats(full, batch))
    return totals


def _stateful(objective: losses.Objective) -> bool:
    return bool(objective.state_dict())


def _inverse(order: Tensor) -> Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    return inv


def _pad_to(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _loss_batch(
    batch: StepBatch,
    logprobs: Tensor,
    rows: Tensor | None = None,
    mask: Tensor | None = None,
    ref: Tensor | None = None,
) -> LossBatch:
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])
    pairs = batch.pairs
    if pairs is not None and rows is not None:
        where = torch.full((batch.completion_ids.shape[0],), -1, dtype=torch.long, device=pairs.device)
        where[rows] = torch.arange(len(rows), device=pairs.device)
        mapped = where[pairs]
        pairs = mapped[(mapped >= 0).all(1)]
    return LossBatch(
        logprobs=logprobs,
        mask=(mask if mask is not None else pick(batch.completion_mask)).to(logprobs.dtype),
        ref_logprobs=ref,
        rewards=None if batch.rewards is None else pick(batch.rewards),
        group=None if batch.group is None else pick(batch.group),
        pairs=pairs,
        demo_rewards=None if batch.demo_rewards is None else pick(batch.demo_rewards),
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


# --------------------------------------------------------------------------------------------
# the run


class StopSignal:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _fused_optimizer_ok(params: list[Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all parameters, ~2.5× faster than the per-tensor
    default on CPU) where every parameter is a floating tensor on a device it supports."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def make_accelerator(recipe: Recipe):
    """Accelerate picks the backend from the launch config (CPU, DDP, DeepSpeed, FSDP).

    It is told the number of micro-batches per step so DeepSpeed's engine steps on the last one.
    """
    from accelerate import Accelerator

    return Accelerator(gradient_accumulation_steps=recipe.train.gradient_accumulation_steps)


def train(recipe: Recipe, accelerator=None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run a recipe to the end (or to a signal); returns the summary written to summary.json.

    ``on_step(step, record)`` is called after each logged step (evaluation hooks, tests).
    """
    from accelerate.utils import set_seed

    tune_allocator()  # reuse the step's large buffers instead of page-faulting them in every step
    if recipe.prepare == "quickstart":
        from align.quickstart_pipeline import prepare_quickstart

        prepare_quickstart(recipe)
    elif recipe.prepare == "summarize":
        from align.summarize import prepare_summarize

        prepare_summarize(recipe)
    accelerator = accelerator or make_accelerator(recipe)
    set_seed(recipe.train.seed)
    run_dir = Path(recipe.output.dir)
    resume_from = resolve_resume(recipe.resume, run_dir)
    lock = claim_run_dir(run_dir, recipe.resume is not None, recipe.output.overwrite, accelerator)
    try:
        changes = check_resume(recipe, resume_from) if resume_from is not None else {}
        return _run(recipe, accelerator, on_step, run_dir, resume_from, changes)
    finally:
        lock.release()


def _run(recipe: Recipe, accelerator, on_step, run_dir: Path, resume_from: Path | None, changes: dict) -> dict:
    from transformers import get_scheduler

    online = recipe.objective.online
    objective = recipe.build_objective()
    # data and prompt budgets are checked with the tokenizer and config alone: a bad row or an
    # over-long prompt fails in seconds, before any weights (policy, reference, reward) load
    tokenizer = load_tokenizer(recipe)
    if online:
        dataset = OnlineData(recipe, tokenizer)
    else:
        dataset = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    check_positions(recipe, dataset)
    reward = build_reward(recipe.reward, accelerator.device) if recipe.reward else None
    if online and recipe.objective.name == "rcfd":
        fit_demo_calibration(reward, dataset, recipe.data.demonstration_column)
    models = load_models(recipe, accelerator.device, need_reference=objective.name != "sft", tokenizer=tokenizer)
    trainable = [p for p in models.policy.parameters() if p.requires_grad]
    if recipe.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            trainable,
            lr=recipe.train.lr,
            betas=recipe.train.adam_betas,
            weight_decay=recipe.train.weight_decay,
            fused=_fused_optimizer_ok(trainable),
        )
    scheduler = get_scheduler(
        recipe.train.lr_scheduler,
        optimizer,
        num_warmup_steps=recipe.train.warmup_steps,
        num_training_steps=recipe.train.steps,
    )
    models.policy, optimizer = accelerator.prepare(models.policy, optimizer)
    # not prepared: accelerate's scheduler wrapper steps once per process, which would make the
    # schedule depend on the process count; its state goes into trainer_state.pt (plain types,
    # loaded with weights_only=True) rather than accelerate's pickle of custom objects
    step, bad_steps = 0, 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        step, bad_steps = state["step"], state["bad_steps"]
        scheduler.load_state_dict(state["scheduler"])
        if "train.lr" in changes:  # applied from this step on, not silently replaced by the saved one
            scheduler.base_lrs = [recipe.train.lr for _ in scheduler.base_lrs]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        objective.load_state_dict(state["objective"])
        if reward is not None:
            reward.load_state_dict(state.get("reward", {}))
    if not online and objective.name != "sft":
        cache_reference_logprobs(recipe, models, dataset, accelerator)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None or not (run_dir / "recipe.yaml").exists():
            dump_recipe(recipe, run_dir / "recipe.yaml")  # what the run started with; changes go to the history
        record_changes(run_dir, step, changes)
    log = MetricsLog(
        run_dir,
        step,
        accelerator.is_main_process,
        recipe.output.report_to,
        recipe.model_dump(mode="json"),
        recipe.output.wandb_project,
    )
    bar = progress_bar(recipe.train.steps, step, accelerator.is_main_process, f"{objective.name}")
    stopped_by = None
    models.policy.train(not recipe.model.disable_dropout)

    def trainer_state() -> dict:
        return {
            "step": step,
            "bad_steps": bad_steps,
            "scheduler": scheduler.state_dict(),
            "recipe": json.dumps(recipe.model_dump(mode="json")),  # checked on resume
            "objective": objective.state_dict(),
            "reward": reward.state_dict() if reward is not None else {},
        }

    with StopSignal() as stop:
        while step < recipe.train.steps:
            started = time.perf_counter()
            if online:
                batch = rollout_batch(recipe, models, dataset, reward, step, accelerator)
            else:
                batch = offline_batch(recipe, models, dataset, reward, step, accelerator)
            metrics = optimizer_step(recipe, models, objective, batch, optimizer, scheduler, accelerator)
            step += 1
            if metrics is None:
                bad_steps += 1
                if accelerator.is_main_process:
                    bar.write(f"step {step}: non-finite loss, log-probs or gradient; step skipped ({bad_steps} so far)")
                metrics = {"skipped": 1.0}
            seconds = time.perf_counter() - started
            record = log_step(recipe, step, metrics, batch, seconds, bad_steps)
            log.log(record)
            if bad_steps > recipe.train.max_bad_steps:
                # the step that ends the run is logged and checkpointed, so it can be inspected and resumed
                log.close()
                bar.close()
                saved = save_checkpoint(
                    accelerator, models.policy, models.tokenizer, trainer_state(), run_dir, recipe.output.keep_last
                )
                raise TrainingError(
                    f"{bad_steps} steps skipped for non-finite values (train.max_bad_steps="
                    f"{recipe.train.max_bad_steps}); lower train.lr or check the reward; last checkpoint {saved}"
                )
            bar.update(1)
            bar.set_postfix(postfix(record), refresh=False)
            if on_step is not None:
                on_step(step, record)
            if stop.received is not None:
                stopped_by = signal.Signals(stop.received).name
                break
            if recipe.output.save_every and step % recipe.output.save_every == 0 and step < recipe.train.steps:
                save_checkpoint(
                    accelerator, models.policy, models.tokenizer, trainer_state(), run_dir, recipe.output.keep_last
                )
    bar.close()
    log.close()
    checkpoint = save_checkpoint(
        accelerator, models.policy, models.tokenizer, trainer_state(), run_dir, recipe.output.keep_last
    )
    summary = {"steps": step, "skipped_steps": bad_steps, "stopped_by": stopped_by, "checkpoint": str(checkpoint)}
    if stopped_by is None and recipe.output.save_model:
        final = run_dir / "final"
        unwrapped = accelerator.unwrap_model(models.policy)
        if accelerator.is_main_process:
            import shutil

            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(checkpoint / "model", final)
        summary["final_model"] = str(final)
        del unwrapped
    if stopped_by is None and recipe.output.report and accelerator.is_main_process:
        from align.report import write_report

        summary.update(write_report(recipe, models, dataset if online else None, reward, run_dir, accelerator))
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def log_step(recipe: Recipe, step: int, metrics: dict, batch: StepBatch, seconds: float, bad_steps: int) -> dict:
    record = {"step": step, **metrics, "step_s": seconds, "skipped_steps": bad_steps}
    if "tokens" in metrics:
        record["tokens_per_s"] = metrics["tokens"] / max(seconds, 1e-9)
    every = recipe.output.sample_every
    if every and step % every == 0 and batch.texts:
        record["samples"] = [{"prompt": p, "completion": c} for p, c in list(zip(batch.prompts, batch.texts))[:4]]
    return record
