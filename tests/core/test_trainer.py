"""The trainer's invariants on a tiny random GPT-2: every objective trains; gradient accumulation,
2-process DDP and resume change nothing; bad input fails early with a one-line error."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import losses
from align.config import RecipeError, validate
from align.recipe import Recipe
from align.trainer import TrainingError, train

# SGD step sizes that move the tiny model by ~1e-3 in two steps (loss scales differ by objective)
SGD_LR = {
    "sft": 0.5,
    "dpo": 2.0,
    "dpo_avg": 20.0,
    "ipo": 0.02,
    "copg_offline": 0.05,
    "rloo": 0.05,
    "rloo_whitened": 0.05,
    "reinforce": 0.05,
    "copg": 0.05,
    "rcfd": 0.005,
    "rcfd_two": 0.05,
    "vanilla_pg": 0.02,
    "grpo": 1.0,
    "grpo_token": 1.0,
    "dr_grpo": 0.2,
    "ppo": 0.5,
}
LENGTH = [{"name": "length", "options": {"target": 12, "unit": "chars"}}]
TARGET_4 = {"name": "length", "options": {"target": 4, "unit": "chars"}, "weight": 2.0}
WHITENED = [{"name": "length", "options": {"target": 12, "unit": "chars"}, "normalize": True}]

# objective section, data file key, extra recipe fields
OBJECTIVES = {
    "sft": ({"name": "sft"}, "sft", {}),
    "dpo": ({"name": "dpo", "beta": 0.1}, "pairs", {}),
    "dpo_avg": ({"name": "dpo", "beta": 0.1, "options": {"average_logprobs": True}}, "pairs", {}),
    "ipo": ({"name": "ipo", "beta": 0.5}, "pairs", {}),
    "copg_offline": ({"name": "copg", "beta": 0.5, "mode": "offline"}, "pairs", {}),
    "rloo": ({"name": "rloo", "beta": 0.05, "k": 2}, "prompts", {"reward": LENGTH}),
    "rloo_whitened": ({"name": "rloo", "beta": 0.05, "k": 2}, "prompts", {"reward": WHITENED}),
    "reinforce": ({"name": "reinforce", "beta": 0.05, "k": 2}, "prompts", {"reward": LENGTH}),
    "copg": ({"name": "copg", "beta": 0.5, "k": 2}, "prompts", {"reward": LENGTH}),
    "rcfd": ({"name": "rcfd", "beta": 0.05, "k": 2}, "demos", {"reward": LENGTH}),
    # two components: each squared gap whitened over the whole batch and every process
    "rcfd_two": ({"name": "rcfd", "beta": 0.05, "k": 2}, "demos", {"reward": LENGTH + [TARGET_4]}),
    "vanilla_pg": ({"name": "vanilla_pg", "beta": 0.05, "k": 2}, "prompts", {"reward": LENGTH}),
    "grpo": ({"name": "grpo", "beta": 0.04, "k": 2}, "prompts", {"reward": LENGTH}),
    "grpo_token": (
        {"name": "grpo", "beta": 0.04, "k": 2, "options": {"aggregation": "token_mean", "clip_high": 0.28}},
        "prompts",
        {"reward": LENGTH},
    ),
    "dr_grpo": ({"name": "dr_grpo", "beta": 0.04, "k": 2}, "prompts", {"reward": LENGTH}),
    "ppo": ({"name": "ppo", "beta": 0.05, "k": 2, "options": {"lam": 0.9}}, "prompts", {"reward": LENGTH}),
}
GENERATION = {"max_new_tokens": 8, "stop_strings": ["e"]}  # "e" cuts completions at unequal lengths


def make_recipe(
    model_dir, data_files, run_dir, key: str, model: dict | None = None, generation: dict | None = None, **train_fields
) -> Recipe:
    objective, data_key, extra = OBJECTIVES[key]
    data = {"train": str(data_files[data_key])}
    raw = {
        "model": {"path": str(model_dir), **(model or {})},
        "data": data,
        "objective": objective,
        "generation": {**GENERATION, **(generation or {})},
        "train": {"steps": 2, "batch_size": 8, "lr": 5e-3, "lr_scheduler": "linear", "seed": 3, **train_fields},
        "output": {"dir": str(run_dir), "report": False, "sample_every": 0},
        **extra,
    }
    return validate(Recipe, raw)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final policy's weights, and the critic's (``critic.*``) where the objective trains one."""
    params = load_file(str(run_dir / "final" / "model.safetensors"))
    if (run_dir / "final_critic").is_dir():
        critic = load_file(str(run_dir / "final_critic" / "model.safetensors"))
        params.update({f"critic.{k}": v for k, v in critic.items()})
    return params


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _record_reuse_decisions(monkeypatch) -> list[bool]:
    """Every ``reuse_sampler_probs`` decision of the runs that follow, in order."""
    import align.batches as batches_mod

    decisions: list[bool] = []
    decide = batches_mod.reuse_sampler_probs

    def spy(*args, **kwargs) -> bool:
        decisions.append(decide(*args, **kwargs))
        return decisions[-1]

    monkeypatch.setattr(batches_mod, "reuse_sampler_probs", spy)
    return decisions


