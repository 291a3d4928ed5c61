"""The colocated vLLM engine (align/vllm_engine.py) on vLLM's CPU build, on models with head size 32
(vLLM's CPU attention needs ≥ 32): GPT-2 (tied head), Llama (GQA, untied), Qwen2 (GQA, tied).

After training steps the engine's log-probs of fresh samples equal the trainer's own log-probs of
the same tokens (fp32): the weights were synced, tied heads and LoRA included; with the sync
switched off they differ. 2 processes = 1 process and resume = the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import final_params, free_port, make_recipe, make_tiny_model_dir, max_diff, run_metrics, stop_at

from align.distributed import make_accelerator
from align.logprobs import completion_logprobs
from align.rollout import trim_left
from align.run_setup import setup_run
from align.trainer import rollout, run_settings, train, train_step
from align.vllm_engine import VLLMEngine

LAUNCH = Path(__file__).resolve().parents[2] / "launch"

VLLM = {"engine": "vllm"}
MODELS = {  # head size 64 / 2 = 32
    "gpt2": {"n_embd": 64, "n_head": 2},
    "llama": {"n_embd": 64, "n_head": 2, "architecture": "llama"},
    "qwen2": {"n_embd": 64, "n_head": 2, "architecture": "qwen2", "tie_word_embeddings": True},
}


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory) -> dict[str, Path]:
    return {name: make_tiny_model_dir(tmp_path_factory.mktemp(f"vllm_{name}"), **kw) for name, kw in MODELS.items()}


def engine_vs_trainer(model_dir, data_files, run_dir, key: str, steps: int = 5, **fields) -> float:
    """Train ``steps`` steps with the vLLM engine, then sample fresh completions from it: the largest
    difference between its log-probs of its samples and the trained policy's own."""
    generation = {**VLLM, **fields.pop("generation", {})}
    recipe = make_recipe(model_dir, data_files, run_dir, key, generation=generation, steps=steps, lr=3e-3, **fields)
    settings = run_settings(recipe)
    accelerator = make_accelerator(1)
    run = setup_run(settings, accelerator)
    for _ in range(steps):
        train_step(run, accelerator)
    sampled = rollout(run, list(range(8)), step=10_000)  # fresh keys, after the last step
    prompt_ids, prompt_mask = trim_left(sampled.prompt_ids, sampled.prompt_mask)
    with torch.no_grad():
        trainer = completion_logprobs(
            run.models.policy,
            prompt_ids,
            prompt_mask,
            sampled.completion_ids,
            sampled.completion_mask,
            settings.step.temperature,
        )
    mask = sampled.completion_mask.bool()
    assert int(mask.sum()) > 20
    return float((trainer - sampled.sampler_logprobs)[mask].abs().max())


@pytest.mark.parametrize(
    "arch, key, generation",
    [
        ("gpt2", "rloo", {}),
        ("llama", "rloo", {"temperature": 0.7}),  # processed log-probs: after the temperature
        ("qwen2", "rloo", {}),
        ("llama", "grpo", {}),
    ],
)
def test_engine_logprobs_equal_the_trainers_after_training(
    arch, key, generation, vllm_models, tiny_data_files, tmp_path
):  # noqa: E501
    diff = engine_vs_trainer(vllm_models[arch], tiny_data_files, tmp_path / "run", key, generation=generation)
    assert diff < 1e-5


def test_without_the_weight_sync_they_differ(vllm_models, tiny_data_files, tmp_path, monkeypatch):
    synced = []
    original = VLLMEngine.sync_weights

    def first_only(self):  # the initial load, then never again
        if not synced:
            synced.append(True)
            original(self)

    monkeypatch.setattr(VLLMEngine, "sync_weights", first_only)
    assert engine_vs_trainer(vllm_models["gpt2"], tiny_data_files, tmp_path / "run", "rloo") > 1e-3


