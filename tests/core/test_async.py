"""Rollouts generated ahead of training (train.async, align/async_rollouts.py) on a tiny GPT-2:
fixed N = 0 is the synchronous loop bit for bit; fixed N = 2 trains step t on samples of the
weights of step t − 2 exactly (their log-probs recomputed under the saved weights) and resumes
bit for bit after SIGTERM; bounded never trains on samples older than N, even with a slow trainer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import SGD_LR, final_params, make_recipe, run_metrics, stop_at

import align.async_rollouts as async_mod
from align.config import RecipeError
from align.logprobs import completion_logprobs
from align.step_metrics import TIMINGS
from align.trainer import train


def recipe(model_dir, data, run: Path, n: int | None, mode: str = "fixed", **fields):
    extra = {} if n is None else {"async": {"max_staleness": n, "mode": mode}}
    sgd = {"optimizer": "sgd", "lr": SGD_LR["rloo"], "max_grad_norm": None}
    return make_recipe(model_dir, data, run, "rloo", **{"steps": 4, "batch_size": 4, **sgd, **extra, **fields})


def clean(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in run_metrics(run)]


def test_fixed_zero_is_the_synchronous_loop(tiny_model_dir, tiny_data_files, tmp_path):
    train(recipe(tiny_model_dir, tiny_data_files, tmp_path / "sync", None))
    train(recipe(tiny_model_dir, tiny_data_files, tmp_path / "n0", 0))
    a, b = final_params(tmp_path / "sync"), final_params(tmp_path / "n0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = clean(tmp_path / "n0")
    assert [r.pop("staleness") for r in records] == [0.0] * 4
    assert records == clean(tmp_path / "sync")


def test_fixed_two_samples_with_the_weights_of_two_steps_before(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """Every step's samples: their recorded log-probs equal a fresh forward of the checkpoint of
    version t − 2 (1e-5), and not of step t's own weights; the run keeps its importance correction."""
    from transformers import AutoModelForCausalLM

    taken: list[tuple[int, object]] = []
    real_take = async_mod.AheadRollouts.take

    def spy(self, step):
        rollout, metrics = real_take(self, step)
        taken.append((step, rollout))
        return rollout, metrics

    monkeypatch.setattr(async_mod.AheadRollouts, "take", spy)
    run = tmp_path / "n2"
    every_step = recipe(tiny_model_dir, tiny_data_files, run, 2)
    every_step.output.save_every, every_step.output.keep_last = 1, 10  # each version's weights kept
    summary = train(every_step)
    assert summary["steps"] == 4
    records = run_metrics(run)
    assert [r["staleness"] for r in records] == [0.0, 1.0, 2.0, 2.0]
    assert all("is_ratio_mean" in r for r in records)  # stale samples: TRL's correction applies by default

    def weights(version: int):
        path = tiny_model_dir if version == 0 else run / "checkpoints" / f"step-{version:06d}" / "model"
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    temperature = 1.0
    for step, rollout in taken:
        assert rollout.policy_version == max(0, step - 2)
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, temperature)
        mask = rollout.completion_mask.bool()
        with torch.no_grad():
            sampler = completion_logprobs(weights(rollout.policy_version), *args)
            current = completion_logprobs(weights(step), *args)
        assert float((sampler - rollout.sampler_logprobs)[mask].abs().max()) < 1e-5, step
        if step >= 1:  # the weights moved since: the recorded log-probs are not the trained policy's
            assert float((current - rollout.sampler_logprobs)[mask].abs().max()) > 1e-3, step


def test_fixed_resumes_bit_for_bit(tiny_model_dir, tiny_data_files, tmp_path):
    """SIGTERM after step 2 (with the rollouts of steps 3 and 4 in flight) and a resume equal the
    uninterrupted run: weights and every logged number."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(recipe(tiny_model_dir, tiny_data_files, straight, 2))
    stopped = recipe(tiny_model_dir, tiny_data_files, interrupted, 2)
    assert train(stopped, on_step=stop_at(2))["steps"] == 2
    assert train(stopped.model_copy(update={"resume": "latest"}))["steps"] == 4
    a, b = final_params(straight), final_params(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert clean(straight) == clean(interrupted)


def test_bounded_never_trains_on_samples_older_than_n(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """A trainer slower than the generator: the generator runs ahead as far as N allows."""
    import align.trainer as trainer_mod

    real = trainer_mod.train_on_batch

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_on_batch", slow)
    run = tmp_path / "bounded"
    train(recipe(tiny_model_dir, tiny_data_files, run, 1, "bounded", steps=6))
    records = run_metrics(run)
    staleness = [r["staleness"] for r in records]
    assert len(staleness) == 6 and max(staleness) <= 1
    assert max(staleness[1:]) == 1  # it did run ahead
    assert max(r["generator_wait_s"] for r in records) > 0.2  # ... then waited for the slow trainer's weights


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objective": {"name": "dpo", "beta": 0.1}}, "train.async: 'dpo' is trained on a fixed dataset"),
        ({"train": {"replay": {"capacity_steps": 2}}}, "train.async: with train.replay"),
        ({"generation": {"engine": "vllm"}}, "train.async.mode: bounded generates beside training, with the native"),
    ],
)
def test_bad_async_recipes_are_one_line(change, message, tiny_model_dir, tiny_data_files, tmp_path):
    from align.config import validate
    from align.recipe import Recipe

    raw = recipe(tiny_model_dir, tiny_data_files, tmp_path / "r", 1, "bounded").model_dump(mode="json")
    for section, values in change.items():
        raw[section] = {**raw[section], **values} if section != "objective" else values
    if "objective" in change:
        raw["data"] = {"train": str(tiny_data_files["pairs"])}
    with pytest.raises(RecipeError) as err:
        validate(Recipe, raw)
    assert message in str(err.value) and "\n" not in str(err.value)
