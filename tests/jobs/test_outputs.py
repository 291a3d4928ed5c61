"""What a run leaves for the ecosystem: a model card in final/, LoRA adapters that load from
anywhere, a merged model on request, tracker logs read back, and trackers/push checked early."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.config import RecipeError, validate
from align.jobs import train as train_job
from align.recipe import Recipe


def _raw(model_dir, data_files, run_dir, **output) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_files["pairs"])},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2},
        "output": {"dir": str(run_dir), "report": False, "sample_every": 0, **output},
    }


def test_final_has_a_model_card(tiny_model_dir, tiny_data_files, tmp_path):
    train_job.run(validate(Recipe, _raw(tiny_model_dir, tiny_data_files, tmp_path / "run")))
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["base_model"] == str(tiny_model_dir.resolve())
    assert "dpo" in header["tags"] and "objective `dpo` (β = 0.1)" in card and "2 steps" in card
    assert "## Recipe" in card and "loss" in card


def test_a_model_card_leaves_out_metrics_that_have_no_value(tiny_model_dir, tiny_data_files, tmp_path):
    """A metric logged as null (a NaN, or no sample scored) is left out of the card, not formatted."""
    from align.model_card import write_model_card

    recipe = validate(Recipe, _raw(tiny_model_dir, tiny_data_files, tmp_path / "run"))
    (tmp_path / "final").mkdir()
    write_model_card(
        tmp_path / "final", recipe, {"steps": 2}, {"reward_mean": None, "loss": 0.5, "kl_k1": float("nan")}
    )
    line = next(x for x in (tmp_path / "final" / "README.md").read_text().splitlines() if x.startswith("Final step"))
    assert line == "Final step: loss 0.5."


def test_lora_adapters_load_from_anywhere_and_merge(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tmp_path / "base"  # the tiny model with a chat template, which final_merged/ must keep
    shutil.copytree(tiny_model_dir, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(base_dir)
    relative = os.path.relpath(base_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    raw = _raw(relative, tiny_data_files, tmp_path / "run", merge_lora=True)
    raw["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}
    summary = train_job.run(validate(Recipe, raw))
    final = tmp_path / "run" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())  # not the relative recipe path
    assert yaml.safe_load((final / "README.md").read_text().split("---")[1])["library_name"] == "peft"
    monkeypatch.chdir("/")
    adapted = AutoPeftModelForCausalLM.from_pretrained(final)  # resolves the base from the adapter config
    merged = AutoModelForCausalLM.from_pretrained(summary["final_merged"])
    merged_tokenizer = AutoTokenizer.from_pretrained(summary["final_merged"])
    assert merged_tokenizer.chat_template == tokenizer.chat_template  # not only a fixed list of files
    card = (Path(summary["final_merged"]) / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert "LoRA adapters merged into the base weights" in card and "(LoRA adapters)" not in card
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_tensorboard_logs_read_back(tiny_model_dir, tiny_data_files, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = _raw(tiny_model_dir, tiny_data_files, tmp_path / "run", report_to=["tensorboard"], run_name="exp-7")
    train_job.run(validate(Recipe, raw))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "exp-7"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2]
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in losses] == pytest.approx(logged, rel=1e-6)


def test_a_tracker_that_is_not_installed_is_refused_early(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(RecipeError, match=r"output.report_to.*'trackio' is not installed \(pip install trackio\)"):
        validate(Recipe, _raw(tiny_model_dir, tiny_data_files, tmp_path / "run", report_to=["trackio"]))


def test_push_to_hub_offline_is_one_line_before_training(tiny_model_dir, tiny_data_files, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_model_dir, tiny_data_files, tmp_path / "run", push_to_hub="me/model")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "output.push_to_hub: 'me/model' cannot be reached with HF_HUB_OFFLINE set" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trackio_logs_read_back_from_its_local_store(tiny_model_dir, tiny_data_files, tmp_path):
    """trackio writes a local SQLite store (TRACKIO_DIR); the run's scalars are read back from it."""
    pytest.importorskip("trackio")
    import sqlite3

    raw = _raw(tiny_model_dir, tiny_data_files, tmp_path / "run", report_to=["trackio"], run_name="exp-9")
    raw["output"]["wandb_project"] = "align-test"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with sqlite3.connect(tmp_path / "trackio" / "align-test.db") as db:
        rows = db.execute("select run_name, step, metrics from metrics order by step").fetchall()
    assert {r[0] for r in rows} == {"exp-9"} and [r[1] for r in rows] == [1, 2]
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(r[2])["loss"] for r in rows] == pytest.approx(logged, rel=1e-6)


def test_trl_habits_report_to_none_wandb_project_from_the_environment_and_version(tmp_path, monkeypatch):
    """``report_to: none`` is no tracker (TRL's spelling); the trackers' project is the recipe's,
    else $WANDB_PROJECT, else 'align'; ``align --version`` names the installed version."""
    from importlib.metadata import version

    import align.metrics_log as metrics_log
    from align.metrics_log import MetricsLog
    from align.recipe import OutputConfig

    assert OutputConfig(report_to="none").report_to == [] and OutputConfig(report_to=["none"]).report_to == []
    seen = []

    class Fake:
        def __init__(self, run_dir, name, project, config):
            seen.append(project)

        def close(self):
            pass

    monkeypatch.setitem(metrics_log.TRACKERS, "tensorboard", Fake)
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    for given in (None, "given"):
        MetricsLog(tmp_path / f"run-{given}", 0, True, ["tensorboard"], {}, given, "name").close()
    monkeypatch.delenv("WANDB_PROJECT")
    MetricsLog(tmp_path / "run-default", 0, True, ["tensorboard"], {}, None, "name").close()
    assert seen == ["from-env", "given", "align"]
    out = subprocess.run([sys.executable, "-m", "align.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"align {version('align')}"