@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_gradient_accumulation_equivalence(key, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """batch 8 × accumulation 1 == batch 1 × accumulation 8 == batch 2 × 4, for every objective.

    Plain SGD without clipping: the update is lr × gradient, so a loss normalised per
    micro-batch instead of per step (a uniform scale error that Adam would hide) shows. For the
    online objectives 8 × 1 also takes the policy's log-probs from the rollout's softmax (one
    micro-batch) and the others from a full forward: the same gradient either way."""
    reused = _record_reuse_decisions(monkeypatch)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    results = {}
    for batch, accumulation in [(8, 1), (1, 8), (2, 4)]:
        run = tmp_path / f"b{batch}x{accumulation}"
        summary = train(
            make_recipe(
                tiny_model_dir,
                tiny_data_files,
                run,
                key,
                batch_size=batch,
                gradient_accumulation_steps=accumulation,
                optimizer="sgd",
                lr=SGD_LR[key],
                max_grad_norm=None,
            )
        )
        assert summary["skipped_steps"] == 0
        assert not reused or all(reused) == (accumulation == 1)
        reused.clear()
        results[(batch, accumulation)] = final_params(run)
    reference = results[(8, 1)]
    shared = reference.keys() & initial.keys()
    moved = max_diff({k: reference[k] for k in shared}, {k: initial[k] for k in shared})
    assert moved > 1e-4, "nothing trained"
    if "values" in losses.REGISTRY[OBJECTIVES[key][0]["name"]].needs:  # the critic trained too
        head = reference["critic.value_head.weight"]
        assert float(head.abs().max()) > 1e-4 and any(k.startswith("critic.backbone.") for k in reference)
    for config, params in results.items():
        assert max_diff(reference, params) < 2e-5, f"{key}: {config} differs from 8x1"
    if OBJECTIVES[key][1] == "prompts":
        lengths = {r["completion_length"] for r in _metrics(tmp_path / "b8x1")}
        assert all(0 < x < GENERATION["max_new_tokens"] for x in lengths), "completions should end early and unevenly"


def test_sampler_probs_are_kept_only_within_their_memory_cap(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """The kept softmax is [max_new_tokens, rows, V] fp32; above the cap the training forward
    computes the log-probs itself -- and trains to the same weights."""
    import align.batches as batches_mod

    decisions = _record_reuse_decisions(monkeypatch)
    sgd = dict(optimizer="sgd", lr=SGD_LR["rloo"], max_grad_norm=None)
    train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "kept", "rloo", **sgd))
    assert decisions and all(decisions)
    vocab = final_params(tmp_path / "kept")["transformer.wte.weight"].shape[0]
    needed = GENERATION["max_new_tokens"] * 8 * OBJECTIVES["rloo"][0]["k"] * vocab * 4
    monkeypatch.setattr(batches_mod, "KEEP_PROBS_MAX_BYTES", needed - 1)
    decisions.clear()
    train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "recomputed", "rloo", **sgd))
    assert decisions and not any(decisions)
    assert max_diff(final_params(tmp_path / "kept"), final_params(tmp_path / "recomputed")) < 2e-5


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept_softmax", "recomputed"])
def test_loss_logprobs_are_at_the_sampling_temperature(
    keep_probs, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """At generation.temperature 0.7 the policy and reference log-probs the loss sees, and the
    SGD update they produce, equal an independent log_softmax(logits / T) on the sampled tokens.

    Both paths: the rollout's kept softmax (whose backward divides by T itself) and a fresh
    training forward. Step 1's policy is the initial model, so the independent forward needs no
    trainer code."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    import align.batches as batches_mod
    import align.step as step_mod

    temperature, lr = 0.7, 0.05
    decisions = _record_reuse_decisions(monkeypatch)
    if not keep_probs:
        monkeypatch.setattr(batches_mod, "KEEP_PROBS_MAX_BYTES", 0)
    forwards, micro_batches = [], []
    real_logprobs, real_loss_batch = step_mod.completion_logprobs, step_mod._loss_batch

    def spy_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *args, **kwargs):
        out = real_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *args, **kwargs)
        if torch.is_grad_enabled():  # the policy's forward; the reference runs under no_grad
            forwards.append((prompt_ids, prompt_mask, completion_ids, completion_mask))
        return out

    def spy_loss_batch(batch, logprobs, rows=None, **kwargs):
        out = real_loss_batch(batch, logprobs, rows=rows, **kwargs)
        if kwargs.get("mask") is not None:  # a micro-batch's (the step's whole batch passes no mask)
            micro_batches.append(out)
        return out

    monkeypatch.setattr(step_mod, "completion_logprobs", spy_logprobs)
    monkeypatch.setattr(step_mod, "_loss_batch", spy_loss_batch)
    recipe = make_recipe(
        tiny_model_dir,
        tiny_data_files,
        tmp_path / "run",
        "rloo",
        generation={"temperature": temperature},
        steps=1,
        optimizer="sgd",
        lr=lr,
        lr_scheduler="constant",
        max_grad_norm=None,
    )
    train(recipe)
    assert decisions == [keep_probs]
    assert len(forwards) == len(micro_batches) == 1

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    (prompt_ids, prompt_mask, completion_ids, completion_mask), micro = forwards[0], micro_batches[0]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, -(width + 1) : -1]
    expected = torch.log_softmax(logits.double() / temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    expected = (expected * completion_mask).float()
    assert completion_mask.sum() > 0
    assert (micro.logprobs.detach() - expected.detach()).abs().max() < 1e-4
    assert (micro.ref_logprobs - expected.detach()).abs().max() < 1e-4  # reference = policy at step 1
    # a wrong temperature moves these log-probs by far more than the tolerance
    at_one = torch.log_softmax(logits.double(), -1).gather(-1, completion_ids[..., None])[..., 0] * completion_mask
    assert (at_one.float() - expected).abs().max() > 0.05

    objective = recipe.objective.build()
    loss, _ = objective(replace(micro, logprobs=expected), num_units=objective.count_units(micro))
    loss.backward()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    final = final_params(tmp_path / "run")
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    biggest = max(float(g.abs().max()) for g in grads.values())
    assert biggest > 1e-3, "no gradient"
    for name, grad in grads.items():
        update = (initial[name] - final[name]) / lr
        assert (update - grad).abs().max() < 1e-3 * biggest, f"{name}: SGD update != lr × independent gradient"


TIMINGS = {"step_s", "tokens_per_s", "generation_s"}  # measured per process: not comparable


def _metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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

    def stop_at_two(step: int, record: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train(recipe, on_step=stop_at_two)
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2
    assert (interrupted / "checkpoints" / "step-000002" / "model" / "model.safetensors").is_file()
    assert not list((interrupted / "checkpoints").glob(".tmp-*"))
    resumed = recipe.model_copy(update={"resume": "latest"})
    assert train(resumed)["steps"] == 4

    a, b = final_params(straight), final_params(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = {"step_s", "tokens_per_s", "generation_s"}
    clean = [[{k: v for k, v in r.items() if k not in drop} for r in _metrics(run)] for run in (straight, interrupted)]
    assert clean[0] == clean[1]


@pytest.mark.parametrize(
    "key, fields",
    [
        ("dpo", {}),
        ("rloo", {}),
        ("rloo_whitened", {}),
        ("grpo_token", {}),
        ("rcfd_two", {}),
        ("ppo", {}),
        ("ppo", {"mini_batches": 2, "updates_per_batch": 2}),  # π_old and V_old kept before the first step
    ],
)
def test_two_process_ddp_equals_one_process(key, fields, tiny_model_dir, tiny_data_files, tmp_path):
    """accelerate launch --cpu --num_processes 2 (batch 4 each) == 1 process (batch 8); with 2
    mini-batches each process's half of every mini-batch."""
    import yaml

    runs, logged = {}, {}
    for procs, batch in [(1, 8), (2, 4)]:
        run = tmp_path / f"p{procs}"
        recipe = make_recipe(
            tiny_model_dir,
            tiny_data_files,
            run,
            key,
            batch_size=batch // fields.get("mini_batches", 1),
            optimizer="sgd",
            lr=SGD_LR[key],
            max_grad_norm=None,
            **fields,
        )
        path = tmp_path / f"p{procs}.yaml"
        path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
        # `accelerate launch --cpu` starts one process unless mpirun is installed; torchrun's
        # launcher (--multi_gpu) with ACCELERATE_USE_CPU gives real gloo DDP on CPU
        launcher = ["--multi_gpu"] if procs > 1 else ["--cpu"]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launcher,
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + procs + os.getpid() % 1000),
            "-m",
            "align.cli",
            "train",
            str(path),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[procs] = final_params(run)
        logged[procs] = _metrics(run)
    assert max_diff(runs[1], runs[2]) < 2e-5
    # the logged metrics too: completions stop at unequal lengths ("e"), so the processes hold
    # unequal token counts and only sums over every process give one process's numbers
    first = logged[1][0]
    assert {"loss", "kl_k1", "tokens", "reward_mean", "reward_std", "entropy"} <= set(first) or key == "dpo"
    for one, two in zip(logged[1], logged[2], strict=True):
        assert set(one) == set(two)
        for name in sorted(set(one) - TIMINGS):
            tolerance = 1e-6 if one["step"] == 1 else 1e-4  # step 2 starts from weights equal to 2e-5
            assert two[name] == pytest.approx(one[name], rel=tolerance, abs=tolerance), (name, one["step"])


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


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_model_dir, tiny_data_files, tmp_path):
    recipe = make_recipe(
        tiny_model_dir, tiny_data_files, tmp_path / "nan", "sft", steps=20, lr=1e30, max_grad_norm=None, max_bad_steps=3
    )
    with pytest.raises(TrainingError, match=r"4 steps skipped for non-finite values \(train.max_bad_steps=3\)"):
        train(recipe)
    records = _metrics(tmp_path / "nan")
    # the step that ends the run is logged and checkpointed before the error
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3, 4, 5]  # step 1 is finite
    assert (tmp_path / "nan" / "checkpoints" / "step-000005" / "trainer_state.pt").is_file()
    assert not (tmp_path / "nan" / ".lock").exists()  # the lock is released on an error too


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.cli", *argv], capture_output=True, text=True, timeout=120)


