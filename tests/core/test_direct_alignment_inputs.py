"""What SimPO, ORPO and KTO are fed (align/run_data.py, align/recipe.py, align/evaluation.py): bad
input is one line, exit 2, before any model loads; a reference-free objective never loads or runs a
reference, its held-out evaluation included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align import cli


def _write_recipe(tmp_path: Path, model_dir, data: Path, objective: str) -> str:
    path = tmp_path / "recipe.yaml"
    recipe = {
        "model": {"path": str(model_dir)},
        "data": {"train": str(data)},
        "objective": {"name": objective},
        "output": {"dir": str(tmp_path / "run")},
    }
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _no_model_loads(monkeypatch) -> None:
    import align.run_setup as setup

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(setup, "load_models", refuse)


@pytest.mark.parametrize(
    "objective, data_key, overrides, message",
    [
        ("kto", "pairs", [], "'kto' takes unpaired (prompt, completion, label) rows (TRL's unpaired preference"),
        ("kto", "sft", [], "missing column 'label': 'kto' takes unpaired (prompt, completion, label) rows"),
        ("simpo", "pairs", ["reference=/any/model"], "reference: 'simpo' is reference-free"),
        ("orpo", "pairs", ["reference=/any/model"], "reference: 'orpo' is reference-free"),
        ("sft", "sft", ["reference=/any/model"], "reference: 'sft' is reference-free"),
        ("orpo", "prompts", [], "missing columns ['chosen', 'rejected']: 'orpo' trains on preference pairs"),
        ("simpo", "pairs", ["objective.options.simpo_gamma=-1"], "simpo: simpo_gamma must be >= 0"),
        ("kto", "unpaired", ["objective.options.desirable_weight=-1"], "kto: desirable_weight must be >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_model_loads(
    objective, data_key, overrides, message, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch, capsys
):
    _no_model_loads(monkeypatch)
    recipe = _write_recipe(tmp_path, tiny_model_dir, tiny_data_files[data_key], objective)
    assert cli.main(["train", recipe, *overrides]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("align train: ") and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_kto_reads_labels_as_rows(tiny_model_dir, tiny_data_files) -> None:
    """The unpaired file's rows, each with its label as 1.0 / 0.0; a bad label names the row."""
    from transformers import AutoTokenizer

    from align.config import validate
    from align.data import DataError
    from align.recipe import Recipe
    from align.run_data import OfflineData

    raw = {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(tiny_data_files["unpaired"])}}
    recipe = validate(Recipe, {**raw, "objective": {"name": "kto"}})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    rows = [json.loads(line) for line in tiny_data_files["unpaired"].read_text().splitlines()]
    assert not data.paired and len(data) == len(rows) and len(data.completion_ids) == 1
    assert data.labels == [1.0 if row["label"] else 0.0 for row in rows] and 0 < sum(data.labels) < len(rows)
    bad = tiny_data_files["unpaired"].parent.parent / "bad_label.jsonl"
    bad.write_text('{"prompt": "the film", "completion": " was good .", "label": "yes"}\n')
    recipe = validate(Recipe, {**raw, "data": {"train": str(bad)}, "objective": {"name": "kto"}})
    with pytest.raises(DataError, match="row 0: column 'label' must be true/false, got 'yes'"):
        OfflineData(recipe, tokenizer, tokenizer.eos_token_id)


def test_reference_free_objective_never_loads_or_runs_a_reference(
    tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """SimPO through the trainer, its evaluation every step and the end-of-run report on held-out
    pairs: no reference is loaded and none runs (both would raise here)."""
    import align.batches
    import align.evaluation
    import align.jobs.report
    import align.models
    import align.step
    from align.config import validate
    from align.recipe import Recipe
    from align.trainer import train

    def refuse(*args, **kwargs):
        raise AssertionError("a reference was loaded or run")

    for module in (align.models, align.jobs.report):
        monkeypatch.setattr(module, "load_reference", refuse)
    for module in (align.step, align.batches, align.evaluation):
        monkeypatch.setattr(module, "reference_model", refuse)
    raw = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(tiny_data_files["pairs"]), "eval_fraction": 0.25},
        "objective": {"name": "simpo"},
        "train": {"steps": 2, "batch_size": 4},
        "eval": {"every": 1},
        "output": {"dir": str(tmp_path / "run"), "sample_every": 0},
    }
    summary = train(validate(Recipe, raw), on_end=align.jobs.report.report_on_end)
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/reward_accuracy" in r for r in records)
    held = summary["held_out_pairs"]
    assert "loglik_accuracy_reference" not in held
    # with no reference the implicit reward is β·ℓ_π: its accuracy is the policy's log-likelihood accuracy
    assert held["reward_accuracy"] == held["loglik_accuracy"]
