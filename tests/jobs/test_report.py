"""The end-of-run report: rewards get their dataset columns, eval prompts are rendered like
training prompts, the prompts are labelled for what they are, and a failing report never fails
a finished run."""

from __future__ import annotations

import json

from helpers import write_jsonl

from align.config import validate
from align.jobs import train as train_job
from align.recipe import Recipe


def _recipe(model_dir, train_file, run_dir, reward: list, eval_file=None, **data) -> Recipe:
    return validate(
        Recipe,
        {
            "model": {"path": str(model_dir)},
            "data": {"train": str(train_file), **({"eval_prompts": str(eval_file)} if eval_file else {}), **data},
            "objective": {"name": "rloo", "beta": 0.05, "k": 2},
            "reward": reward,
            "generation": {"max_new_tokens": 6},
            "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "seed": 0},
            "output": {"dir": str(run_dir), "report": True, "sample_every": 0},
        },
    )


def test_a_reward_reading_a_column_is_given_it_in_the_report(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"the plot {i}", "reference": "was good ."} for i in range(8)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[:4])
    rouge = [{"name": "rouge", "options": {"reference_column": "reference"}}]
    summary = train_job.run(_recipe(tiny_model_dir, train_file, tmp_path / "run", rouge, eval_file))
    assert "report_error" not in summary
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.0 <= report["before"]["reward"] <= 1.0 and "rouge" in report["before"]["components"]
    assert "held-out prompts (4)" in (tmp_path / "run" / "report.md").read_text()


def test_eval_prompts_are_rendered_like_training_prompts(tiny_model_dir, tiny_data_files, tmp_path):
    recipe = _recipe(
        tiny_model_dir,
        tiny_data_files["prompts"],
        tmp_path / "run",
        [{"name": "length", "options": {"target": 8}}],
        tiny_data_files["eval_prompts"],
        prompt_template="Review: {prompt}",
    )
    train_job.run(recipe)
    samples = json.loads((tmp_path / "run" / "report.json").read_text())["samples"]
    assert samples and all(s["prompt"].startswith("Review: ") for s in samples)


def test_without_an_eval_set_the_report_says_training_prompts(tiny_model_dir, tiny_data_files, tmp_path):
    length = [{"name": "length", "options": {"target": 8}}]
    train_job.run(_recipe(tiny_model_dir, tiny_data_files["prompts"], tmp_path / "run", length))
    text = (tmp_path / "run" / "report.md").read_text()
    assert "training prompts (no data.eval_prompts)" in text and "held-out" not in text


def test_a_failing_report_leaves_the_finished_run_intact(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch, capsys
):
    import align.jobs.report as report

    def broken(*args, **kwargs):
        raise ValueError("scorer exploded\nsecond line")

    monkeypatch.setattr(report, "evaluate_policy", broken)
    length = [{"name": "length", "options": {"target": 8}}]
    recipe = _recipe(
        tiny_model_dir, tiny_data_files["prompts"], tmp_path / "run", length, tiny_data_files["eval_prompts"]
    )
    summary = train_job.run(recipe)
    assert summary["report_error"] == "ValueError: scorer exploded" and summary["steps"] == 1
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "The report failed: ValueError: scorer exploded" in (tmp_path / "run" / "report.md").read_text()
    err = capsys.readouterr().err
    assert "align: the end-of-run report failed (ValueError: scorer exploded)" in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["report_error"] == "ValueError: scorer exploded"