def test_bad_data_rows_name_row_and_column(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the film", "completion": " was good ."}\n{"prompt": "  ", "completion": " ok ."}\n')
    out = run_cli("sft", _write_recipe(tmp_path, tiny_model_dir, bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "row 1: column 'prompt' is empty" in out.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "the film"}\n')
    out = run_cli("sft", _write_recipe(tmp_path, tiny_model_dir, missing))
    assert out.returncode == 2 and "missing column 'prompt'" in out.stderr


def _write_recipe(tmp_path: Path, model_dir, data: Path) -> str:
    path = tmp_path / f"{data.stem}.yaml"
    path.write_text(f"model: {{path: {model_dir}}}\ndata: {{train: {data}}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    return str(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "field 'train.stepz': unknown key"),
        ("train.steps=many", "field 'train.steps'"),
        ("objective.name=trpo", "field 'objective.name'"),
        ("objective.options.gamma=1", "unknown option(s) ['gamma'] for 'rloo'"),
        ("generation.min_new_tokens=99", "min_new_tokens (99) > max_new_tokens (32)"),
        ("objective.k=1", "objective.k"),
        ("objective.options.kl_estimator=k3", "kl_estimator: 'k3' in the detached reward"),
        ("generation.top_k=5", "generation.top_k: online objectives sample from the full softmax"),
        ("generation.top_p=0.9", "generation.top_p: online objectives"),
        ("generation.min_new_tokens=2", "generation.min_new_tokens: online objectives"),
    ],
)
def test_recipe_errors_are_one_line_before_any_model_loads(override, message, tmp_path):
    path = tmp_path / "r.yaml"
    # the model path does not exist: a schema error must come first
    path.write_text(
        "model: {path: /nonexistent}\ndata: {train: x.jsonl}\nobjective: {name: rloo}\nreward: [sentiment]\n"
    )
    out = run_cli("train", str(path), override)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_sampling_filters_stay_available_to_offline_objectives():
    """Filters only change what an online loss scores; DPO's eval samples may use them."""
    raw = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "objective": {"name": "dpo"}}
    recipe = validate(Recipe, {**raw, "generation": {"top_k": 5, "top_p": 0.9, "min_new_tokens": 2}})
    assert recipe.generation.top_k == 5


