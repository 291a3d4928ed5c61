"""The optimizer step (align/step.py) on a tiny random GPT-2: the loss is normalised over the whole
step, not per micro-batch (batch 8 × 1 == 1 × 8 == 2 × 4 for every objective, plain SGD); the
loss's policy and reference log-probs are at the sampling temperature, from the rollout's kept
softmax or a fresh forward; several updates per batch and mini-batches read π_old from the policy
that sampled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import GENERATION, LENGTH, OBJECTIVES, SGD_LR, final_params, make_recipe, max_diff, run_metrics
from safetensors.torch import load_file

import losses
from align.trainer import train


def _record_reuse_decisions(monkeypatch) -> list[bool]:
    """Every ``reuse_sampler_probs`` decision of the runs that follow, in order."""
    import align.run_setup as setup_mod

    decisions: list[bool] = []
    decide = setup_mod.reuse_sampler_probs

    def spy(*args, **kwargs) -> bool:
        decisions.append(decide(*args, **kwargs))
        return decisions[-1]

    monkeypatch.setattr(setup_mod, "reuse_sampler_probs", spy)
    return decisions


@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_gradient_accumulation_equivalence(key, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """batch 8 × accumulation 1 == batch 1 × accumulation 8 == batch 2 × 4, for every objective.

    Plain SGD without clipping: the update is lr × gradient, so a loss normalised per
    micro-batch instead of per step (a uniform scale error that Adam would hide) shows. For the
    online objectives 8 × 1 also takes the policy's log-probs from the rollout's softmax (one
    micro-batch) and the others from a full forward: the same gradient either way."""
    reused = _record_reuse_decisions(monkeypatch)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    results = {}
    for batch, accumulation in [(8, 1), (1, 8), (2, 4)]:
        run = tmp_path / f"b{batch}x{accumulation}"
        summary = train(
            make_recipe(
                tiny_model_dir,
                tiny_data_files,
                run,
                key,
                batch_size=batch,
                gradient_accumulation_steps=accumulation,
                optimizer="sgd",
                lr=SGD_LR[key],
                max_grad_norm=None,
            )
        )
        assert summary["skipped_steps"] == 0
        assert not reused or all(reused) == (accumulation == 1)
        reused.clear()
        results[(batch, accumulation)] = final_params(run)
    reference = results[(8, 1)]
    shared = reference.keys() & initial.keys()
    moved = max_diff({k: reference[k] for k in shared}, {k: initial[k] for k in shared})
    assert moved > 1e-4, "nothing trained"
    if "values" in losses.REGISTRY[OBJECTIVES[key][0]["name"]].needs:  # the critic trained too
        head = reference["critic.value_head.weight"]
        assert float(head.abs().max()) > 1e-4 and any(k.startswith("critic.backbone.") for k in reference)
    for config, params in results.items():
        assert max_diff(reference, params) < 2e-5, f"{key}: {config} differs from 8x1"
    if OBJECTIVES[key][1] == "prompts":
        lengths = {r["completion_length"] for r in run_metrics(tmp_path / "b8x1")}
        assert all(0 < x < GENERATION["max_new_tokens"] for x in lengths), "completions should end early and unevenly"


def test_sampler_probs_are_kept_only_within_their_memory_cap(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """The kept softmax is [max_new_tokens, rows, V] fp32; above the cap the training forward
    computes the log-probs itself -- and trains to the same weights."""
    import align.batches as batches_mod

    decisions = _record_reuse_decisions(monkeypatch)
    sgd = dict(optimizer="sgd", lr=SGD_LR["rloo"], max_grad_norm=None)
    train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "kept", "rloo", **sgd))
    assert decisions and all(decisions)
    vocab = final_params(tmp_path / "kept")["transformer.wte.weight"].shape[0]
    needed = GENERATION["max_new_tokens"] * 8 * OBJECTIVES["rloo"][0]["k"] * vocab * 4
    monkeypatch.setattr(batches_mod, "KEEP_PROBS_MAX_BYTES", needed - 1)
    decisions.clear()
    train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "recomputed", "rloo", **sgd))
    assert decisions and not any(decisions)
    assert max_diff(final_params(tmp_path / "kept"), final_params(tmp_path / "recomputed")) < 2e-5


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept_softmax", "recomputed"])
def test_loss_logprobs_are_at_the_sampling_temperature(
    keep_probs, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """At generation.temperature 0.7 the policy and reference log-probs the loss sees, and the
    SGD update they produce, equal an independent log_softmax(logits / T) on the sampled tokens.

    Both paths: the rollout's kept softmax (whose backward divides by T itself) and a fresh
    training forward. Step 1's policy is the initial model, so the independent forward needs no
    trainer code."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    import align.batches as batches_mod
    import align.step as step_mod

    temperature, lr = 0.7, 0.05
    decisions = _record_reuse_decisions(monkeypatch)
    if not keep_probs:
        monkeypatch.setattr(batches_mod, "KEEP_PROBS_MAX_BYTES", 0)
    forwards, micro_batches = [], []
    real_logprobs, real_loss_batch = step_mod.completion_logprobs, step_mod.loss_batch

    def spy_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *args, **kwargs):
        out = real_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *args, **kwargs)
        if torch.is_grad_enabled():  # the policy's forward; the reference runs under no_grad
            forwards.append((prompt_ids, prompt_mask, completion_ids, completion_mask))
        return out

    def spy_loss_batch(batch, logprobs, rows=None, **kwargs):
        out = real_loss_batch(batch, logprobs, rows=rows, **kwargs)
        if kwargs.get("mask") is not None:  # a micro-batch's (the step's whole batch passes no mask)
            micro_batches.append(out)
        return out

    monkeypatch.setattr(step_mod, "completion_logprobs", spy_logprobs)
    monkeypatch.setattr(step_mod, "loss_batch", spy_loss_batch)
    recipe = make_recipe(
        tiny_model_dir,
        tiny_data_files,
        tmp_path / "run",
        "rloo",
        generation={"temperature": temperature},
        steps=1,
        optimizer="sgd",
        lr=lr,
        lr_scheduler="constant",
        max_grad_norm=None,
    )
    train(recipe)
    assert decisions == [keep_probs]
    assert len(forwards) == len(micro_batches) == 1

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    (prompt_ids, prompt_mask, completion_ids, completion_mask), micro = forwards[0], micro_batches[0]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, -(width + 1) : -1]
    expected = torch.log_softmax(logits.double() / temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    expected = (expected * completion_mask).float()
    assert completion_mask.sum() > 0
    assert (micro.logprobs.detach() - expected.detach()).abs().max() < 1e-4
    assert (micro.ref_logprobs - expected.detach()).abs().max() < 1e-4  # reference = policy at step 1
    # a wrong temperature moves these log-probs by far more than the tolerance
    at_one = torch.log_softmax(logits.double(), -1).gather(-1, completion_ids[..., None])[..., 0] * completion_mask
    assert (at_one.float() - expected).abs().max() > 0.05

    objective = recipe.objective.build()
    loss, _ = objective(replace(micro, logprobs=expected), num_units=objective.count_units(micro))
    loss.backward()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    final = final_params(tmp_path / "run")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    biggest = max(float(g.abs().max()) for g in grads.values())
    assert biggest > 1e-3, "no gradient"
    for name, grad in grads.items():
        update = (initial[name] - final[name]) / lr
        assert (update - grad).abs().max() < 1e-3 * biggest, f"{name}: SGD update != lr × independent gradient"


TIGHT = {  # the objective with a tight clip, and an SGD step size that makes later updates clip
    "grpo_tight": ({"name": "grpo", "beta": 0.04, "k": 2, "options": {"clip_low": 0.01, "clip_high": 0.01}}, 3.0),
    "ppo_tight": ({"name": "ppo", "beta": 0.04, "k": 2, "options": {"clip": 0.01, "value_clip": 0.01}}, 0.5),
}


@pytest.mark.parametrize("tight", list(TIGHT))
def test_several_updates_per_batch_keep_pi_old(tight, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """train.updates_per_batch: 3 on GRPO with a tight clip: the later updates read their ratios
    against the sampling policy's log-probs (kept from the first), so they clip; were π_old taken
    from the current weights, every ratio would be 1 and nothing would clip. The scheduler counts
    every update, and 8 × 1 == 2 × 4 still holds with several updates. PPO's critic keeps V_old
    the same way (its value clip reads it)."""
    objective, lr = TIGHT[tight]
    monkeypatch.setitem(OBJECTIVES, tight, (objective, "prompts", {"reward": LENGTH}))
    results, clip = {}, {}
    for batch, accumulation in [(8, 1), (2, 4)]:
        run = tmp_path / f"b{batch}x{accumulation}"
        summary = train(
            make_recipe(
                tiny_model_dir,
                tiny_data_files,
                run,
                tight,
                batch_size=batch,
                gradient_accumulation_steps=accumulation,
                updates_per_batch=3,
                optimizer="sgd",
                lr=lr,
                max_grad_norm=None,
                lr_scheduler="constant",
            )
        )
        assert summary["skipped_steps"] == 0 and summary["steps"] == 2
        results[(batch, accumulation)] = final_params(run)
        clip[(batch, accumulation)] = [r["clip_fraction"] for r in run_metrics(run)]
    assert max_diff(results[(8, 1)], results[(2, 4)]) < 2e-5
    assert all(c > 0 for c in clip[(8, 1)]), clip  # the last update of each batch clips
    one = train(
        make_recipe(
            tiny_model_dir,
            tiny_data_files,
            tmp_path / "one",
            tight,
            batch_size=8,
            optimizer="sgd",
            lr=lr,
            max_grad_norm=None,
            lr_scheduler="constant",
        )
    )
    assert one["steps"] == 2 and all(r["clip_fraction"] == 0 for r in run_metrics(tmp_path / "one"))


def test_mini_batches_step_once_each_against_pi_old(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """train.mini_batches: 2 with one pass: the rollout draws 2 × batch_size prompts (the same 8
    as a batch-8 run: its first step's reward mean, averaged over the mini-batches, is the same
    number), each mini-batch is one optimizer step (the linear schedule ends at 0 after 4), and
    the second mini-batch's ratios read the policy that sampled, so a tight clip clips with a
    single pass; 4 × 1 == 2 × 2 inside each mini-batch."""
    objective, lr = TIGHT["grpo_tight"]
    monkeypatch.setitem(OBJECTIVES, "grpo_tight", (objective, "prompts", {"reward": LENGTH}))
    sgd = {"optimizer": "sgd", "lr": lr, "max_grad_norm": None}
    results, records = {}, {}
    for batch, accumulation in [(4, 1), (2, 2)]:
        run = tmp_path / f"b{batch}x{accumulation}"
        fields = {"batch_size": batch, "gradient_accumulation_steps": accumulation, "mini_batches": 2}
        summary = train(make_recipe(tiny_model_dir, tiny_data_files, run, "grpo_tight", **fields, **sgd))
        assert summary["skipped_steps"] == 0 and summary["steps"] == 2
        results[(batch, accumulation)], records[(batch, accumulation)] = final_params(run), run_metrics(run)
    assert max_diff(results[(4, 1)], results[(2, 2)]) < 2e-5
    steps = records[(4, 1)]
    assert all(r["clip_fraction"] > 0 for r in steps), steps
    assert steps[-1]["lr"] == 0.0 and steps[0]["lr"] == pytest.approx(lr / 2)  # 4 updates scheduled, 2 taken by step 1
    whole = tmp_path / "whole"
    train(make_recipe(tiny_model_dir, tiny_data_files, whole, "grpo_tight", batch_size=8, steps=1, **sgd))
    first = run_metrics(whole)[0]
    assert first["clip_fraction"] == 0
    for key in ("reward_mean", "completion_length", "tokens"):
        assert steps[0][key] == pytest.approx(first[key], rel=1e-6), key


def test_frac_reward_zero_std_counts_the_groups_without_signal(tiny_model_dir, tiny_data_files, tmp_path):
    """TRL's ``frac_reward_zero_std``: groups whose samples all got the same reward, over the
    groups -- by hand on three groups, and logged by a run (a constant reward: every group)."""
    from align.step_metrics import zero_std_groups

    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0], dtype=torch.float64)
    assert zero_std_groups(rewards, torch.tensor([4, 4, 7, 7, 9, 9])) == (2.0, 3.0)
    assert zero_std_groups(rewards[:2], torch.tensor([0, 1])) == (2.0, 2.0)  # one sample: nothing to compare
    from helpers import register_test_reward, with_rewards

    register_test_reward("constant_one", lambda n, c: [1.0] * len(c))
    recipe = with_rewards(
        make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=1), "constant_one"
    )
    train(recipe)
    assert run_metrics(tmp_path / "run")[0]["frac_reward_zero_std"] == 1.0
