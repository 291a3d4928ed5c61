"""`align sample RUN_DIR`: completions from the run's final/ on its eval prompts, scored, as JSONL."""

from __future__ import annotations

import json

from align import cli
from align.config import validate
from align.jobs import train as train_job
from align.recipe import Recipe


def test_sample_a_run_directory(tiny_model_dir, tiny_data_files, tmp_path):
    raw = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(tiny_data_files["prompts"]), "eval_prompts": str(tiny_data_files["eval_prompts"])},
        "objective": {"name": "rloo", "k": 2, "beta": 0.05},
        "reward": [{"name": "length", "options": {"target": 8, "unit": "chars"}}],
        "generation": {"max_new_tokens": 6},
        "train": {"steps": 1, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "report": False, "sample_every": 0},
    }
    train_job.run(validate(Recipe, raw))
    assert cli.main(["sample", str(tmp_path / "run"), "n=3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["reward"] <= 0 and "length" in r for r in rows)
    assert cli.main(["sample", str(tmp_path / "run"), "n=x"]) == 2
