"""What the trainer hands the estimators, checked through whole runs on the tiny GPT-2: GRPO's
KL-in-reward advantages fixed at sampling across passes, RCfD's one-reward calibration exactly
−(r − r_d)², PPO's whitened first update independent of the reward's scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_recipe
from safetensors.torch import load_file

import align.trainer as trainer_mod
import losses
from align.config import validate
from align.recipe import Recipe
from align.rewards_adapter import RewardFunction
from align.trainer import train


def test_grpo_kl_in_the_reward_keeps_its_advantages_in_every_pass(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    seen = []
    advantages = losses.GRPO.advantages

    def spy(self, batch):
        out = advantages(self, batch)
        seen.append((out[0].detach().clone(), batch.logprobs.detach().clone()))
        return out

    monkeypatch.setattr(losses.GRPO, "advantages", spy)
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "grpo", steps=1, lr=1e-2)
    raw = recipe.model_dump(mode="json")
    raw["objective"]["options"] = {"kl": "reward", "kl_estimator": "k1"}
    raw["train"]["updates_per_batch"] = 3
    train(validate(Recipe, raw))
    assert len(seen) == 3  # one micro-batch, three passes
    first, later = seen[0], seen[1:]
    for advantage, logprobs in later:
        assert (logprobs - first[1]).abs().max() > 1e-4  # the policy moved between passes ...
        assert torch.equal(advantage, first[0])  # ... and the advantages did not


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rcfd_with_one_reward_is_rloo_on_the_squared_gap(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """The loss of a step equals RLOO written out on r̃ = −(r − r_d)², with r and r_d computed here
    from the sampled texts and the data file's demonstrations (Rita et al., Eq. 3)."""
    import rewards

    def tenth_of_length(prompts, completions, **_):
        return [len(c) / 10 for c in completions]

    rewards.register(lambda: tenth_of_length, name="test_tenth_of_length")
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rcfd", steps=1, optimizer="sgd", lr=1e-3)
    raw = recipe.model_dump(mode="json")
    raw["objective"]["beta"] = 0.0
    raw["reward"] = [{"name": "test_tenth_of_length"}]
    recipe = validate(Recipe, raw)
    steps, evaluated, demonstrations = [], [], []
    train_on_batch, evaluate = trainer_mod.train_on_batch, losses.RCfD.evaluate
    score_demonstrations = RewardFunction.score_demonstrations

    def spy_demos(self, prompts, demos, *args, **kwargs):
        demonstrations.extend(zip(prompts, demos))
        return score_demonstrations(self, prompts, demos, *args, **kwargs)

    def spy_step(ctx, batch, *args):
        steps.append(batch)
        return train_on_batch(ctx, batch, *args)

    def spy_evaluate(self, batch, num_units=None):
        out = evaluate(self, batch, num_units)
        evaluated.append((batch, float(out[0].detach())))
        return out

    monkeypatch.setattr(trainer_mod, "train_on_batch", spy_step)
    monkeypatch.setattr(losses.RCfD, "evaluate", spy_evaluate)
    monkeypatch.setattr(RewardFunction, "score_demonstrations", spy_demos)
    train(recipe)
    (step,), ((batch, loss),) = steps, evaluated
    # each row's demonstration is one the data file gives its prompt
    data = {(row["prompt"], row["demonstration"]) for row in _rows(tiny_data_files["demos"])}
    assert [p for p, _ in demonstrations] == list(step.prompts) and set(demonstrations) <= data
    r = torch.tensor([len(t) / 10 for t in step.texts], dtype=torch.float64)
    r_demo = torch.tensor([len(d) / 10 for _, d in demonstrations], dtype=torch.float64)
    calibrated = -((r - r_demo) ** 2)
    assert calibrated.abs().max() > 0.01  # the samples do not score like their demonstrations
    pairs = calibrated.view(-1, 2)
    advantage = torch.stack([pairs[:, 0] - pairs[:, 1], pairs[:, 1] - pairs[:, 0]], 1).reshape(-1)
    logp = (batch.logprobs.detach().double() * batch.mask).sum(-1)
    assert loss == pytest.approx(float(-(advantage * logp).mean()), rel=1e-6, abs=1e-6)


def test_ppo_first_update_is_the_same_for_ten_times_the_reward(tiny_model_dir, tiny_data_files, tmp_path):
    """Whitened advantages (moments of the whole rollout batch, taken before the first step): at
    step 0 (π = π_ref, a zero critic head) the advantages scale with the reward, so r and 10·r give
    the same SGD update of the policy."""
    import rewards

    def length(scale):
        return lambda prompts, completions, **_: [scale * len(c) / 10 for c in completions]

    rewards.register(lambda: length(1.0), name="test_length_x1")
    rewards.register(lambda: length(10.0), name="test_length_x10")
    finals = {}
    for scale in ("x1", "x10"):
        recipe = make_recipe(
            tiny_model_dir,
            tiny_data_files,
            tmp_path / scale,
            "ppo",
            steps=1,
            optimizer="sgd",
            lr=0.5,
            max_grad_norm=None,
            gradient_accumulation_steps=2,
            batch_size=4,
        )
        raw = recipe.model_dump(mode="json")
        raw["reward"] = [{"name": f"test_length_{scale}"}]
        train(validate(Recipe, raw))
        finals[scale] = load_file(str(tmp_path / scale / "final" / "model.safetensors"))
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    moved = max(float((finals["x1"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4
    assert max(float((finals["x1"][k] - finals["x10"][k]).abs().max()) for k in initial) < 1e-6 * max(moved, 1)


def test_replayed_groups_keep_the_log_probs_of_the_policy_that_sampled_them(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """RLOO (``kl_from: old``) from a replay buffer: every replayed group's π_old is the one
    computed on its step's fresh rollout, before that step's update -- not the current policy's."""
    from align.replay import ReplayBuffer

    fresh_batches, trained = [], []
    add, train_on_batch = ReplayBuffer.add, trainer_mod.train_on_batch

    def spy_add(self, batch, kept, step):
        fresh_batches.append((batch, kept))
        return add(self, batch, kept, step)

    def spy_step(ctx, batch, kept):
        trained.append((batch, kept))
        return train_on_batch(ctx, batch, kept)

    monkeypatch.setattr(ReplayBuffer, "add", spy_add)
    monkeypatch.setattr(trainer_mod, "train_on_batch", spy_step)
    fields = {"steps": 4, "batch_size": 4, "lr": 5e-2, "replay": {"capacity_steps": 3, "mix": 0.5}}
    train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", **fields))
    k, groups = 2, 4

    def key(batch, g):
        rows = slice(g * k, (g + 1) * k)
        return tuple(batch.prompt_ids[rows][batch.prompt_mask[rows].bool()].tolist()), tuple(batch.texts[rows])

    sampled = {}  # a group -> (its step, its π_old when it was sampled)
    for step, (batch, kept) in enumerate(fresh_batches):
        assert kept.old_logprobs is not None
        for g in range(groups):
            sampled.setdefault(key(batch, g), (step, kept.old_logprobs[g * k : (g + 1) * k]))
    ages = []
    for step, (batch, replayed) in enumerate(trained):
        for g in range(groups):
            at, kept = sampled[key(batch, g)]
            mine = replayed.old_logprobs[g * k : (g + 1) * k]
            assert torch.equal(mine[:, : kept.shape[1]], kept) and not mine[:, kept.shape[1] :].any()
            ages.append(step - at)
    assert max(ages) > 0  # some groups were sampled by an older policy