def test_online_objective_without_reward_is_rejected():
    with pytest.raises(RecipeError, match="reward: objective 'rloo' is trained online and needs a reward"):
        validate(Recipe, {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "objective": {"name": "rloo"}})


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


def test_offline_copg_without_rewards_is_ipo_at_the_same_beta(tiny_model_dir, tiny_data_files, tmp_path):
    """A pair file with no rewards: CoPG's reward gap is ½, so (½ − βΔ)²/(2β) = (β/2)·IPO's loss
    and SGD with lr·2/β gives IPO's weights at the same β (a gap of 1 would be IPO at β/2)."""
    beta, lr = 0.5, SGD_LR["ipo"]
    finals = {}
    for key, step in [("ipo", lr), ("copg_offline", lr * 2 / beta)]:
        run = tmp_path / key
        train(make_recipe(tiny_model_dir, tiny_data_files, run, key, optimizer="sgd", lr=step, max_grad_norm=None))
        finals[key] = final_params(run)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max_diff(finals["ipo"], {k: v for k, v in initial.items() if k in finals["ipo"]}) > 1e-4
    assert max_diff(finals["ipo"], finals["copg_offline"]) < 1e-6


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
    import align.trainer as trainer_mod

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
    records = _metrics(tmp_path / "lora")
    assert abs(records[0]["kl_k1"]) < 1e-6 and abs(records[0]["kl_k3"]) < 1e-6
    assert abs(records[-1]["kl_k1"]) > 1e-4
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()


def test_same_seed_same_metrics(tiny_model_dir, tiny_data_files, tmp_path):
    drop = {"step_s", "tokens_per_s", "generation_s"}
    runs = []
    for name in ("a", "b"):
        train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / name, "rloo", steps=2, batch_size=4))
        runs.append([{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / name)])
    assert runs[0] == runs[1]


def test_prompt_template_builds_prompts_from_columns(tiny_model_dir, tmp_path):
    from align.data import DataError, format_prompts

    class Cfg:
        prompt_template = "Summarize: {document}\nTL;DR:"
        prompt_column = "prompt"
        chat_template = False
        system_prompt = None
        chat_template_kwargs: dict = {}

    assert format_prompts(None, {"document": ["a b", "c"]}, Cfg, "x") == [
        "Summarize: a b\nTL;DR:",
        "Summarize: c\nTL;DR:",
    ]
    Cfg.prompt_template = "{article}"
    with pytest.raises(DataError, match="prompt_template uses missing column 'article'"):
        format_prompts(None, {"document": ["a"]}, Cfg, "x")


