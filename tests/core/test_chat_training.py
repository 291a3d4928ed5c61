"""Chat data and TRL's conventions through whole runs: SFT on ``messages``, DPO on implicit-prompt
conversations with a held-out pair split, and a TRL reward that gets message lists, token ids
and the trainer state, and returns None for samples it does not score."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import align.run_setup as trainer_mod
from align.config import validate
from align.data import DataError
from align.jobs import train as train_job
from align.recipe import LoraConfig, Recipe
from align.run_data import OfflineData

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|></s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template whose assistant turn ends in an end-of-turn marker."""
    out = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recipe(model_dir, train_file, run_dir, objective: dict, data: dict | None = None, reward=None, **train) -> Recipe:
    return validate(
        Recipe,
        {
            "reward": reward or [],
            "model": {"path": str(model_dir)},
            "data": {"train": str(train_file), **(data or {})},
            "objective": objective,
            "generation": {"max_new_tokens": 6},
            "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, **train},
            "output": {"dir": str(run_dir), "report": False, "sample_every": 0},
        },
    )


def test_sft_on_messages_and_a_bad_row_before_models_load(chat_model_dir, tiny_data_files, tmp_path, monkeypatch):
    sft = _rows(tiny_data_files["sft"])[:16]
    conversations = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in sft
    ]
    data = write_jsonl(tmp_path / "messages.jsonl", conversations)
    recipe = _recipe(chat_model_dir, data, tmp_path / "run", {"name": "sft"})
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    rows = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    assert tokenizer.decode(rows.completion_ids[0][0]) == sft[0]["completion"] + "<|end|></s>"
    assert rows.prompts[0] == f"<|user|>{sft[0]['prompt']}<|end|></s>\n<|assistant|>"
    assert train_job.run(recipe)["steps"] == 2

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(trainer_mod, "load_models", no_models)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*conversations[:3], {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl' row 3: column 'messages' has no assistant turn"):
        train_job.run(_recipe(chat_model_dir, bad, tmp_path / "run_bad", {"name": "sft"}))


def _logprob_sums(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None]).sum())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_on_implicit_prompt_conversations_reports_held_out_pairs(lora, chat_model_dir, tiny_data_files, tmp_path):
    """The report's held-out margin against plain forwards of final/ and of the starting model. With
    LoRA the reference is the policy with its adapters off: the policy's own pass must keep them on."""
    pairs = _rows(tiny_data_files["pairs"])[:24]

    def turn(prompt, reply):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    implicit = [{"chosen": turn(p["prompt"], p["chosen"]), "rejected": turn(p["prompt"], p["rejected"])} for p in pairs]
    data = write_jsonl(tmp_path / "implicit.jsonl", implicit)
    recipe = _recipe(
        chat_model_dir, data, tmp_path / "run", {"name": "dpo", "beta": 0.1}, {"eval_fraction": 0.25}, steps=3
    )
    recipe.output.report = True
    if lora:
        recipe = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"lora": LoraConfig(r=8, alpha=16)})}
        )
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    rows = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    held = rows.held_out
    n_prompts = len({p["prompt"] for p in pairs})
    held_prompts = {m[0]["content"] for m in held.messages}
    assert len(held) == sum(1 for p in pairs if p["prompt"] in held_prompts) and len(held) + len(rows) == 24
    assert not held_prompts & {m[0]["content"] for m in rows.messages}  # none both trained on and measured
    assert len(held_prompts) == round(0.25 * n_prompts)
    train_job.run(recipe)
    report = json.loads((tmp_path / "run" / "report.json").read_text())["held_out_pairs"]
    assert report["pairs"] == len(held)
    # independent: plain forwards of final/ and of the starting model, one unpadded sequence each
    reference = AutoModelForCausalLM.from_pretrained(chat_model_dir).eval()
    if lora:  # final/ holds the adapters; the base model is the reference
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(chat_model_dir)
        policy = PeftModel.from_pretrained(base, tmp_path / "run" / "final").eval()
    else:
        policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    margins, correct = [], 0
    for i in range(len(held)):
        sides = [
            (
                _logprob_sums(policy, held.prompt_ids[i], held.completion_ids[t][i]),
                _logprob_sums(reference, held.prompt_ids[i], held.completion_ids[t][i]),
            )
            for t in range(2)
        ]
        margin = 0.1 * ((sides[0][0] - sides[0][1]) - (sides[1][0] - sides[1][1]))
        margins.append(margin)
        correct += margin > 0
    assert report["reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert report["reward_accuracy"] == pytest.approx(correct / len(held))
    assert report["reward_margin"] > 0  # three DPO steps at lr 1e-2 move the held-out margin up
    assert "## Held-out pairs" in (tmp_path / "run" / "report.md").read_text()


REWARD_FILE = """
import json, os

def score(prompts, completions, completion_ids, trainer_state, **kwargs):
    with open(os.environ["ALIGN_TEST_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                            "step": trainer_state.global_step, "max_steps": trainer_state.max_steps}) + "\\n")
    # every second sample is not this reward's to score
    return [None if i % 2 else float(len(c[0]["content"])) for i, c in enumerate(completions)]
"""


def test_a_trl_reward_gets_messages_ids_state_and_may_return_none(
    chat_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    prompts = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in _rows(tiny_data_files["prompts"])[:16]]
    data = write_jsonl(tmp_path / "chat_prompts.jsonl", prompts)
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    monkeypatch.setenv("ALIGN_TEST_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.chdir(tmp_path)
    reward = [{"name": "python", "options": {"path": "my_rewards.py", "function": "score"}}]
    recipe = _recipe(chat_model_dir, data, tmp_path / "run", {"name": "rloo", "k": 2, "beta": 0.05}, reward=reward)
    summary = train_job.run(recipe)
    assert summary["skipped_steps"] == 0
    calls = _rows(tmp_path / "calls.jsonl")
    assert [c["step"] for c in calls] == [0, 1] and {c["max_steps"] for c in calls} == {2}
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    first = calls[0]
    assert first["prompts"][0][0]["role"] == "user" and isinstance(first["prompts"][0], list)
    for completion, ids in zip(first["completions"], first["completion_ids"]):
        assert completion == [{"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}]
    records = _rows(tmp_path / "run" / "metrics.jsonl")
    scored = [float(len(c[0]["content"])) for c in first["completions"][::2]]
    assert records[0]["unscored"] == 4  # 8 samples, every second one unscored
    assert records[0]["reward_mean"] == pytest.approx(sum(scored) / len(scored))
    # each group keeps one scored sample: no baseline, so at step 0 (KL = 0) its advantage is its reward
    assert records[0]["advantage"] == pytest.approx(sum(scored) / len(scored), rel=1e-5)


DEMO_REWARD_FILE = """
import json, os

def score(prompts, completions, **kwargs):
    with open(os.environ["ALIGN_TEST_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions}) + "\\n")
    return [float(len(c[0]["content"])) for c in completions]  # TRL's convention: message lists
"""


@pytest.mark.parametrize("demo_format", ["text", "messages"])
def test_rcfd_on_chat_data_scores_demonstrations_as_it_scores_samples(
    demo_format, chat_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    """Conversational RCfD with a TRL reward that reads ``c[0]["content"]``: demonstrations (text, or
    an assistant message list as TRL's completion column holds) reach it as the samples do, one
    assistant message each after the prompt's messages, and the run trains."""
    rows = _rows(tiny_data_files["demos"])[:16]

    def demonstration(text):
        return text if demo_format == "text" else [{"role": "assistant", "content": text}]

    chat = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "demonstration": demonstration(r["demonstration"])}
        for r in rows
    ]
    data = write_jsonl(tmp_path / "chat_demos.jsonl", chat)
    (tmp_path / "my_rewards.py").write_text(DEMO_REWARD_FILE)
    monkeypatch.setenv("ALIGN_TEST_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.chdir(tmp_path)
    reward = [{"name": "python", "options": {"path": "my_rewards.py", "function": "score"}}]
    recipe = _recipe(chat_model_dir, data, tmp_path / "run", {"name": "rcfd", "k": 2, "beta": 0.05}, reward=reward)
    summary = train_job.run(recipe)
    assert summary["skipped_steps"] == 0 and summary["steps"] == 2
    calls = _rows(tmp_path / "calls.jsonl")
    demos = {r["demonstration"] for r in rows}
    demo_calls = [c for c in calls if all(m[0]["content"] in demos for m in c["completions"])]
    assert demo_calls, "the demonstrations were never scored"
    for call in calls:  # samples and demonstrations alike: messages in, one assistant message out
        assert all(isinstance(p, list) and p[0]["role"] == "user" for p in call["prompts"])
        assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in call["completions"])
    prompt_of = {r["demonstration"]: r["prompt"] for r in rows}
    for call in demo_calls:  # each demonstration is scored after its own prompt
        for p, c in zip(call["prompts"], call["completions"]):
            assert p[0]["content"] == prompt_of[c[0]["content"]]
    records = _rows(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
