"""Chat data is tokenised as inference sees it: special tokens once, never twice."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from align.data import encode_prompts, prompt_rows
from align.recipe import DataConfig

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