def test_long_prompts_are_cut_inside_their_source_column(tiny_model_dir, capsys):
    """The xsum_entailment_rloo.yaml shape (instruction + {document}, chat template): a long
    document is cut, not the prompt's head -- BOS, the chat header and the instruction stay, the
    document keeps its beginning, and the rows cut are counted in one line."""
    from transformers import AutoTokenizer

    from align.data import prompt_rows
    from align.recipe import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "<|user|>\n{{ messages[0]['content'] }}\n<|assistant|>\n"
    cfg = DataConfig(
        train="x.jsonl",
        prompt_template="Summarize the article in one sentence.\n\n{document}",
        chat_template=True,
        max_prompt_tokens=120,  # the tiny tokenizer spends 49 tokens on the fixed text
    )
    long_doc = " ".join(f"the film number {i} was good ." for i in range(60))
    documents = [long_doc, "the cast was great ."]
    prompts, ids, _ = prompt_rows(tokenizer, {"document": documents, "summary": ["a", "b"]}, cfg, "x.jsonl")
    head = "<|user|>\nSummarize the article in one sentence.\n\n"
    assert prompts[1] == head + documents[1] + "\n<|assistant|>"  # a short row is untouched
    assert 110 <= len(ids[0]) <= 120  # cut to fit, not far below the budget
    assert ids[0][0] == tokenizer.bos_token_id and ids[0] == tokenizer(prompts[0])["input_ids"]
    assert prompts[0].startswith(head + "the film number 0 was good .")
    assert prompts[0].endswith("\n<|assistant|>")
    assert len(prompts[0]) < len(head) + len(long_doc)
    assert "1 prompt(s) longer than data.max_prompt_tokens=120 cut inside their source" in capsys.readouterr().out

    # a bare prompt (continued as is) keeps its end, and its BOS
    bare = DataConfig(train="x.jsonl", max_prompt_tokens=40)
    prompts, ids, _ = prompt_rows(tokenizer, {"prompt": [long_doc]}, bare, "x.jsonl")
    assert len(ids[0]) <= 40 and ids[0][0] == tokenizer.bos_token_id
    assert long_doc.endswith(prompts[0].strip()) and prompts[0].strip().endswith("number 59 was good .")

    template = "Summarize the article in one sentence.\n\n{document}"
    tight = DataConfig(train="x.jsonl", prompt_template=template, max_prompt_tokens=3)
    from align.data import DataError

    with pytest.raises(DataError, match="without column 'document' is already over data.max_prompt_tokens=3"):
        prompt_rows(tokenizer, {"document": [long_doc]}, tight, "x.jsonl")


def test_rcfd_whitens_each_component_by_its_demonstrations(tiny_model_dir, tiny_data_files, tmp_path):
    """RCfD with two components of scales 1 and 100: each component's squared gap to the
    demonstration is whitened over the batch (Rita et al. §3.2), so multiplying one component by
    100 changes nothing; its weight comes from the reward section."""
    import rewards

    def length_score(prompts, completions, **_):
        return [len(c) / 10 for c in completions]

    def vowel_score(scale):
        return lambda prompts, completions, **_: [scale * sum(ch in "aeiou" for ch in c) for c in completions]

    rewards.register(lambda: length_score, name="test_length_score")
    rewards.register(lambda: vowel_score(1.0), name="test_vowels_x1")
    rewards.register(lambda: vowel_score(100.0), name="test_vowels_x100")
    finals = {}
    for scale in ("x1", "x100"):
        recipe = make_recipe(
            tiny_model_dir, tiny_data_files, tmp_path / scale, "rcfd", optimizer="sgd", lr=0.05, max_grad_norm=None
        )
        components = [{"name": "test_length_score", "weight": 1.0}, {"name": f"test_vowels_{scale}", "weight": 3.0}]
        recipe = validate(Recipe, {**recipe.model_dump(mode="json"), "reward": components})
        assert recipe.build_objective().weights.tolist() == [1.0, 3.0]
        train(recipe)
        finals[scale] = final_params(tmp_path / scale)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max_diff(finals["x1"], {k: v for k, v in initial.items() if k in finals["x1"]}) > 1e-4
    assert max_diff(finals["x1"], finals["x100"]) < 1e-6

    raw = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "bad", "rcfd").model_dump(mode="json")
    with pytest.raises(RecipeError, match=r"objective.options.weights: 'rcfd' takes each component's weight"):
        validate(Recipe, {**raw, "objective": {**raw["objective"], "options": {"weights": [1.0]}}})
    with pytest.raises(RecipeError, match=r"reward\[0\].normalize: 'rcfd' compares each raw \(clipped\) component"):
        validate(Recipe, {**raw, "reward": [{**raw["reward"][0], "normalize": True}]})


def test_rcfd_compares_clipped_raw_scores():
    """``clip_components``: each component clipped to its ``reward[i].clip``, nothing else."""
    import rewards
    from align.recipe import RewardComponent
    from align.rewards_adapter import RewardFunction

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    rewards.register(lambda: length, name="test_len_raw")
    components = [RewardComponent(name="test_len_raw"), RewardComponent(name="test_len_raw", clip=[0.0, 3.0])]
    reward = RewardFunction(components, torch.device("cpu"))
    got = reward.clip_components(torch.tensor([[2.0, 2.0], [10.0, 10.0]]))
    assert got.tolist() == [[2.0, 2.0], [10.0, 3.0]]
    demo = reward.score_demonstrations(["p", "p"], ["a", "abcdefg"], {})
    assert demo.tolist() == [[1.0, 1.0], [7.0, 7.0]]  # raw: clipping is ``clip_components``'s


