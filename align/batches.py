"""Step batches: what one optimizer step trains on, built from a scored rollout (online) or read
from a fixed file (offline: pairs or rows, reference log-probs cached once). Rows are a pure
function of (seed, step), so resumes and process counts agree. A batch is a value: made once by
its constructor, never written afterwards; what a step learns about it (π_old, the reference's
log-probs, V_old) is a ``KeptLogprobs`` beside it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from align import data as data_lib
from align.logprobs import completion_logprobs, fused_head_weight
from align.models import Models, reference_model
from align.rollout import Rollout, trim_left
from align.run_data import OfflineData
from align.scoring import RolloutScores
from losses import sequence_logprobs


@dataclass(frozen=True)
class StepBatch:
    """Everything one optimizer step trains on, for this process, split into micro-batches."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    # row indices of each micro-batch (whole groups / pairs), unscored samples left out
    micro_batches: list[Tensor]
    rewards: Tensor | None = None  # [B] or [B, C]
    group: Tensor | None = None
    pairs: Tensor | None = None
    demo_rewards: Tensor | None = None
    ref_logprobs: Tensor | None = None  # offline: the reference's log-probs, cached once per row
    sampler_probs: Tensor | None = None  # [T, B, V] the rollout's softmax, for the policy's log-probs
    sampler_logprobs: Tensor | None = None  # [B, T] the engine's log-probs of its samples (Rollout's)
    texts: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    # offline rows of an objective that needs ``mismatched_logprobs`` (KTO): each row's prompt goes
    # with another row's completion (``local_rows(..., rotated=True)``), right-padded
    mismatched_completion_ids: Tensor | None = None
    mismatched_completion_mask: Tensor | None = None
    offline: bool = False  # rows of a fixed dataset, not samples of the policy


@dataclass(frozen=True)
class KeptLogprobs:
    """Per-token values of every row of a batch, taken before its first optimizer step ([B, T],
    the batch's width): π_old, the reference's log-probs, the critic's V_old (None: not kept)."""

    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    mismatched_logprobs: Tensor | None = None  # [B] ℓ(y′|x) of the policy, its prompt with another row's completion
    mismatched_ref_logprobs: Tensor | None = None  # [B] the reference's


@dataclass(frozen=True)
class BatchLayout:
    """How a step's rows are drawn and split, resolved once from the recipe's ``train`` section."""

    batch_size: int  # prompts (or pairs, rows) per micro-batch
    gradient_accumulation_steps: int = 1
    mini_batches: int = 1
    seed: int = 0


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


def local_rows(
    layout: BatchLayout, n_rows: int, step: int, num_processes: int, process_index: int, rotated: bool = False
) -> list[int]:
    """This process's rows of the step: its share of each mini-batch, so a mini-batch holds the
    same rows whatever the process count. ``rotated``: in place of each row, the row before it in
    its whole mini-batch (every process), the first taking the last -- TRL's KTO rotation of the
    completions by one, here over the whole step so it too is the same whatever the process count."""
    per_process = layout.batch_size * layout.gradient_accumulation_steps
    rows = data_lib.step_rows(n_rows, step, per_process * num_processes * layout.mini_batches, layout.seed)
    out: list[int] = []
    for j in range(layout.mini_batches):
        mini_batch = rows[j * per_process * num_processes : (j + 1) * per_process * num_processes]
        if rotated:
            mini_batch = mini_batch[-1:] + mini_batch[:-1]
        out += mini_batch[process_index * per_process : (process_index + 1) * per_process]
    return out


def rollout_batch(
    rollout: Rollout, scores: RolloutScores, layout: BatchLayout, prompts: list[str], device, metrics: dict[str, float]
) -> StepBatch:
    """A scored rollout as a step batch. Samples no reward scored leave the loss: they are taken
    out of their micro-batch, so a group baseline, the unit count and the metrics see only scored
    samples (a micro-batch left with none still runs, at zero weight, so every process runs the
    same forwards). Their reward becomes 0 so it cannot turn a loss NaN."""
    n_prompts = int(rollout.group.max()) + 1 if rollout.group.numel() else 0
    k = rollout.completion_ids.shape[0] // max(n_prompts, 1)
    micro_batches = split_micro_batches(n_prompts, k, layout.batch_size, "grouped")
    rewards, demo_rewards, sampler_probs = scores.rewards, scores.demo_rewards, rollout.probs
    scored = scores.scored
    if not bool(scored.all()):
        micro_batches = [rows[scored[rows]] for rows in micro_batches]
        rewards = _zero_where(~scored, rewards)
        demo_rewards = None if demo_rewards is None else _zero_where(~scored, demo_rewards)
        sampler_probs = None  # kept for every row in order; the training forward computes its own
    return StepBatch(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        micro_batches=micro_batches,
        rewards=rewards.to(device),
        group=rollout.group.to(device),
        demo_rewards=None if demo_rewards is None else demo_rewards.to(device),
        sampler_probs=sampler_probs,
        sampler_logprobs=rollout.sampler_logprobs,
        texts=tuple(rollout.texts),
        prompts=tuple(prompts),
        metrics={**scores.metrics, **metrics},
    )


