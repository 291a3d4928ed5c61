"""Sharded training on 2 CPU processes (gloo), through the launch configs users run:
FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 give the weights of 1 process at the same global batch
(SGD, no clipping: a scale error shows), on a tiny Llama built from a config; resume after
SIGTERM equals the uninterrupted run; LoRA under FSDP2 saves adapters as peft does; a save
killed half-way leaves the previous checkpoint to resume from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, make_tiny_model_dir
from safetensors.torch import load_file

from align.config import validate
from align.recipe import Recipe
from align.trainer import train

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SGD_LR = {"rloo": 0.05, "dpo": 2.0, "ppo": 0.5}
ONLINE = {"rloo": {"name": "rloo", "beta": 0.05, "k": 2}, "ppo": {"name": "ppo", "beta": 0.05, "k": 2}}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), n_embd=32, n_head=4, architecture="llama")


def _recipe(model_dir, data_files, run_dir, objective: str, batch_size: int, **extra) -> dict:
    online = objective in ONLINE
    raw = {
        "model": {"path": str(model_dir), **extra.pop("model", {})},
        "data": {"train": str(data_files["prompts" if online else "pairs"])},
        "objective": ONLINE[objective] if online else {"name": "dpo", "beta": 0.1},
        "generation": {"max_new_tokens": 8, "stop_strings": ["e"]},
        "train": {
            "steps": 2,
            "batch_size": batch_size,
            "lr": SGD_LR[objective],
            "optimizer": "sgd",
            "max_grad_norm": None,
            "lr_scheduler": "constant",
            "seed": 3,
            **extra.pop("train", {}),
        },
        "output": {"dir": str(run_dir), "report": False, "sample_every": 0, **extra.pop("output", {})},
    }
    if online:
        raw["reward"] = [{"name": "length", "options": {"target": 12, "unit": "chars"}}]
    validate(Recipe, raw)
    return raw


def _launch_cmd(config: str, recipe_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / f"{config}.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "align.cli",
        "train",
        str(recipe_path),
        *overrides,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
ENV.pop("ACCELERATE_USE_CPU", None)  # it would turn every launch type into plain DDP


def _launch(config: str, raw: dict, tmp_path: Path, *overrides: str) -> dict:
    path = tmp_path / f"{Path(raw['output']['dir']).name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(_launch_cmd(config, path, *overrides), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((Path(raw["output"]["dir"]) / "summary.json").read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tiny_llama, tiny_data_files, tmp_path_factory) -> dict[str, Path]:
    """The 1-process runs (batch 8) every sharded run is compared with."""
    out = {}
    for objective in ("rloo", "dpo"):
        run = tmp_path_factory.mktemp(f"one_{objective}") / "run"
        train(validate(Recipe, _recipe(tiny_llama, tiny_data_files, run, objective, batch_size=8)))
        out[objective] = run
    return out


@pytest.mark.parametrize("config,sharding", [("cpu_fsdp2", "fsdp2"), ("cpu_zero2", "zero2"), ("cpu_zero3", "zero3")])
@pytest.mark.parametrize("objective", ["rloo", "dpo"])
def test_two_sharded_processes_equal_one(
    config, sharding, objective, one_process, tiny_llama, tiny_data_files, tmp_path
):
    summary = _launch(config, _recipe(tiny_llama, tiny_data_files, tmp_path / "run", objective, 4), tmp_path)
    assert (summary["num_processes"], summary["sharding"], summary["mixed_precision"]) == (2, sharding, "no")
    assert summary["distributed_type"] == ("FSDP" if sharding == "fsdp2" else "DEEPSPEED")
    one, two = _weights(one_process[objective]), _weights(tmp_path / "run")
    start = load_file(str(tiny_llama / "model.safetensors"))
    moved = _max_diff(one, start)
    assert moved > 1e-3, moved  # the runs did train
    assert _max_diff(one, two) < 2e-5 * max(1.0, moved / 1e-2), (_max_diff(one, two), moved)


@pytest.mark.parametrize("config", ["cpu_zero2", "cpu_fsdp2"])
def test_ppo_under_sharding_is_refused_in_one_line(config, tiny_llama, tiny_data_files, tmp_path):
    """accelerate prepares one trained model under FSDP2 and DeepSpeed: PPO's critic is refused
    there with one line and exit code 2, before any weights load (DDP runs it: test_distributed.py)."""
    raw = _recipe(tiny_llama, tiny_data_files, tmp_path / "run", "ppo", 4)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(_launch_cmd(config, path), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0  # the launcher's own report follows the workers' exit code 2
    assert "align train: critic: 'ppo' trains a critic beside the policy" in done.stderr
    assert "align/trainer.py" not in done.stderr and "Loading weights" not in done.stderr


def test_fsdp2_resume_after_sigterm_equals_the_uninterrupted_run(tiny_llama, tiny_data_files, tmp_path):
    steps = {"train": {"steps": 4}, "output": {"save_every": 1}}
    straight = _recipe(tiny_llama, tiny_data_files, tmp_path / "straight", "rloo", 4, **json.loads(json.dumps(steps)))
    _launch("cpu_fsdp2", straight, tmp_path)
    raw = _recipe(tiny_llama, tiny_data_files, tmp_path / "cut", "rloo", 4, **json.loads(json.dumps(steps)))
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(raw))
    launcher = subprocess.Popen(
        _launch_cmd("cpu_fsdp2", path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 1):
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it to both processes: save, then stop
    out, _ = launcher.communicate(timeout=240)
    stopped = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] < 4, out[-3000:]
    resumed = _launch("cpu_fsdp2", raw, tmp_path, "resume=latest")
    assert resumed["steps"] == 4
    assert _max_diff(_weights(tmp_path / "straight"), _weights(tmp_path / "cut")) == 0.0


def test_lora_under_fsdp2_trains_and_saves_adapters(tiny_llama, tiny_data_files, tmp_path):
    lora = {"model": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}
    _launch("cpu_fsdp2", _recipe(tiny_llama, tiny_data_files, tmp_path / "run", "dpo", 4, **lora), tmp_path)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file()
    adapters = load_file(str(final / "adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    assert max(float(v.abs().max()) for k, v in adapters.items() if "lora_B" in k) > 0  # B starts at 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), final)  # loads as peft saves


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tiny_llama, tiny_data_files, tmp_path):
    """kill -9 in the middle of writing step 3: its .tmp- directory is left, step 2 is intact,
    and resume=latest continues from step 2 to the same weights as the uninterrupted run (the
    run's own final weights, before the step-3 save is undone)."""
    steps = {"train": {"steps": 3}, "output": {"save_every": 1, "keep_last": 5}}
    raw = _recipe(tiny_llama, tiny_data_files, tmp_path / "cut", "dpo", 4, **json.loads(json.dumps(steps)))
    _launch("cpu_zero3", raw, tmp_path)
    uninterrupted = _weights(tmp_path / "cut")
    checkpoints = tmp_path / "cut" / "checkpoints"
    # what a kill -9 during the step-3 save leaves: its temp dir, half written; no step-3
    (checkpoints / "step-000003").rename(checkpoints / ".tmp-step-000003")
    for shard in (checkpoints / ".tmp-step-000003").rglob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (tmp_path / "cut" / "final").rename(tmp_path / "cut" / "final-old")
    resumed = _launch("cpu_zero3", raw, tmp_path, "resume=latest")
    assert resumed["steps"] == 3
    assert not list(checkpoints.glob(".tmp-*"))
    assert _max_diff(uninterrupted, _weights(tmp_path / "cut")) == 0.0
