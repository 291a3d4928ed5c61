"""The recipe's train section (``train:``): steps or epochs, the batch layout, the optimizer and its
schedule, updates per rollout batch, a replay buffer, generation ahead of training (``async``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from align.async_rollouts import AsyncConfig
from align.config import Seed, Strict


class ReplayConfig(Strict):
    capacity_steps: int = Field(..., ge=1, description="keep the groups of the last N steps, this one included")
    mix: float = Field(
        0.0, ge=0, le=1, description="fraction of each step's groups trained fresh; the rest are drawn from the buffer"
    )


class TrainConfig(Strict):
    # ``async`` is a Python keyword: the field is ``async_``, read and written as ``async``
    model_config = ConfigDict(**Strict.model_config, validate_by_name=True, serialize_by_alias=True)

    steps: int = Field(100, gt=0, description="optimizer steps")
    epochs: float | None = Field(
        None,
        gt=0,
        description="offline objectives: passes over the training rows instead of train.steps (steps = "
        "ceil(epochs × rows / rows per step over every process), resolved when the data is read)",
    )
    batch_size: int = Field(8, gt=0, description="per micro-batch: prompts (online), pairs or rows (offline)")
    gradient_accumulation_steps: int = Field(1, gt=0)
    updates_per_batch: int = Field(
        1,
        ge=1,
        description="online: optimizer updates on each rollout batch (GRPO's μ, PPO's epochs); π_old's log-probs "
        "are kept from before the first, for the objectives' importance ratios and clipping",
    )
    mini_batches: int = Field(
        1,
        ge=1,
        description="online: each rollout batch is this many mini-batches of batch_size × gradient_accumulation_steps "
        "prompts per process, one optimizer step each, per pass (TRL's num_mini_batches); π_old, the reference's "
        "log-probs and V_old are computed for all of them before the first step",
    )
    replay: ReplayConfig | None = Field(
        None,
        description="online: train on past groups of completions too (align/replay.py), no importance weights; "
        "sound for copg, biased for policy-gradient objectives",
    )
    async_: AsyncConfig | None = Field(
        None,
        alias="async",
        description="online: generate the coming steps' rollouts ahead, from weights at most max_staleness "
        "optimizer steps old (align/async_rollouts.py)",
    )
    lr: float = Field(1e-5, gt=0)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="sgd: plain lr·gradient steps (tests, ablations)")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: Seed = 0
    max_bad_steps: int = Field(10, ge=0, description="stop after this many steps skipped for NaN/inf")
    gradient_checkpointing: bool = Field(
        False,
        description="policy and critic: keep each layer's input only and recompute its activations in the "
        "backward (less memory, one more forward of the layers); non-reentrant, so LoRA needs nothing more",
    )

    @model_validator(mode="after")
    def steps_or_epochs(self) -> TrainConfig:
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError("give train.steps or train.epochs, not both")
        return self