def test_recipes_command_lists_bundled_recipes():
    out = run_cli("recipes")
    assert out.returncode == 0
    assert "quickstart " in out.stdout and "pythia1b_tldr_rloo" in out.stdout


def _register_test_reward(name: str, scores_for_call):
    """A reward whose n-th call returns ``scores_for_call(n, completions)``."""
    import rewards

    calls = {"n": 0}

    def factory():
        def reward(prompts, completions, **columns):
            calls["n"] += 1
            return scores_for_call(calls["n"], completions)

        return reward

    rewards.register(factory, name=name)
    return calls


def test_nan_reward_skips_the_step_and_counts_it(tiny_model_dir, tiny_data_files, tmp_path):
    _register_test_reward(
        "nan_on_second_call",
        lambda n, c: [float("nan") if n == 2 and i == 0 else 1.0 * len(x) for i, x in enumerate(c)],
    )
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=3, batch_size=4)
    recipe = recipe.model_copy(
        update={
            "reward": validate(
                Recipe,
                {
                    "model": {"path": "m"},
                    "data": {"train": "d"},
                    "objective": {"name": "rloo"},
                    "reward": ["nan_on_second_call"],
                },
            ).reward
        }
    )
    summary = train(recipe)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1
    records = _metrics(tmp_path / "run")
    assert [bool(r.get("skipped")) for r in records] == [False, True, False]


def test_a_raising_reward_stops_the_run_naming_it(tiny_model_dir, tiny_data_files, tmp_path):
    from rewards import RewardError

    _register_test_reward("broken_scorer", lambda n, c: [0.0] * (len(c) - 1))
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=2, batch_size=4)
    recipe = recipe.model_copy(
        update={
            "reward": validate(
                Recipe,
                {
                    "model": {"path": "m"},
                    "data": {"train": "d"},
                    "objective": {"name": "rloo"},
                    "reward": ["broken_scorer"],
                },
            ).reward
        }
    )
    with pytest.raises(RewardError, match=r"reward 'broken_scorer' returned 7 scores for 8 completions"):
        train(recipe)


def test_offline_copg_on_scored_rows_pairs_completions_of_a_prompt(tiny_model_dir, tmp_path):
    """(prompt, completion, reward) rows: every two completions of a prompt form a pair, with rewards."""
    import datasets

    from align.data import rows_to_pairs

    table = datasets.Dataset.from_dict(
        {
            "prompt": ["a", "a", "a", "b", "c", "c"],
            "completion": [" x", " y", " z", " w", " u", " v"],
            "reward": [1.0, 0.0, 0.5, 2.0, -1.0, 1.0],
        }
    )
    pairs, ties = rows_to_pairs(table, "prompt", "completion", "reward")
    pairs = pairs.to_dict()
    assert ties == 0
    assert pairs["prompt"] == ["a", "a", "a", "c"]  # b has one row: no pair
    assert list(zip(pairs["chosen"], pairs["rejected"])) == [(" x", " y"), (" x", " z"), (" y", " z"), (" u", " v")]
    assert pairs["chosen_reward"] == [1.0, 1.0, 0.0, -1.0] and pairs["rejected_reward"] == [0.0, 0.5, 0.5, 1.0]

    rows = tmp_path / "scored.jsonl"
    rows.write_text(
        "".join(
            f'{{"prompt": "the film", "completion": " {w} .", "reward": {r}}}\n'
            for w, r in [("was good", 1), ("was bad", -1), ("was fine", 0)]
        )
    )
    recipe = validate(
        Recipe,
        {
            "model": {"path": str(tiny_model_dir)},
            "data": {"train": str(rows)},
            "objective": {"name": "copg", "beta": 0.5, "mode": "offline"},
            "train": {"steps": 2, "batch_size": 3},
            "output": {"dir": str(tmp_path / "run"), "report": False},
        },
    )
    summary = train(recipe)
    assert summary["skipped_steps"] == 0
    assert _metrics(tmp_path / "run")[0]["reward_mean"] == pytest.approx(0.0)  # rewards (1,-1,1,0,-1,0) mean 0


