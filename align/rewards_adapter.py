"""The trainer's view of the recipe's reward: scores as tensors, every component kept for logging.

Rewards themselves live in ``rewards/`` (TRL's ``(prompts, completions, **columns) -> list[float]``
convention); this module only turns the recipe's component list into one object the loop calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Scores:
    """One ``RewardFunction.score`` call's result."""

    total: Tensor  # [N] weighted total, NaN where no component scored the sample
    components: dict[str, list[float]]  # each component's raw scores, NaN where it returned None
    raw: Tensor  # [N, C] the same raw scores as a tensor, in component order
    scored: Tensor  # [N] bool: some component scored the sample


class RewardFunction:
    def __init__(self, components: list, device: torch.device):
        import rewards as rewards_lib

        specs = [c.model_dump(exclude_none=True) for c in components]
        self.combined = rewards_lib.build_combined(specs, device=str(device))
        self.combined.allow_non_finite = True  # a NaN/inf score skips the step (counted) rather than ending the run
        self.combined.allow_none = True  # None: the reward does not score that sample (dropped from the loss)
        # a component written for TRL reads message lists, completion ids and the trainer state
        self.takes_trl_inputs = any(rewards_lib.base.trl_convention(c.fn) for c in self.combined.components)
        self.demo_cache = rewards_lib.DemoRewardCache(self.combined)

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list],
        gather: Callable[[list[float]], list[float]] | None = None,
        update: bool = True,
        messages: list | None = None,
        completion_ids: list[list[int]] | None = None,
        step: int | None = None,
        max_steps: int | None = None,
    ) -> Scores:
        """Weighted total per sample [N] and each component's raw scores, NaN where a reward
        returned None (``Scores.scored`` says which samples some component scored). ``gather``:
        every process's scores concatenated, so whitening moments stay equal on all ranks;
        ``update=False`` (evaluation) leaves the moments as training left them.

        What rewards written for TRL receive besides: ``messages`` (each sample's prompt as chat
        messages, None for a text prompt) makes their ``prompts`` those messages and their
        ``completions`` one assistant message each; ``completion_ids`` and, with ``step``,
        ``trainer_state`` (a ``transformers.TrainerState``) are passed when they take them."""
        components = self.combined.score_components(
            prompts, completions, trl=trl_view(completions, messages, completion_ids, step, max_steps), **columns
        )
        total = self.combined.combine(components, update=update, gather=gather)
        nan = float("nan")
        components = {name: [nan if v is None else v for v in values] for name, values in components.items()}
        return Scores(
            total=torch.tensor([nan if t is None else t for t in total], dtype=torch.float32),
            components=components,
            raw=torch.tensor([components[name] for name in components], dtype=torch.float32).T,
            scored=torch.tensor([t is not None for t in total], dtype=torch.bool),
        )

    def score_demonstrations(
        self,
        prompts: list[str],
        demonstrations: list[str],
        columns: dict[str, list],
        messages: list | None = None,
        completion_ids: list[list[int]] | None = None,
        step: int | None = None,
        max_steps: int | None = None,
    ) -> Tensor:
        """[N, C] raw component scores of the demonstrations (cached), NaN where a component
        returned None. Scored through the same ``trl_view`` as the policy's samples: on
        conversational data a TRL-convention reward gets the prompt's messages and the
        demonstration as one assistant message, as it gets a sample."""
        view = trl_view(demonstrations, messages, completion_ids, step, max_steps)
        scores = self.demo_cache(prompts, demonstrations, trl=view, **columns)
        nan = float("nan")
        return torch.tensor([[nan if v is None else v for v in row] for row in scores], dtype=torch.float32)

    def clip_components(self, components: Tensor) -> Tensor:
        """[N, C] raw scores → each component clipped to its ``reward[i].clip`` (RCfD compares
        clipped policy and demonstration scores)."""
        columns = [c.clipped(components[:, i].double().tolist()) for i, c in enumerate(self.combined.components)]
        return torch.tensor(columns, dtype=torch.float64).T.float()

    def state_dict(self) -> dict:
        return self.combined.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.combined.load_state_dict(state)


def trl_view(
    completions: list[str],
    messages: list | None,
    completion_ids: list[list[int]] | None,
    step: int | None,
    max_steps: int | None,
):
    """The ``rewards.TRLView`` of a batch: conversational when any prompt is a message list."""
    import rewards as rewards_lib

    conversational = messages is not None and any(isinstance(m, list) for m in messages)
    state = None
    if step is not None:
        from transformers import TrainerState

        state = TrainerState(global_step=step, max_steps=max_steps or 0)
    return rewards_lib.TRLView(
        prompts=list(messages) if conversational else None,
        completions=[[{"role": "assistant", "content": text}] for text in completions] if conversational else None,
        completion_ids=completion_ids,
        trainer_state=state,
    )


def build_reward(components: list, device: torch.device) -> RewardFunction:
    return RewardFunction(components, device)
