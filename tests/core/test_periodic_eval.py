"""Evaluation during training (eval.every, align/periodic_eval.py): held-out metrics land in the
records of steps N, 2N, ... (metrics.jsonl and the trackers), equal to the end-of-run report's on
the final model; the best model is kept on a chosen metric; a misfit eval section is one line."""

from __future__ import annotations

import json

import pytest
from helpers import make_recipe, run_metrics

from align.config import validate
from align.jobs.report import report_on_end
from align.recipe import Recipe
from align.trainer import train

PAIR_METRICS = ("eval/reward_accuracy", "eval/reward_margin", "eval/chosen_logp", "eval/rejected_logp")


def _with(recipe: Recipe, **sections) -> Recipe:
    raw = recipe.model_dump(mode="json")
    for section, fields in sections.items():
        raw[section] = {**raw.get(section, {}), **fields}
    return validate(Recipe, raw)


@pytest.mark.parametrize("lora", [False, True])
def test_pairs_are_evaluated_every_n_steps_and_the_best_is_kept(lora, tiny_model_dir, tiny_data_files, tmp_path):
    run = tmp_path / "run"
    model = {"lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}} if lora else None
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "dpo", model=model, steps=4, lr=5e-3 if lora else 1e-3)
    recipe = _with(recipe, data={"eval_fraction": 0.2}, eval={"every": 2, "keep_best": "reward_margin"})
    evals = []
    train(recipe, on_eval=lambda step, metrics: evals.append((step, metrics)))
    records = run_metrics(run)
    assert [r["step"] for r in records if "eval/reward_margin" in r] == [2, 4]
    assert evals == [(r["step"], {k: r[k] for k in r if k.startswith("eval/")}) for r in records if r["step"] % 2 == 0]
    for record in records:
        assert all((key in record) == (record["step"] % 2 == 0) for key in PAIR_METRICS)
    last = records[-1]
    assert last["eval/reward_margin"] != 0.0  # with LoRA too: the held-out pass reads the adapters
    margins = {r["step"]: r["eval/reward_margin"] for r in records if "eval/reward_margin" in r}
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"step": max(margins, key=margins.get), "metric": "reward_margin", "value": max(margins.values())}
    assert (run / "best" / ("adapter_config.json" if lora else "config.json")).is_file()


def test_online_evaluation_is_the_reports_and_counts_wins_against_the_reference(
    tiny_model_dir, tiny_data_files, tmp_path
):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, run, "rloo", steps=4)
    raw = recipe.model_dump(mode="json")
    raw["data"]["eval_prompts"] = str(tiny_data_files["eval_prompts"])
    raw["output"]["report"] = True
    raw["eval"] = {"every": 2}
    train(validate(Recipe, raw), on_end=report_on_end)  # the report `align train` writes
    records = run_metrics(run)
    evaluated = [r for r in records if "eval/reward" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for record in evaluated:
        assert 0.0 <= record["eval/win_rate"] <= 1.0 and record["eval/kl_k1"] == record["eval/kl_k1"]
    after = json.loads((run / "report.json").read_text())["after"]
    # the same prompts, keys and final weights as the end-of-run report's "after"
    assert evaluated[-1]["eval/reward"] == pytest.approx(after["reward"], abs=1e-9)
    assert evaluated[-1]["eval/kl_k1"] == pytest.approx(after["kl_k1"], abs=1e-6)


def test_a_misfit_eval_section_is_refused(tiny_model_dir, tiny_data_files, tmp_path):
    dpo = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "dpo")
    with pytest.raises(ValueError, match="eval.every: 'dpo' is evaluated on held-out pairs: set data.eval_pairs"):
        _with(dpo, eval={"every": 2})
    with pytest.raises(ValueError, match="eval.keep_best: expected one of"):
        _with(dpo, data={"eval_fraction": 0.2}, eval={"every": 2, "keep_best": "reward"})
    with pytest.raises(ValueError, match="eval.keep_best: set eval.every"):
        _with(dpo, eval={"keep_best": "reward_margin"})
