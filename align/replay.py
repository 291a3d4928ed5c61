"""A replay buffer of past rollout groups (``train.replay: {capacity_steps, mix}``).

Each step's fresh groups (a prompt, its k completions, their rewards) go into the buffer, which
keeps the last ``capacity_steps`` steps, this one included. The step then trains on
``round(mix·G)`` of its G fresh groups and G − that many groups drawn uniformly, with replacement,
from the whole buffer: completions sampled by the policies of up to ``capacity_steps − 1`` steps
ago, with no importance weights. CoPG's loss is zero at π* whatever distribution its pairs come
from, so it learns from them (Flet-Berliac et al. 2024); a policy gradient whose KL penalty and
advantages are fixed at sampling time (RLOO, vanilla PG with ``kl_from: old``, TRL's way) is
biased on them (the comparison ``align compare`` runs). RLOO with ``kl_from: current`` is not a
control: its gradient is half CoPG's on any batch (losses/kl.py). Groups stay whole, so pairs and
baselines stay within one prompt and one sampling policy.

An objective that reads the sampling policy's log-probs (``Objective.sampling_logprobs``: a KL
penalty fixed at sampling time, importance ratios) gets them with every replayed group: the
trainer computes π_old (and the reference's log-probs, the critic's V_old) on the fresh groups
before they join the buffer, which keeps them beside the completions.

The buffer is local to each process (its own prompts), drawn with a generator seeded by (seed,
step, process), and saved in every checkpoint: a resumed run replays exactly what the
uninterrupted one would.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import torch

from align.batches import KeptLogprobs, StepBatch, split_micro_batches
from align.rollout import Rollout, concat_rollouts, pad_to

_ROW_TENSORS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "rewards", "demo_rewards")
# [rows, T] per-token values of the step that sampled (None where the objective reads none)
_TOKEN_TENSORS = ("old_logprobs", "ref_logprobs", "old_values")


class ReplayBuffer:
    def __init__(self, capacity_steps: int, mix: float, k: int, micro_batch_groups: int, pad_id: int, seed: int):
        self.capacity_steps, self.mix, self.k = capacity_steps, mix, k
        self.micro_batch_groups, self.pad_id, self.seed = micro_batch_groups, pad_id, seed
        self.steps: deque[dict] = deque(maxlen=capacity_steps)

    def add(self, batch: StepBatch, kept: KeptLogprobs | None, step: int) -> None:
        """Keep this step's groups (CPU copies; unscored rows are remembered as such) with the
        per-token values ``kept`` of the policy that sampled them."""
        scored = torch.zeros(batch.completion_ids.shape[0], dtype=torch.bool)
        scored[torch.cat(batch.micro_batches).cpu()] = True
        entry = {"step": step, "scored": scored, "texts": list(batch.texts), "prompts": list(batch.prompts)}
        for name in _ROW_TENSORS:
            value = getattr(batch, name)
            entry[name] = None if value is None else value.detach().cpu().clone()
        for name in _TOKEN_TENSORS:
            value = None if kept is None else getattr(kept, name)
            entry[name] = None if value is None else value.detach().cpu().clone()
        self.steps.append(entry)

    def mix_into(self, batch: StepBatch, step: int, process_index: int) -> tuple[StepBatch, KeptLogprobs | None]:
        """The step's training batch: its first round(mix·G) fresh groups, the rest from the
        buffer; with their samplers' per-token values where the buffer keeps them."""
        k = self.k
        groups = batch.completion_ids.shape[0] // k
        fresh = round(self.mix * groups)
        pool = [(i, g) for i, entry in enumerate(self.steps) for g in range(entry["completion_ids"].shape[0] // k)]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + process_index)
        drawn = torch.randint(len(pool), (groups - fresh,), generator=generator).tolist()
        picks = [(len(self.steps) - 1, g) for g in range(fresh)] + [pool[i] for i in drawn]
        parts, ages, scored, texts, prompts = [], [], [], [], []
        rewards, demo_rewards = [], []
        per_token: dict[str, list] = {name: [] for name in _TOKEN_TENSORS}
        for entry_index, g in picks:
            entry, rows = self.steps[entry_index], torch.arange(g * k, (g + 1) * k)
            ids, mask, c_ids, c_mask = (entry[name][rows] for name in _ROW_TENSORS[:4])
            parts.append(Rollout(ids, mask, c_ids, c_mask, group=torch.zeros(k, dtype=torch.long)))
            ages.append(step - entry["step"])
            scored.append(entry["scored"][rows])
            texts += [entry["texts"][i] for i in rows.tolist()]
            prompts += [entry["prompts"][i] for i in rows.tolist()]
            rewards.append(entry["rewards"][rows])
            if entry["demo_rewards"] is not None:
                demo_rewards.append(entry["demo_rewards"][rows])
            for name in _TOKEN_TENSORS:
                per_token[name].append(None if entry.get(name) is None else entry[name][rows])
        rollout = concat_rollouts(parts, self.pad_id)
        device = batch.completion_ids.device
        keep = torch.cat(scored)
        micro = split_micro_batches(groups, k, self.micro_batch_groups, "grouped")
        width = rollout.completion_ids.shape[1]
        tokens = {}
        for name, parts_of in per_token.items():
            if parts_of and all(p is not None for p in parts_of):
                # the mixed batch is as wide as its widest group's step: pad each to it
                tokens[name] = torch.cat([pad_to(p, width) for p in parts_of]).to(device)
        mixed = replace(
            batch,
            prompt_ids=rollout.prompt_ids.to(device),
            prompt_mask=rollout.prompt_mask.to(device),
            completion_ids=rollout.completion_ids.to(device),
            completion_mask=rollout.completion_mask.to(device),
            micro_batches=[rows[keep[rows]].to(device) for rows in micro],
            rewards=torch.cat(rewards).to(device),
            group=torch.arange(groups, device=device).repeat_interleave(k),
            demo_rewards=torch.cat(demo_rewards).to(device) if demo_rewards else None,
            ref_logprobs=None,
            sampler_probs=None,
            sampler_logprobs=None,  # not kept: a recipe with replay applies no importance correction
            texts=tuple(texts),
            prompts=tuple(prompts),
            metrics={
                **batch.metrics,
                "replayed_fraction": (groups - fresh) / max(groups, 1),
                "replay_age": sum(ages) / max(len(ages), 1),
            },
        )
        return mixed, (KeptLogprobs(**tokens) if tokens else None)

    def state_dict(self) -> dict:
        return {"steps": [dict(entry) for entry in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = deque(state.get("steps", []), maxlen=self.capacity_steps)
