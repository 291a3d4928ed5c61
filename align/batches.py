"""Step batches: what one optimizer step trains on, built by a rollout (online: prompts → k
completions → rewards) or read from a fixed file (offline: pairs or rows, reference log-probs
cached once). Rows are a pure function of (seed, step), so resumes and process counts agree."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from align import data as data_lib
from align import formats
from align.distributed import gathered_for_generation
from align.logprobs import completion_logprobs, fused_head_weight
from align.models import Models, reference_model
from align.recipe import Recipe
from align.rewards_adapter import RewardFunction
from align.rollout import Rollout, decode_completions, generate_with, sample_keys
from align.run_data import OfflineData, OnlineData


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
    ref_logprobs: Tensor | None = None  # precomputed (offline cache; online: kept by the first update)
    old_logprobs: Tensor | None = None  # π_old, kept by the first of several updates on this batch
    old_values: Tensor | None = None  # the critic's V_old, kept likewise (objectives that read values)
    sampler_probs: Tensor | None = None  # [T, B, V] the rollout's softmax, for the policy's log-probs
    texts: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


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
    """This process's rows of the step: its share of each mini-batch, so a mini-batch holds the
    same rows whatever the process count."""
    per_process = recipe.train.batch_size * recipe.train.gradient_accumulation_steps
    mini_batches, procs, rank = recipe.train.mini_batches, accelerator.num_processes, accelerator.process_index
    rows = data_lib.step_rows(n_rows, step, per_process * procs * mini_batches, recipe.train.seed)
    out: list[int] = []
    for j in range(mini_batches):
        mini_batch = rows[j * per_process * procs : (j + 1) * per_process * procs]
        out += mini_batch[rank * per_process : (rank + 1) * per_process]
    return out


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
    keep_probs = reuse_sampler_probs(recipe, models, n_chunks=-(-len(rows) // chunk), rows=len(rows) * k)
    parts: list[Rollout] = []
    start = time.perf_counter()
    with gathered_for_generation(models.policy, accelerator) as policy:  # whole weights once per rollout
        for lo in range(0, len(rows), chunk):
            sel = slice(lo, lo + chunk)
            # re-pad the chunk so its prompts are as short as they can be
            ids, mask = _trim_left(prompt_ids[sel], prompt_mask[sel])
            keys_chunk = keys[lo * k : (lo + chunk) * k]
            parts.append(generate_with(policy, ids, mask, keys_chunk, k, gen, models, keep_probs))
    rollout = _concat_rollouts(parts, models.pad_token_id)
    texts = decode_completions(rollout, models.tokenizer, gen.stop_strings, models.pad_token_id)
    generation_seconds = time.perf_counter() - start
    prompts = [dataset.prompts[i] for i in rows for _ in range(k)]
    columns = {name: [values[i] for i in rows for _ in range(k)] for name, values in dataset.columns.items()}
    rewards, components = reward.score(
        prompts,
        texts,
        columns,
        gather=_all_ranks(accelerator),
        messages=[dataset.messages[i] for i in rows for _ in range(k)] if dataset.conversational else None,
        completion_ids=[ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]
        if reward.takes_trl_inputs
        else None,
        step=step,
        max_steps=recipe.train.steps,
    )
    scored = reward.last_scored
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
        metrics=component_means(components, _all_ranks(accelerator)),
        sampler_probs=rollout.probs,
    )
    batch.metrics["generation_s"] = generation_seconds
    if "demo_rewards" in recipe.objective.needs:  # RCfD: each component against the demonstration's
        demos = [formats.completion_text(d) for d in columns[recipe.data.demonstration_column]]
        demo_ids = None
        if reward.takes_trl_inputs:
            demo_ids = models.tokenizer(demos, add_special_tokens=False)["input_ids"]
        demo_scores = reward.score_demonstrations(
            prompts,
            demos,
            columns,
            messages=[dataset.messages[i] for i in rows for _ in range(k)] if dataset.conversational else None,
            completion_ids=demo_ids,
            step=step,
            max_steps=recipe.train.steps,
        )
        components_tensor = reward.last_components_tensor()
        # RCfD compares every component: the sample and its demonstration must both be scored
        scored = ~(components_tensor.isnan().any(-1) | demo_scores.isnan().any(-1))
        batch.demo_rewards = reward.clip_components(demo_scores).to(accelerator.device)
        batch.rewards = reward.clip_components(components_tensor).to(accelerator.device)
    drop_unscored(batch, scored)
    gather = _all_ranks(accelerator)
    if gather is not None:  # every process's count, as one process on the same rows would log
        batch.metrics["unscored"] = float(sum(gather([batch.metrics["unscored"]])))
    return batch


def component_means(components: dict[str, list[float]], gather=None) -> dict[str, float]:
    """``reward/<name>``: each component's mean over the step's samples of every process (NaN,
    a sample the component did not score, left out); one gather for all components."""
    rows = [list(row) for row in zip(*components.values())]
    if gather is not None:
        rows = gather(rows)
    table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(components))
    return {f"reward/{name}": float(table[:, c].nanmean()) for c, name in enumerate(components)}


def drop_unscored(batch: StepBatch, scored: Tensor) -> None:
    """Samples no reward scored (a TRL reward returned None) leave the loss: they are taken out of
    their micro-batch, so a group baseline, the unit count and the metrics see only scored samples
    (a micro-batch left with none keeps one row, at zero weight, so every process still runs the
    same forwards). Their reward becomes 0 so it cannot turn a loss NaN; counted as
    ``unscored``."""
    unscored = int((~scored).sum())
    batch.metrics["unscored"] = float(unscored)
    if not unscored:
        return
    scored = scored.to(batch.completion_ids.device)
    zero = torch.zeros((), dtype=batch.rewards.dtype, device=batch.rewards.device)
    missing = ~scored.to(batch.rewards.device)
    batch.rewards = torch.where(missing[:, None] if batch.rewards.dim() == 2 else missing, zero, batch.rewards)
    if batch.demo_rewards is not None:
        where = missing[:, None] if batch.demo_rewards.dim() == 2 else missing
        batch.demo_rewards = torch.where(where, zero, batch.demo_rewards)
    batch.micro_batches = [rows[scored[rows]] for rows in batch.micro_batches]
    batch.sampler_probs = None  # kept for every row in order; the training forward computes its own


def _all_ranks(accelerator) -> Callable[[list[float]], list[float]] | None:
    """Every process's list, concatenated in rank order (None on one process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return lambda values: [v for part in gather_object([list(values)]) for v in part]


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
        and recipe.train.updates_per_batch == 1
        and recipe.train.mini_batches == 1
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
        if "rewards" in recipe.objective.needs:  # copg on a pair file: rewards per text
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
        messages = [dataset.messages[i] for _ in range(2) for i in rows] if dataset.conversational else None
        return reward.score(prompts, texts, {}, gather=gather, messages=messages)[0]
    return torch.cat([torch.full((len(rows),), 0.5), torch.zeros(len(rows))])


@torch.no_grad()
def cache_reference_logprobs(recipe: Recipe, models: Models, dataset: OfflineData, accelerator) -> None:
    """Offline data: reference log-probs computed once per row, in canonical chunks (dataset order,
    ``batch_size`` rows) so the values do not depend on step, resume or process count."""
    n, chunk = len(dataset), recipe.train.batch_size
    all_starts = list(range(0, n, chunk))
    starts = all_starts[accelerator.process_index :: accelerator.num_processes]
    # a sharded reference makes every forward a collective call: every process runs as many
    # (the last one repeated, its result discarded)
    rounds = -(-len(all_starts) // accelerator.num_processes)
    starts = starts + [starts[-1] if starts else 0] * (rounds - len(starts))
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
            if rows[0] in local:  # a repeated round
                continue
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
