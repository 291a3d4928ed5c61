"""Chat data is exact and TRL's dataset formats load unchanged.

A conversational completion is trained on the tokens the chat template renders for the assistant
turn (end-of-turn included, cut where generation stops), with ``system_prompt`` and
``chat_template_kwargs`` applied; ``messages``, implicit-prompt preference and unpaired (label)
rows become the columns the loaders read, and rows that do not fit are one line before any
model loads."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer

from align.data import DataError, completion_token_ids, prompt_rows
from align.formats import normalise
from align.recipe import DataConfig

# the assistant turn ends with an end-of-turn marker, then EOS, then a newline (ChatML / Llama-3 style)
EOT_THEN_EOS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|></s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# no EOS anywhere in the template (and no BOS): the rendering gets one EOS appended
EOT_ONLY = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WITH_KWARG = (
    "{% if greet %}HELLO {% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
USER = [{"role": "user", "content": "the plot was"}]
REPLY = [{"role": "assistant", "content": " great fun"}]


def _tokenizer(model_dir, template):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    "template, expected",
    [(EOT_THEN_EOS, " great fun<|end|></s>"), (EOT_ONLY, " great fun<|end|>\n</s>")],
    ids=["eos-in-template", "no-eos-in-template"],
)
def test_a_chat_completion_is_the_templates_assistant_turn(tiny_model_dir, template, expected):
    tokenizer = _tokenizer(tiny_model_dir, template)
    cfg = DataConfig(train="x.jsonl")
    _, prompt_ids, messages = prompt_rows(tokenizer, {"prompt": [USER]}, cfg, "x.jsonl")
    for completion in (REPLY, " great fun"):  # messages, or the reply's text after a chat prompt
        ids = completion_token_ids(tokenizer, messages, [completion], cfg, "x.jsonl", tokenizer.eos_token_id)[0]
        assert tokenizer.decode(ids) == expected  # the end-of-turn marker is trained on
        assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.bos_token_id not in ids
    # prompt + completion is the template's rendering of the whole conversation, up to where generation stops
    # (a template without BOS gets the tokenizer's own, once, as at inference)
    whole = tokenizer.apply_chat_template([*USER, *REPLY], tokenize=False)
    whole = whole if whole.startswith("<s>") else "<s>" + whole
    rendered = tokenizer.decode(prompt_ids[0] + ids)
    assert whole.startswith(rendered.removesuffix("</s>")) and rendered.count("<s>") == 1


def test_system_prompt_and_template_kwargs(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir, WITH_KWARG)
    cfg = DataConfig(train="x.jsonl", system_prompt="be brief", chat_template_kwargs={"greet": True})
    own_system = [{"role": "system", "content": "be kind"}, *USER]
    prompts, _, messages = prompt_rows(tokenizer, {"prompt": [USER, own_system]}, cfg, "x.jsonl")
    assert prompts[0] == "HELLO <|system|>be brief\n<|user|>the plot was\n<|assistant|>"
    assert prompts[1] == "HELLO <|system|>be kind\n<|user|>the plot was\n<|assistant|>"  # its own is kept
    assert messages[0][0] == {"role": "system", "content": "be brief"}
    plain = DataConfig(train="x.jsonl", chat_template=True, system_prompt="be brief")
    text_prompts, _, _ = prompt_rows(tokenizer, {"prompt": ["the plot was"]}, plain, "x.jsonl")
    assert text_prompts[0] == "<|system|>be brief\n<|user|>the plot was\n<|assistant|>"


def _table(rows: list[dict]):
    return datasets.Dataset.from_list(rows)


def test_messages_become_prompt_and_last_assistant_turn():
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "a film?"},
        {"role": "assistant", "content": "this one"},
    ]
    cfg = DataConfig(train="x.jsonl")
    out = normalise(_table([{"messages": conversation, "id": 3}]), cfg, "rows", "x.jsonl")
    assert out[0]["prompt"] == conversation[:3] and out[0]["completion"] == conversation[3:]
    assert out[0]["id"] == 3
    online = normalise(_table([{"messages": conversation}]), cfg, "online", "x.jsonl")
    assert online[0]["prompt"] == conversation[:3]  # a closing assistant turn is not part of the prompt
    no_reply = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    with pytest.raises(
        DataError, match=r"row 1: column 'messages' has no assistant turn \(roles \['system', 'user'\]\)"
    ):
        normalise(_table([{"messages": conversation}, {"messages": no_reply}]), cfg, "rows", "x.jsonl")


def test_an_implicit_prompt_is_the_shared_beginning():
    cfg = DataConfig(train="x.jsonl")
    question = {"role": "user", "content": "a film?"}
    rows = [
        {
            "chosen": [question, {"role": "assistant", "content": "this one"}],
            "rejected": [question, {"role": "assistant", "content": "no"}],
        }
    ]
    out = normalise(_table(rows), cfg, "pairs", "x.jsonl")[0]
    assert out["prompt"] == [question] and out["chosen"] == [{"role": "assistant", "content": "this one"}]
    assert out["rejected"] == [{"role": "assistant", "content": "no"}]
    text = normalise(_table([{"chosen": "The film was great", "rejected": "The film was grim"}]), cfg, "pairs", "x")
    assert (text[0]["prompt"], text[0]["chosen"], text[0]["rejected"]) == ("The film was ", "great", "grim")
    with pytest.raises(DataError, match=r"row 0: chosen and rejected share no prompt; give a 'prompt' column"):
        normalise(_table([{"chosen": "good", "rejected": "bad"}]), cfg, "pairs", "x")
    with pytest.raises(DataError, match=r"row 0: one of chosen and rejected is the beginning of the other"):
        normalise(_table([{"chosen": "same text", "rejected": "same text"}]), cfg, "pairs", "x")


def test_unpaired_label_rows_pair_up_by_label():
    cfg = DataConfig(train="x.jsonl")
    rows = [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False}]
    out = normalise(_table(rows), cfg, "pairs", "x.jsonl")
    assert out["reward"] == [1.0, 0.0]
    with pytest.raises(DataError, match=r"row 0: column 'label' must be true/false, got 'yes'"):
        normalise(_table([{"prompt": "p", "completion": "c", "label": "yes"}]), cfg, "pairs", "x.jsonl")