def test_dpo_on_scored_rows_orders_each_pair_by_reward_and_drops_ties(tiny_model_dir, tmp_path):
    """DPO/IPO read only a pair's order: from (prompt, completion, reward) rows the higher-reward
    row is chosen whatever the file order, and ties are dropped. Trained on rows listed worse
    first, DPO ends at the same weights as on the explicit (chosen, rejected) file."""
    import datasets

    from align.data import rows_to_pairs

    table = datasets.Dataset.from_dict(
        {"prompt": ["a", "a", "a"], "completion": [" bad", " good", " same"], "reward": [0.0, 1.0, 0.0]}
    )
    pairs, ties = rows_to_pairs(table, "prompt", "completion", "reward", ordered=True)
    pairs = pairs.to_dict()
    assert ties == 1  # (" bad", " same") have equal rewards
    assert list(zip(pairs["chosen"], pairs["rejected"])) == [(" good", " bad"), (" good", " same")]
    assert pairs["chosen_reward"] == [1.0, 1.0] and pairs["rejected_reward"] == [0.0, 0.0]

    rows, explicit = tmp_path / "rows.jsonl", tmp_path / "pairs.jsonl"
    data = [("the film", " was bad .", " was good ."), ("the cast", " is dull .", " is great .")]
    rows.write_text(
        "".join(
            f'{{"prompt": "{p}", "completion": "{c}", "reward": {r}}}\n'
            for p, worse, better in data
            for c, r in [(worse, 0), (better, 1)]  # the worse row first
        )
    )
    explicit.write_text(
        "".join(f'{{"prompt": "{p}", "chosen": "{better}", "rejected": "{worse}"}}\n' for p, worse, better in data)
    )
    finals = {}
    for name, path in [("rows", rows), ("explicit", explicit)]:
        recipe = validate(
            Recipe,
            {
                "model": {"path": str(tiny_model_dir)},
                "data": {"train": str(path)},
                "objective": {"name": "dpo", "beta": 0.1},
                "train": {"steps": 2, "batch_size": 2, "optimizer": "sgd", "lr": 2.0, "max_grad_norm": None},
                "output": {"dir": str(tmp_path / name), "report": False},
            },
        )
        train(recipe)
        finals[name] = final_params(tmp_path / name)
    assert max_diff(finals["rows"], finals["explicit"]) < 1e-6


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


TIGHT = {  # the objective with a tight clip, and an SGD step size that makes later updates clip
    "grpo_tight": ({"name": "grpo", "beta": 0.04, "k": 2, "options": {"clip_low": 0.01, "clip_high": 0.01}}, 3.0),
    "ppo_tight": ({"name": "ppo", "beta": 0.04, "k": 2, "options": {"clip": 0.01, "value_clip": 0.01}}, 0.5),
}


