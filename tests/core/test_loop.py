"""The training loop (align/trainer.py) on a tiny random GPT-2: SIGTERM and a resume equal the
uninterrupted run bit for bit (dropout on, objective state, the critic, several updates per batch,
the replay buffer); the same seed gives the same metrics; non-finite steps are skipped and
counted, and past train.max_bad_steps stop the run; replay with every group fresh is the plain
run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    SGD_LR,
    final_params,
    make_recipe,
    max_diff,
    register_test_reward,
    run_metrics,
    stop_at,
    with_rewards,
)

from align.config import RecipeError
from align.step_metrics import PHASES, TIMINGS
from align.trainer import TrainingError, train


@pytest.mark.parametrize("key", ["dpo", "rloo", "reinforce", "rloo_whitened", "ppo"])
def test_resume_is_exact(key, tiny_model_dir, tiny_data_files, tmp_path):
    """SIGTERM at step 2 saves a checkpoint; resuming to step 4 equals the uninterrupted run bit for bit.

    Dropout stays on (the tiny GPT-2 has p = 0.1), so the training forward draws random numbers
    and a resume that did not restore the RNG states would diverge; REINFORCE's running baseline
    is objective state that must round-trip too, and PPO's critic (weights and optimizer state)."""
    dropout = {"disable_dropout": False}
    straight = tmp_path / "straight"
    train(make_recipe(tiny_model_dir, tiny_data_files, straight, key, model=dropout, steps=4, batch_size=4))

    interrupted = tmp_path / "interrupted"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, interrupted, key, model=dropout, steps=4, batch_size=4)

    summary = train(recipe, on_step=stop_at(2))
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2
    assert (interrupted / "checkpoints" / "step-000002" / "model" / "model.safetensors").is_file()
    assert not list((interrupted / "checkpoints").glob(".tmp-*"))
    resumed = recipe.model_copy(update={"resume": "latest"})
    assert train(resumed)["steps"] == 4

    a, b = final_params(straight), final_params(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = TIMINGS
    clean = [
        [{k: v for k, v in r.items() if k not in drop} for r in run_metrics(run)] for run in (straight, interrupted)
    ]
    assert clean[0] == clean[1]


@pytest.mark.parametrize("key, mini_batches", [("grpo", 1), ("ppo", 1), ("ppo", 2)])
def test_resume_is_exact_with_several_updates_per_batch(key, mini_batches, tiny_model_dir, tiny_data_files, tmp_path):
    """GRPO and PPO (with its critic), 2 passes per batch (in 2 mini-batches too), a linear
    schedule over all of their updates: SIGTERM at step 2 and a resume to 4 equal the
    uninterrupted run bit for bit (the scheduler's count included)."""
    fields = {"steps": 4, "batch_size": 4 // mini_batches, "updates_per_batch": 2, "mini_batches": mini_batches}
    straight, interrupted = _straight_and_resumed(
        tmp_path, lambda run: make_recipe(tiny_model_dir, tiny_data_files, run, key, **fields)
    )
    lrs = [r["lr"] for r in run_metrics(straight)]
    assert lrs == [r["lr"] for r in run_metrics(interrupted)] and lrs[-1] == 0.0  # 8 updates scheduled, 8 taken


def test_same_seed_same_metrics(tiny_model_dir, tiny_data_files, tmp_path):
    drop = TIMINGS
    runs = []
    for name in ("a", "b"):
        train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / name, "rloo", steps=2, batch_size=4))
        runs.append([{k: v for k, v in r.items() if k not in drop} for r in run_metrics(tmp_path / name)])
    assert runs[0] == runs[1]
    for record in run_metrics(tmp_path / "a"):  # where the step went: phases inside the step's time
        phases = [record[k] for k in PHASES]
        assert min(phases) > 0 and sum(phases) <= record["step_s"]


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_model_dir, tiny_data_files, tmp_path):
    recipe = make_recipe(
        tiny_model_dir, tiny_data_files, tmp_path / "nan", "sft", steps=20, lr=1e30, max_grad_norm=None, max_bad_steps=3
    )
    with pytest.raises(TrainingError, match=r"4 steps skipped for non-finite values \(train.max_bad_steps=3\)"):
        train(recipe)
    records = run_metrics(tmp_path / "nan")
    # the step that ends the run is logged and checkpointed before the error
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3, 4, 5]  # step 1 is finite
    assert (tmp_path / "nan" / "checkpoints" / "step-000005" / "trainer_state.pt").is_file()
    assert not (tmp_path / "nan" / ".lock").exists()  # the lock is released on an error too