def test_lora_pushes_the_merged_weights(vllm_models, tiny_data_files, tmp_path):
    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}
    diff = engine_vs_trainer(vllm_models["llama"], tiny_data_files, tmp_path / "run", "rloo", model=lora)
    assert diff < 1e-5


def test_the_sync_reaches_a_cached_prefix(vllm_models, tiny_data_files, tmp_path):
    """The same prompts every step (one prompt file row set): a prefix cached under the old weights
    would give stale log-probs; the sync drops the cache."""
    data = dict(tiny_data_files)
    rows = [json.loads(line) for line in Path(tiny_data_files["prompts"]).read_text().splitlines()][:8]
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["prompts"] = same
    assert engine_vs_trainer(vllm_models["gpt2"], data, tmp_path / "run", "rloo") < 1e-5


def test_the_step_logs_the_correction_and_the_ratio_is_one(vllm_models, tiny_data_files, tmp_path, monkeypatch):
    """Each step's samples come from the weights it trains (ratio 1, no engine KL), and the weights
    are pushed once per training step -- not per micro-batch (2 here) nor per optimizer step
    (2 passes here), and the first rollout pushes the loaded policy's."""
    pushes = []
    original = VLLMEngine.sync_weights
    monkeypatch.setattr(VLLMEngine, "sync_weights", lambda self: pushes.append(1) or original(self))
    run = tmp_path / "run"
    fields = {"gradient_accumulation_steps": 2, "batch_size": 4, "updates_per_batch": 2}
    train(make_recipe(vllm_models["qwen2"], tiny_data_files, run, "rloo", generation=VLLM, steps=3, **fields))
    assert len(pushes) == 3
    for record in run_metrics(run):
        assert abs(record["is_ratio_mean"] - 1) < 1e-4 and record["is_clipped_fraction"] == 0
        assert record["engine_logprob_diff"] < 1e-6 and record["engine_kl"] < 1e-9


def test_resume_equals_the_uninterrupted_run(vllm_models, tiny_data_files, tmp_path):
    """Keys, not batch neighbours or history, decide the samples: a run stopped after step 2 and
    resumed ends with the weights of the run that never stopped (to float rounding: the engine's
    kernels are not bitwise those of a fresh engine)."""
    model = vllm_models["gpt2"]
    straight = tmp_path / "straight"
    train(make_recipe(model, tiny_data_files, straight, "rloo", generation=VLLM, steps=4, optimizer="sgd", lr=0.05))
    cut = tmp_path / "cut"
    recipe = make_recipe(model, tiny_data_files, cut, "rloo", generation=VLLM, steps=4, optimizer="sgd", lr=0.05)
    summary = train(recipe, on_step=stop_at(2))
    assert summary["stopped_by"] == "SIGTERM"
    train(recipe.model_copy(update={"resume": "latest"}))
    assert max_diff(final_params(straight), final_params(cut)) < 1e-5
    rewards = [[r["reward_mean"] for r in run_metrics(run)] for run in (straight, cut)]
    assert rewards[0] == pytest.approx(rewards[1])


def test_two_processes_equal_one(vllm_models, tiny_data_files, tmp_path):
    """Each process's engine samples its share of the prompts; 2 processes (batch 4 each) end with
    the 1-process run's (batch 8) weights and rewards."""
    runs = {}
    for procs, batch in [(1, 8), (2, 4)]:
        run = tmp_path / f"p{procs}"
        recipe = make_recipe(
            vllm_models["llama"],
            tiny_data_files,
            run,
            "rloo",
            generation=VLLM,
            steps=3,
            batch_size=batch,
            optimizer="sgd",
            lr=0.05,
            max_grad_norm=None,
        )
        if procs == 1:
            train(recipe)
        else:
            path = tmp_path / "p2.yaml"
            path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
            cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            cmd += ["--main_process_port", str(free_port()), "-m", "align.cli", "train", str(path)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
            assert done.returncode == 0, done.stderr[-3000:]
        runs[procs] = run
    assert max_diff(final_params(runs[1]), final_params(runs[2])) < 1e-5
    rewards = [[r["reward_mean"] for r in run_metrics(runs[p])] for p in (1, 2)]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)


