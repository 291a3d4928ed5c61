"""Loading models (align/models.py): a model id that cannot be resolved is one line naming the
field, the id and the fix, exit 2, before any weights load; a hub id and a local directory load
through one path; the LoRA reference is the base with adapters off, in eval mode; the reference
is loaded only when the objective reads it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import final_params, make_recipe, max_diff, run_metrics

from align.config import validate
from align.recipe import Recipe
from align.trainer import train


def _overrides(field: str, model_dir, data_files, tmp_path) -> list[str]:
    """A DPO run whose ``field`` names a hub id that is nowhere."""
    return [
        f"model.path={model_dir}",
        f"data.train={data_files['pairs']}",
        "objective.name=dpo",
        f"output.dir={tmp_path / 'run'}",
        f"{field}=align-tests/not-cached-anywhere",
    ]


@pytest.mark.parametrize("field", ["model.path", "reference"])
def test_an_unresolvable_hub_id_is_one_line_with_the_fix(field, tiny_model_dir, tiny_data_files, tmp_path):
    overrides = _overrides(field, tiny_model_dir, tiny_data_files, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "quickstart", "prepare=null", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(f"align train: {field}: cannot load")
    assert "'align-tests/not-cached-anywhere'" in lines[0] and "hf download align-tests/not-cached-anywhere" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("field", ["model.path", "reference"])
def test_an_unreachable_hub_is_one_line_without_retries(field, tiny_model_dir, tiny_data_files, tmp_path):
    """Without HF_HUB_OFFLINE and with the hub unreachable (here: an endpoint nobody listens on),
    the run probes the hub once, goes offline, and fails in one line -- not after ~50 s of retries."""
    overrides = _overrides(field, tiny_model_dir, tiny_data_files, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: connection refused at once
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "quickstart", "prepare=null", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=40,  # the retries this replaces took ~50 s
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "127.0.0.1 cannot be reached; loading from the local Hugging Face cache only" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"align train: {field}: cannot load"), done.stderr[-2000:]
    assert "hf download align-tests/not-cached-anywhere" in lines[0]


def test_local_directory_and_hub_id_share_one_path(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """A hub id resolves through the HF cache (offline here) into the same loading code as a local path."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--align-tests--tiny" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--align-tests--tiny" / "refs").mkdir()
    (cache / "models--align-tests--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    local = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "local", "dpo", steps=1)
    hub = make_recipe("align-tests/tiny", tiny_data_files, tmp_path / "hub_run", "dpo", steps=1)
    train(local)
    train(hub)
    assert max_diff(final_params(tmp_path / "local"), final_params(tmp_path / "hub_run")) == 0.0


def test_lora_reference_runs_in_eval_mode_when_the_policy_trains_with_dropout(tiny_model_dir):
    """Adapters off is the reference only without dropout: inside ``reference_model`` the policy
    is in eval mode (two forwards agree, and equal the base model's), and training resumes after."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.models import Models, reference_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["c_attn"], task_type="CAUSAL_LM"),
    ).train()
    models = Models(policy, None, None, None, 0, adapters=True)
    torch.manual_seed(0)
    with torch.no_grad(), reference_model(models) as ref:
        first, second = ref(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(first, second)
    assert (first - expected).abs().max() < 1e-5
    assert policy.training
    with torch.no_grad():
        assert (policy(input_ids=ids).logits - expected).abs().max() > 1e-3  # dropout (p = 0.1) is on


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, tiny_data_files, tmp_path):
    """LoRA: no second model in memory; KL is 0 at step 1 (LoRA B starts at zero) -- to float
    rounding: the policy's log-probs come from the sampler's incremental forward, the reference's
    from one full forward -- and the saved checkpoint is a peft adapter."""
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "lora", "rloo", steps=3, lr=5e-2)
    recipe = recipe.model_copy(
        update={
            "model": recipe.model.model_copy(
                update={
                    "lora": validate(
                        Recipe,
                        {
                            "model": {"path": "x", "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}},
                            "data": {"train": "x"},
                            "objective": {"name": "sft"},
                        },
                    ).model.lora
                }
            )
        }
    )
    import align.run_setup as trainer_mod

    seen = {}
    original = trainer_mod.load_models

    def spy(*args, **kwargs):
        models = original(*args, **kwargs)
        seen["reference"] = models.reference
        return models

    trainer_mod.load_models = spy
    try:
        train(recipe)
    finally:
        trainer_mod.load_models = original
    assert seen["reference"] is None
    records = run_metrics(tmp_path / "lora")
    assert abs(records[0]["kl_k1"]) < 1e-6 and abs(records[0]["kl_k3"]) < 1e-6
    assert abs(records[-1]["kl_k1"]) > 1e-4
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_reference_is_loaded_only_when_the_objective_reads_it(
    beta, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """β = 0 (RCfD's paper setting): no reference loaded, no KL logged; the report still compares
    against the starting weights, which it loads itself."""
    import json

    import align.jobs.report as report
    from align import models as models_lib
    from align.jobs import train as train_job
    from align.metrics_log import read_metrics

    loads, real = [], models_lib.load_reference

    def counted(*args, **kwargs):
        loads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models_lib, "load_reference", counted)
    monkeypatch.setattr(report, "load_reference", counted)
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rcfd")
    recipe = validate(
        Recipe,
        {
            **recipe.model_dump(mode="json"),
            "objective": {"name": "rcfd", "beta": beta, "k": 2},
            "data": {"train": str(tiny_data_files["demos"]), "eval_prompts": str(tiny_data_files["eval_prompts"])},
            "output": {"dir": str(tmp_path / "run"), "report": True, "sample_every": 0},
        },
    )
    train_job.run(recipe)
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2
    assert all(("kl_k1" in r) == (beta > 0) for r in records)
    assert len(loads) == 1  # by the trainer when β > 0, by the report when β = 0
    out = json.loads((tmp_path / "run" / "report.json").read_text())
    assert abs(out["before"]["kl_k1"]) < 1e-5 and out["after"]["kl_k1"] != 0.0  # the start is the reference


def test_qlora_is_refused_in_one_line_where_it_cannot_run(tiny_model_dir, tiny_data_files, tmp_path, capsys):
    """model.load_in_4bit needs bitsandbytes' CUDA kernels: on this CPU machine one line, exit 2,
    before any weights load; without model.lora it is refused everywhere."""
    import torch
    import yaml

    from align.cli import main

    assert not torch.cuda.is_available()  # the test's premise: CI and this machine have no GPU
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "dpo")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    lora = "model.lora={r: 4, alpha: 8}"
    assert main(["train", str(path), "model.load_in_4bit=true", lora]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "model.load_in_4bit: QLoRA's 4-bit kernels (bitsandbytes) need a CUDA GPU" in err
    )
    assert main(["train", str(path), "model.load_in_4bit=true"]) == 2
    assert "add model.lora (QLoRA)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