def test_nan_reward_skips_the_step_and_counts_it(tiny_model_dir, tiny_data_files, tmp_path):
    register_test_reward(
        "nan_on_second_call",
        lambda n, c: [float("nan") if n == 2 and i == 0 else 1.0 * len(x) for i, x in enumerate(c)],
    )
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=3, batch_size=4)
    recipe = with_rewards(recipe, "nan_on_second_call")
    summary = train(recipe)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1
    records = run_metrics(tmp_path / "run")
    assert [bool(r.get("skipped")) for r in records] == [False, True, False]


def test_replay_with_every_group_fresh_is_the_plain_run(tiny_model_dir, tiny_data_files, tmp_path):
    """train.replay with mix 1 trains on exactly the fresh groups: the weights equal the run
    without a buffer (the buffer's re-padding and re-batching change nothing)."""
    fields = {"optimizer": "sgd", "lr": SGD_LR["copg"], "max_grad_norm": None, "batch_size": 4, "steps": 3}
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    train(make_recipe(tiny_model_dir, tiny_data_files, plain, "copg", **fields))
    train(
        make_recipe(tiny_model_dir, tiny_data_files, mixed, "copg", replay={"capacity_steps": 2, "mix": 1.0}, **fields)
    )
    assert max_diff(final_params(plain), final_params(mixed)) < 1e-6
    assert all(r["replayed_fraction"] == 0 for r in run_metrics(mixed))


@pytest.mark.parametrize("key", ["copg", "rloo"])  # rloo: the buffer keeps its groups' sampler log-probs
def test_replay_trains_on_past_groups_and_resumes_exactly(key, tiny_model_dir, tiny_data_files, tmp_path):
    """capacity 3, mix 0.5: half of each step's groups come from the last 3 steps (ages up to 2);
    the buffer is saved in the checkpoint, so SIGTERM at step 2 and a resume to 4 equal the
    uninterrupted run bit for bit; an offline objective is refused the buffer."""
    fields = {"steps": 4, "batch_size": 4, "replay": {"capacity_steps": 3, "mix": 0.5}}
    straight, _ = _straight_and_resumed(
        tmp_path, lambda run: make_recipe(tiny_model_dir, tiny_data_files, run, key, **fields)
    )
    records = run_metrics(straight)
    assert [r["replayed_fraction"] for r in records] == [0.5] * 4
    assert records[0]["replay_age"] == 0 and max(r["replay_age"] for r in records) > 0
    with pytest.raises(RecipeError, match=r"train.replay: 'dpo' is trained on a fixed dataset"):
        make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "x", "dpo", replay={"capacity_steps": 2})


def _straight_and_resumed(tmp_path: Path, recipe_for) -> tuple[Path, Path]:
    """``recipe_for(run_dir)`` trained straight through, and again stopped by SIGTERM after step 2
    then resumed to the end: asserts the two end with bit-identical weights; their run directories."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(recipe_for(straight))
    recipe = recipe_for(interrupted)
    assert train(recipe, on_step=stop_at(2))["steps"] == 2
    assert train(recipe.model_copy(update={"resume": "latest"}))["steps"] == recipe.train.steps
    a, b = final_params(straight), final_params(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight, interrupted


def test_epochs_become_steps_over_every_row(tiny_model_dir, tiny_data_files, tmp_path):
    """train.epochs (offline): steps = ceil(epochs × rows / rows per step); two epochs of a step
    size that divides the data see every pair exactly twice. Online, or beside train.steps: refused."""
    import math

    from align.config import validate
    from align.data import step_rows
    from align.recipe import Recipe

    raw = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "dpo").model_dump(mode="json")
    pairs = sum(1 for line in Path(tiny_data_files["pairs"]).read_text().splitlines() if line.strip())
    del raw["train"]["steps"]
    raw["train"].update(epochs=2, batch_size=7)
    summary = train(validate(Recipe, raw))
    assert summary["steps"] == math.ceil(2 * pairs / 7)
    assert pairs % 7 == 0  # the fixture's 35 pairs: two epochs are whole steps
    seen = [row for step in range(summary["steps"]) for row in step_rows(pairs, step, 7, raw["train"]["seed"])]
    assert sorted(seen) == sorted(list(range(pairs)) * 2)
    with pytest.raises(ValueError, match="give train.steps or train.epochs, not both"):
        validate(Recipe, {**raw, "train": {**raw["train"], "steps": 3}})
    online = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "online", "rloo").model_dump(mode="json")
    del online["train"]["steps"]
    online["train"]["epochs"] = 1
    with pytest.raises(ValueError, match="train.epochs: 'rloo' samples fresh completions every step"):
        validate(Recipe, online)