@pytest.mark.parametrize(
    "config, arch, model",
    [
        # DTensor shards: each base weight made whole in turn, and each adapter's ΔW product
        ("cpu_fsdp2", "llama", {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}),
        # ZeRO-3 partitions gathered (base weights, tied head, the adapters' A and B for ΔW)
        ("cpu_zero3", "qwen2", {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}),
    ],
)
def test_sharded_training_syncs_whole_weights(config, arch, model, vllm_models, tiny_data_files, tmp_path):
    """2 sharded processes: every step's samples were drawn from the weights being trained (the
    engine's log-probs equal the trainer's π_old on every token the step trains on)."""
    run = tmp_path / "run"
    recipe = make_recipe(vllm_models[arch], tiny_data_files, run, "rloo", model=model, generation=VLLM, steps=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / f"{config}.yaml")]
    cmd += ["--main_process_port", str(free_port()), "-m", "align.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn the launch into plain DDP
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    records = run_metrics(run)
    assert len(records) == 3
    for record in records:
        assert record["engine_logprob_diff"] < 1e-6 and abs(record["is_ratio_mean"] - 1) < 1e-4
    assert json.loads((run / "summary.json").read_text())["num_processes"] == 2


def recipe_file(model_dir, data_files, tmp_path, key: str = "rloo") -> str:
    recipe = make_recipe(model_dir, data_files, tmp_path / "run", key)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return str(path)


def refused(capsys, *argv: str) -> str:
    """``align train ...`` in this process: exit 2, one line, nothing trained."""
    from align.cli import main

    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_engine_settings_are_one_line_before_training(
    vllm_models, tiny_model_dir, tiny_data_files, tmp_path, capsys
):  # noqa: E501
    gpt2 = recipe_file(vllm_models["gpt2"], tiny_data_files, tmp_path)
    assert "generation.engine" in refused(capsys, gpt2, "generation.engine=vlm")
    parallel = refused(capsys, gpt2, "generation.engine=vllm", "generation.vllm.tensor_parallel_size=2")
    assert "tensor_parallel_size" in parallel
    sleep = refused(capsys, gpt2, "generation.engine=vllm", "generation.vllm.enable_sleep_mode=true")
    assert "enable_sleep_mode" in sleep
    narrow = recipe_file(tiny_model_dir, tiny_data_files, tmp_path)  # head size 32 / 2 = 16
    assert "head size >= 32" in refused(capsys, narrow, "generation.engine=vllm")
    dpo = recipe_file(vllm_models["gpt2"], tiny_data_files, tmp_path, "dpo")
    assert "samples nothing" in refused(capsys, dpo, "generation.engine=vllm")
    copg = recipe_file(vllm_models["gpt2"], tiny_data_files, tmp_path, "copg")
    assert "takes no importance weights" in refused(
        capsys, copg, "generation.engine=vllm", "generation.importance_correction.mode=token_mask"
    )
    assert not (tmp_path / "run").exists()


def test_a_model_vllm_cannot_load_and_a_missing_vllm(vllm_models, tiny_data_files, tmp_path, capsys, monkeypatch):
    import shutil

    odd = tmp_path / "odd_model"
    shutil.copytree(vllm_models["gpt2"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    path = recipe_file(odd, tiny_data_files, tmp_path)
    assert "vLLM cannot load" in refused(capsys, path, "generation.engine=vllm")
    import align.vllm_engine

    monkeypatch.setattr(align.vllm_engine.importlib.util, "find_spec", lambda name: None)
    message = refused(capsys, path, "generation.engine=vllm")
    assert "vllm is not installed" in message and "pip install" in message
