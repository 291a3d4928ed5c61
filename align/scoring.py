"""Scoring: the recipe's reward on a rollout's samples (and, for RCfD, on their demonstrations),
and on offline pairs; returned as values, never written into a batch.

A sample no reward scored (a TRL reward returned None) is reported in ``RolloutScores.scored``;
the batch leaves it out of the loss (align/batches.py). Component means and the unscored count
are over every process's samples, as one process on the same rows would log them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from align import formats
from align.rewards_adapter import RewardFunction
from align.run_data import OfflineData, OnlineData


@dataclass(frozen=True)
class RolloutScores:
    """What the reward says of one rollout (CPU tensors, rows in rollout order)."""

    # [N] weighted totals; [N, C] each component clipped, where the objective weighs them itself (RCfD)
    rewards: Tensor
    scored: Tensor  # [N] bool: the sample (and its demonstration, for RCfD) was scored
    demo_rewards: Tensor | None = None  # [N, C] the demonstrations' clipped components (RCfD)
    metrics: dict[str, float] = field(default_factory=dict)  # ``reward/<name>`` means, ``unscored``: every process


@dataclass(frozen=True)
class ScoreSettings:
    """What scoring reads of the run, resolved once from the recipe."""

    steps: int  # the run's length (a TRL reward's ``trainer_state.max_steps``)
    # the data column of each prompt's demonstration, where the objective compares every reward
    # component with the demonstration's (RCfD); None: the weighted total is the reward
    demonstration_column: str | None = None


def score_rollout(
    reward: RewardFunction,
    dataset: OnlineData,
    rows: list[int],
    texts: list[str],
    completion_ids: list[list[int]],
    tokenizer,
    settings: ScoreSettings,
    step: int,
    gather: Callable[[list], list] | None = None,
) -> RolloutScores:
    """The rollout's k samples of each prompt in ``rows`` (prompt-major), scored."""
    k = len(texts) // max(len(rows), 1)
    prompts = [dataset.prompts[i] for i in rows for _ in range(k)]
    columns = {name: [values[i] for i in rows for _ in range(k)] for name, values in dataset.columns.items()}
    messages = [dataset.messages[i] for i in rows for _ in range(k)] if dataset.conversational else None
    scores = reward.score(
        prompts,
        texts,
        columns,
        gather=gather,
        messages=messages,
        completion_ids=completion_ids if reward.takes_trl_inputs else None,
        step=step,
        max_steps=settings.steps,
    )
    metrics = component_means(scores.components, gather)
    rewards, scored, demo_rewards = scores.total, scores.scored, None
    if settings.demonstration_column is not None:  # RCfD: each component against the demonstration's
        demos = [formats.completion_text(d) for d in columns[settings.demonstration_column]]
        demo_ids = tokenizer(demos, add_special_tokens=False)["input_ids"] if reward.takes_trl_inputs else None
        demo_scores = reward.score_demonstrations(
            prompts, demos, columns, messages=messages, completion_ids=demo_ids, step=step, max_steps=settings.steps
        )
        # RCfD compares every component: the sample and its demonstration must both be scored
        scored = ~(scores.raw.isnan().any(-1) | demo_scores.isnan().any(-1))
        demo_rewards = reward.clip_components(demo_scores)
        rewards = reward.clip_components(scores.raw)
    unscored = float((~scored).sum())
    metrics["unscored"] = float(sum(gather([unscored]))) if gather is not None else unscored
    return RolloutScores(rewards=rewards, scored=scored, demo_rewards=demo_rewards, metrics=metrics)


def component_means(components: dict[str, list[float]], gather=None) -> dict[str, float]:
    """``reward/<name>``: each component's mean over the step's samples of every process (NaN,
    a sample the component did not score, left out); one gather for all components."""
    rows = [list(row) for row in zip(*components.values())]
    if gather is not None:
        rows = gather(rows)
    table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(components))
    return {f"reward/{name}": float(table[:, c].nanmean()) for c, name in enumerate(components)}


def pair_rewards(dataset: OfflineData, reward: RewardFunction | None, rows: list[int], gather=None) -> Tensor:
    """Offline CoPG rewards: the pair file's chosen_reward/rejected_reward columns, else the
    recipe's reward on the texts, else ½ for chosen and 0 for rejected: with a reward gap of ½,
    CoPG's minimiser is IPO's at the same β, and its loss is β/2 times IPO's."""
    if dataset.pair_rewards is not None:
        return torch.tensor([dataset.pair_rewards[t][i] for t in range(2) for i in rows], dtype=torch.float32)
    if reward is not None:
        prompts = [dataset.prompts[i] for _ in range(2) for i in rows]
        texts = [dataset.completion_texts[t][i] for t in range(2) for i in rows]
        messages = [dataset.messages[i] for _ in range(2) for i in rows] if dataset.conversational else None
        return reward.score(prompts, texts, {}, gather=gather, messages=messages).total
    return torch.cat([torch.full((len(rows),), 0.5), torch.zeros(len(rows))])


def all_ranks(accelerator) -> Callable[[list], list] | None:
    """Every process's list, concatenated in rank order (None on one process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return lambda values: [v for part in gather_object([list(values)]) for v in part]