def _zero_where(missing: Tensor, values: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(missing[:, None] if values.dim() == 2 else missing, zero, values)


KEEP_PROBS_MAX_BYTES = 1 << 30  # the kept softmax is sized for max_new_tokens: at most 1 GiB of it


def reuse_sampler_probs(
    policy, *, online: bool, one_pass: bool, one_micro_batch: bool, one_call: bool, max_new_tokens: int, rows: int
) -> bool:
    """Whether the rollout keeps its softmax for the policy's log-probs (its training forward then
    skips the LM head's matmul and softmax): the same weights see the same tokens in the same
    mode -- no dropout (``disable_dropout``, the policy in eval mode), one optimizer step per
    rollout (``one_pass``: one update, one mini-batch) -- and the step is one generation call of
    ``rows`` sequences and one micro-batch (no gradient accumulation), so the buffer replaces the
    one the training forward would hold. It is allocated for ``max_new_tokens`` before the
    lengths are known, so beyond ``KEEP_PROBS_MAX_BYTES`` the training forward computes the
    softmax itself instead."""
    weight = fused_head_weight(policy)
    return (
        online
        and one_pass
        and one_micro_batch
        and one_call
        and not policy.training
        and weight is not None
        and max_new_tokens * rows * weight.shape[0] * 4 <= KEEP_PROBS_MAX_BYTES
    )


def offline_batch(
    layout: BatchLayout,
    dataset: OfflineData,
    rows: list[int],
    pad_token_id: int,
    device,
    rewards: Tensor | None = None,
    mismatched: list[int] | None = None,
) -> StepBatch:
    """A step's pairs (chosen block, then rejected block: one forward for both) or SFT rows;
    ``rewards``: per text, for an objective that reads them on a pair file (CoPG); labelled rows
    (KTO) carry their labels as rewards. ``mismatched``: for each row, the row whose completion
    goes with its prompt in ``mismatched_completion_ids`` (unpaired rows only)."""
    n_texts = len(dataset.completion_ids)
    prompt_rows = [dataset.prompt_ids[i] for _ in range(n_texts) for i in rows]
    completion_rows = [dataset.completion_ids[t][i] for t in range(n_texts) for i in rows]
    prompt_ids, prompt_mask = data_lib.pad(prompt_rows, pad_token_id, "left", device)
    completion_ids, completion_mask = data_lib.pad(completion_rows, pad_token_id, "right", device)
    n = len(rows)
    if rewards is None and dataset.labels is not None:
        rewards = torch.tensor([dataset.labels[i] for i in rows])
    other_ids = other_mask = None
    if mismatched is not None:
        other_ids, other_mask = data_lib.pad(
            [dataset.completion_ids[0][j] for j in mismatched], pad_token_id, "right", device
        )
    ref_logprobs = None
    if dataset.ref_cache is not None:
        T = completion_ids.shape[1]
        cached = [dataset.ref_cache[i][t] for t in range(n_texts) for i in rows]
        ref_logprobs = torch.stack([torch.nn.functional.pad(c, (0, T - c.shape[0]))[:T] for c in cached]).to(device)
    return StepBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        micro_batches=split_micro_batches(n, 1, layout.batch_size, "paired" if dataset.paired else "grouped"),
        pairs=torch.stack([torch.arange(n), torch.arange(n) + n], 1).to(device) if dataset.paired else None,
        rewards=None if rewards is None else rewards.to(device),
        ref_logprobs=ref_logprobs,
        prompts=tuple(dataset.prompts[i] for _ in range(n_texts) for i in rows),
        mismatched_completion_ids=other_ids,
        mismatched_completion_mask=other_mask,
        offline=True,
    )


@torch.no_grad()
def cache_reference_logprobs(models: Models, dataset: OfflineData, chunk: int, accelerator) -> None:
    """Offline data: reference log-probs computed once per row, in canonical chunks (dataset order,
    ``chunk`` rows) so the values do not depend on step, resume or process count."""
    n = len(dataset)
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


@torch.no_grad()
def keep_mismatched_logprobs(
    models: Models, batch: StepBatch, kept: KeptLogprobs, accelerator, temperature: float = 1.0
) -> KeptLogprobs:
    """``kept`` with the sequence log-probs ℓ(y′|x) of the policy and of the reference for every row
    of ``batch``: its prompt with its mismatched completion (``mismatched_completion_ids``). One
    no-grad forward of each model per micro-batch, before the step's first backward, so every
    micro-batch's statistics see the policy as the whole step does."""
    n = batch.prompt_ids.shape[0]
    device = batch.prompt_ids.device
    policy, reference = torch.zeros(n, device=device), torch.zeros(n, device=device)
    for rows in batch.micro_batches:
        p_ids, p_mask = trim_left(batch.prompt_ids[rows], batch.prompt_mask[rows])
        c_ids, c_mask = batch.mismatched_completion_ids[rows], batch.mismatched_completion_mask[rows]
        width = max(int(c_mask.sum(-1).max()), 1)
        c_ids, c_mask = c_ids[:, :width], c_mask[:, :width]
        inputs = (p_ids, p_mask, c_ids, c_mask, temperature)
        # the policy's pass outside the reference's: under LoRA the reference is the policy, adapters off
        policy[rows] = sequence_logprobs(completion_logprobs(models.policy, *inputs), c_mask.float()).float()
        with reference_model(models, accelerator) as ref:
            reference[rows] = sequence_logprobs(completion_logprobs(ref, *inputs), c_mask.float()).float()
    return replace(kept, mismatched_logprobs=policy, mismatched_ref_logprobs=reference)


def _stack_ragged(parts: list[Tensor]) -> Tensor:
    T = max(p.shape[0] for p in parts)
    return torch.stack([torch.nn.functional.pad(p, (0, T - p.shape[0])) for p in parts])