@pytest.mark.parametrize("tight", list(TIGHT))
def test_several_updates_per_batch_keep_pi_old(tight, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """train.updates_per_batch: 3 on GRPO with a tight clip: the later updates read their ratios
    against the sampling policy's log-probs (kept from the first), so they clip; were π_old taken
    from the current weights, every ratio would be 1 and nothing would clip. The scheduler counts
    every update, and 8 × 1 == 2 × 4 still holds with several updates. PPO's critic keeps V_old
    the same way (its value clip reads it)."""
    objective, lr = TIGHT[tight]
    monkeypatch.setitem(OBJECTIVES, tight, (objective, "prompts", {"reward": LENGTH}))
    results, clip = {}, {}
    for batch, accumulation in [(8, 1), (2, 4)]:
        run = tmp_path / f"b{batch}x{accumulation}"
        summary = train(
            make_recipe(
                tiny_model_dir,
                tiny_data_files,
                run,
                tight,
                batch_size=batch,
                gradient_accumulation_steps=accumulation,
                updates_per_batch=3,
                optimizer="sgd",
                lr=lr,
                max_grad_norm=None,
                lr_scheduler="constant",
            )
        )
        assert summary["skipped_steps"] == 0 and summary["steps"] == 2
        results[(batch, accumulation)] = final_params(run)
        clip[(batch, accumulation)] = [r["clip_fraction"] for r in _metrics(run)]
    assert max_diff(results[(8, 1)], results[(2, 4)]) < 2e-5
    assert all(c > 0 for c in clip[(8, 1)]), clip  # the last update of each batch clips
    one = train(
        make_recipe(
            tiny_model_dir,
            tiny_data_files,
            tmp_path / "one",
            tight,
            batch_size=8,
            optimizer="sgd",
            lr=lr,
            max_grad_norm=None,
            lr_scheduler="constant",
        )
    )
    assert one["steps"] == 2 and all(r["clip_fraction"] == 0 for r in _metrics(tmp_path / "one"))


def test_mini_batches_step_once_each_against_pi_old(tiny_model_dir, tiny_data_files, tmp_path, monkeypatch):
    """train.mini_batches: 2 with one pass: the rollout draws 2 × batch_size prompts (the same 8
    as a batch-8 run: its first step's reward mean, averaged over the mini-batches, is the same
    number), each mini-batch is one optimizer step (the linear schedule ends at 0 after 4), and
    the second mini-batch's ratios read the policy that sampled, so a tight clip clips with a
    single pass; 4 × 1 == 2 × 2 inside each mini-batch."""
    objective, lr = TIGHT["grpo_tight"]
    monkeypatch.setitem(OBJECTIVES, "grpo_tight", (objective, "prompts", {"reward": LENGTH}))
    sgd = {"optimizer": "sgd", "lr": lr, "max_grad_norm": None}
    results, records = {}, {}
    for batch, accumulation in [(4, 1), (2, 2)]:
        run = tmp_path / f"b{batch}x{accumulation}"
        fields = {"batch_size": batch, "gradient_accumulation_steps": accumulation, "mini_batches": 2}
        summary = train(make_recipe(tiny_model_dir, tiny_data_files, run, "grpo_tight", **fields, **sgd))
        assert summary["skipped_steps"] == 0 and summary["steps"] == 2
        results[(batch, accumulation)], records[(batch, accumulation)] = final_params(run), _metrics(run)
    assert max_diff(results[(4, 1)], results[(2, 2)]) < 2e-5
    steps = records[(4, 1)]
    assert all(r["clip_fraction"] > 0 for r in steps), steps
    assert steps[-1]["lr"] == 0.0 and steps[0]["lr"] == pytest.approx(lr / 2)  # 4 updates scheduled, 2 taken by step 1
    whole = tmp_path / "whole"
    train(make_recipe(tiny_model_dir, tiny_data_files, whole, "grpo_tight", batch_size=8, steps=1, **sgd))
    first = _metrics(whole)[0]
    assert first["clip_fraction"] == 0
    for key in ("reward_mean", "completion_length", "tokens"):
        assert steps[0][key] == pytest.approx(first[key], rel=1e-6), key


@pytest.mark.parametrize("key, mini_batches", [("grpo", 1), ("ppo", 1), ("ppo", 2)])
def test_resume_is_exact_with_several_updates_per_batch(key, mini_batches, tiny_model_dir, tiny_data_files, tmp_path):
    """GRPO and PPO (with its critic), 2 passes per batch (in 2 mini-batches too), a linear
    schedule over all of their updates: SIGTERM at step 2 and a resume to 4 equal the
    uninterrupted run bit for bit (the scheduler's count included)."""
    fields = {"steps": 4, "batch_size": 4 // mini_batches, "updates_per_batch": 2, "mini_batches": mini_batches}
    straight = tmp_path / "straight"
    train(make_recipe(tiny_model_dir, tiny_data_files, straight, key, **fields))
    interrupted = tmp_path / "interrupted"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, interrupted, key, **fields)

    def stop_at_two(step: int, record: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(recipe, on_step=stop_at_two)["steps"] == 2
    assert train(recipe.model_copy(update={"resume": "latest"}))["steps"] == 4
    a, b = final_params(straight), final_params(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [r["lr"] for r in _metrics(straight)]
    assert lrs == [r["lr"] for r in _metrics(interrupted)] and lrs[-1] == 0.0  # 8 updates scheduled, 8 taken


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
    assert all(r["replayed_fraction"] == 0 for r in _metrics(mixed))


@pytest.mark.parametrize("key", ["copg", "rloo"])  # rloo: the buffer keeps its groups' sampler log-probs
def test_replay_trains_on_past_groups_and_resumes_exactly(key, tiny_model_dir, tiny_data_files, tmp_path):
    """capacity 3, mix 0.5: half of each step's groups come from the last 3 steps (ages up to 2);
    the buffer is saved in the checkpoint, so SIGTERM at step 2 and a resume to 4 equal the
    uninterrupted run bit for bit; an offline objective is refused the buffer."""
    fields = {"steps": 4, "batch_size": 4, "replay": {"capacity_steps": 3, "mix": 0.5}}
    straight = tmp_path / "straight"
    train(make_recipe(tiny_model_dir, tiny_data_files, straight, key, **fields))
    records = _metrics(straight)
    assert [r["replayed_fraction"] for r in records] == [0.5] * 4
    assert records[0]["replay_age"] == 0 and max(r["replay_age"] for r in records) > 0
    interrupted = tmp_path / "interrupted"
    recipe = make_recipe(tiny_model_dir, tiny_data_files, interrupted, key, **fields)

    def stop_at_two(step: int, record: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(recipe, on_step=stop_at_two)["steps"] == 2
    assert train(recipe.model_copy(update={"resume": "latest"}))["steps"] == 4
    a, b = final_params(straight), final_params(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RecipeError, match=r"train.replay: 'dpo' is trained on a fixed dataset"):
        make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "x", "dpo", replay={"capacity_steps": 2})


def test_a_mini_batch_left_without_scored_samples_still_steps(tiny_model_dir, tiny_data_files, tmp_path):
    """Every sample of the first mini-batch unscored (a TRL reward's None): its step runs at zero
    weight, the other mini-batch trains, and the step's metrics are the scored samples' own (the
    empty mini-batch adds nothing to the means)."""
    scored: list[list[float]] = []

    def scores(n: int, completions: list[str]) -> list[float | None]:
        out = [None if i < 4 else float(len(x)) for i, x in enumerate(completions)]
        scored.append([x for x in out if x is not None])
        return out

    _register_test_reward("none_for_first_four", scores)
    sgd = {"optimizer": "sgd", "lr": SGD_LR["grpo"], "max_grad_norm": None}
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "grpo", batch_size=2, mini_batches=2, **sgd)
    raw = {
        "model": {"path": "m"},
        "data": {"train": "d"},
        "objective": {"name": "rloo"},
        "reward": ["none_for_first_four"],
    }
    recipe = recipe.model_copy(update={"reward": validate(Recipe, raw).reward})
    summary = train(recipe)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    records = _metrics(tmp_path / "run")
    assert all(r["unscored"] == 4 and math.isfinite(r["loss"]) for r in records)
    for record, step_scores in zip(records, scored):
        assert record["reward_mean"] == pytest.approx(sum(step_scores) / len(step_scores))
        assert 0 < record["completion_length"] < GENERATION["max_new_tokens"]
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    final = final_params(tmp_path / "run")
    assert max_diff({k: final[k] for k in initial}, initial) > 1e-5
