"""Data (align/data.py): chat data is tokenised as inference sees it, special tokens once, never
twice; a bad row is named with its column; prompts are built from templates over columns and cut
inside their source column; scored rows become pairs (CoPG: every two completions of a prompt,
DPO: ordered by reward, ties dropped)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import final_params, max_diff, run_cli, run_metrics
from transformers import AutoTokenizer

from align.config import validate
from align.data import encode_prompts, prompt_rows
from align.recipe import DataConfig, Recipe
from align.trainer import train

BOS_TEMPLATE = (  # Llama-3 / Gemma / Mistral style: the template writes the BOS itself
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLAIN_TEMPLATE = (  # Qwen style: no BOS in the template
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("template", [BOS_TEMPLATE, PLAIN_TEMPLATE], ids=["bos-in-template", "no-bos-in-template"])
def test_chat_prompts_carry_one_bos(template, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # its encoder prepends <s> by itself
    tokenizer.chat_template = template
    messages = [[{"role": "user", "content": "the plot was"}]]
    cfg = DataConfig(train="x.jsonl")
    prompts, ids, _ = prompt_rows(tokenizer, {"prompt": messages}, cfg, "x.jsonl")
    bos = tokenizer.bos_token_id
    assert ids[0][0] == bos and ids[0][1] != bos, ids[0][:4]
    assert ids[0].count(bos) == 1
    assert encode_prompts(tokenizer, prompts, 256) == ids  # the report and samplers encode the same way
    plain, plain_ids, _ = prompt_rows(tokenizer, {"prompt": ["the plot was"]}, cfg, "x.jsonl")
    assert plain_ids[0].count(bos) == 1 and plain_ids[0][0] == bos  # a bare prompt still gets its BOS


def test_bad_data_rows_name_row_and_column(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the film", "completion": " was good ."}\n{"prompt": "  ", "completion": " ok ."}\n')
    out = run_cli("sft", _write_recipe(tmp_path, tiny_model_dir, bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "row 1: column 'prompt' is empty" in out.stderr
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"body": "the film"}\n')  # (a text column alone is TRL's language-modeling format)
    out = run_cli("sft", _write_recipe(tmp_path, tiny_model_dir, missing))
    assert out.returncode == 2 and "missing column 'prompt'" in out.stderr


def _write_recipe(tmp_path: Path, model_dir, data: Path) -> str:
    path = tmp_path / f"{data.stem}.yaml"
    path.write_text(f"model: {{path: {model_dir}}}\ndata: {{train: {data}}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    return str(path)


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
    assert run_metrics(tmp_path / "run")[0]["reward_mean"] == pytest.approx(0.0)  # rewards (1,-1,1,0,-1,0) mean 0


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


def test_sft_on_a_text_column_trains_every_token_after_the_bos(tiny_model_dir, tiny_data_files, tmp_path):
    """TRL's language-modeling rows ({"text": ...}): the whole text (and EOS) is the completion,
    after the tokenizer's BOS; training on four texts lowers their loss."""
    import json

    from helpers import make_recipe, run_metrics
    from transformers import AutoTokenizer

    from align.run_data import OfflineData
    from align.trainer import train

    texts = ["a fine film with a warm heart", "the plot drags", "great acting all round", "dull and long"]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "sft", steps=12, lr=1e-2, batch_size=4)
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"train": str(path)})})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = OfflineData(recipe, tokenizer, tokenizer.eos_token_id)
    assert rows.prompt_ids == [[tokenizer.bos_token_id]] * 4
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert sorted(rows.completion_ids[0]) == sorted(expected)
    train(recipe)
    losses = [r["loss"] for r in run_metrics(tmp_path / "run")]
    assert losses[-1] < 0.8 * losses[0]
