"""TRL's dataset formats, read unchanged: each is turned into the columns the loaders read.

Standard (text) and conversational (lists of ``{"role", "content"}`` messages) alike:

- prompt-only: ``prompt`` -- as is (online objectives);
- prompt-completion: ``prompt``, ``completion`` -- as is (SFT);
- conversational language modeling: ``messages`` -- ``prompt`` = the turns before the last
  assistant turn, ``completion`` = that turn (online: the conversation is the prompt);
- preference, explicit prompt: ``prompt``, ``chosen``, ``rejected`` -- as is (DPO, IPO, CoPG);
- preference, implicit prompt: ``chosen``, ``rejected`` -- ``prompt`` = their longest common
  beginning (TRL's ``extract_prompt``), the rest of each side its completion;
- unpaired preference: ``prompt``, ``completion``, ``label`` -- ``reward`` = the label (1 / 0),
  so the rows of one prompt pair up by it; an objective that learns from each row's label (KTO)
  reads the rows as they are (``unpaired_labels``);
- language modeling: ``text`` (SFT) -- ``completion`` = the text, every token of it trained on
  after ``prompt`` = the tokenizer's BOS (its EOS where it has none: GPT-2's document separator),
  as TRL's SFTTrainer trains on a ``text`` column (``language_modeling``).

Rows that do not fit (messages with no assistant turn, two identical sides of a pair) are one
line naming the row, raised while the data is read -- before any model loads.
"""

from __future__ import annotations

from typing import Literal

from align.data import DataError

Use = Literal["online", "rows", "pairs"]


def normalise(table, cfg, use: Use, source: str):
    """``table`` (a ``datasets.Dataset``) in the columns the loader for ``use`` reads: prompts for
    an online objective, (prompt, completion) rows for SFT, pairs for a paired objective."""
    names = table.column_names
    if cfg.prompt_column not in names and cfg.messages_column in names and not cfg.prompt_template:
        table = _split_messages(table, cfg, use, source)
    names = table.column_names
    if use == "pairs" and cfg.prompt_column not in names and {cfg.chosen_column, cfg.rejected_column} <= set(names):
        table = _extract_prompt(table, cfg, source)
    names = table.column_names
    if (
        use == "pairs"
        and cfg.chosen_column not in names
        and cfg.reward_column not in names
        and cfg.label_column in names
        and cfg.completion_column in names
    ):
        labels = table[cfg.label_column]
        bad = next((i for i, v in enumerate(labels) if not isinstance(v, (bool, int, float)) or v is None), None)
        if bad is not None:
            raise DataError(
                f"data {source!r} row {bad}: column {cfg.label_column!r} must be true/false, got {labels[bad]!r}"
            )
        table = table.add_column(cfg.reward_column, [float(v) for v in labels])
    return table


def unpaired_labels(table, cfg, source: str, name: str) -> list[float]:
    """TRL's unpaired preference rows (prompt, completion, label) for an objective that learns from
    each row's label (KTO): the labels as 1.0 (desirable) / 0.0. Preference pairs, or rows with no
    label, are refused in one line."""
    names = table.column_names
    if cfg.chosen_column in names or cfg.rejected_column in names:
        raise DataError(
            f"data {source!r}: {name!r} takes unpaired ({cfg.prompt_column}, {cfg.completion_column}, "
            f"{cfg.label_column}) rows (TRL's unpaired preference format), not preference pairs "
            f"({cfg.chosen_column}/{cfg.rejected_column} columns; columns: {names})"
        )
    if cfg.label_column not in names:
        raise DataError(
            f"data {source!r}: missing column {cfg.label_column!r}: {name!r} takes unpaired "
            f"({cfg.prompt_column}, {cfg.completion_column}, {cfg.label_column}) rows (columns: {names})"
        )
    labels = table[cfg.label_column]
    bad = next((i for i, v in enumerate(labels) if v not in (True, False) or isinstance(v, str)), None)
    if bad is not None:
        raise DataError(
            f"data {source!r} row {bad}: column {cfg.label_column!r} must be true/false, got {labels[bad]!r}"
        )
    return [1.0 if v else 0.0 for v in labels]


def language_modeling(table, cfg, tokenizer, source: str):
    """A ``text``-only table (TRL's standard language-modeling format) as (prompt, completion) rows:
    the document-start token, then the whole text; other tables as they are."""
    names = table.column_names
    if cfg.text_column not in names or {cfg.prompt_column, cfg.completion_column, cfg.messages_column} & set(names):
        return table
    start = getattr(tokenizer, "bos_token", None) or getattr(tokenizer, "eos_token", None)
    if not start:
        raise DataError(
            f"data {source!r}: {cfg.text_column!r} rows are trained after a document-start token, and the "
            "tokenizer has neither a BOS nor an EOS token; give prompt and completion columns"
        )
    table = table.add_column(cfg.prompt_column, [start] * len(table))
    return table.rename_column(cfg.text_column, cfg.completion_column)


def completion_text(value) -> str:
    """A completion as text: a string as it is; a conversational one (a list of messages, as a
    TRL ``completion`` column holds) as its messages' content, joined."""
    if _is_messages(value):
        return "".join(str(m.get("content", "")) for m in value)
    return value


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _split_messages(table, cfg, use: Use, source: str):
    import datasets

    column = cfg.messages_column
    rows = table.to_dict()
    prompts, completions = [], []
    for index, messages in enumerate(rows.pop(column)):
        if not _is_messages(messages) or not messages:
            raise DataError(f"data {source!r} row {index}: column {column!r} is not a list of chat messages")
        roles = [m["role"] for m in messages]
        last = max((i for i, r in enumerate(roles) if r == "assistant"), default=None)
        if use == "online":  # the conversation so far is the prompt; a closing assistant turn is dropped
            prompts.append(messages[:last] if last == len(messages) - 1 else messages)
            continue
        if last is None:
            raise DataError(
                f"data {source!r} row {index}: column {column!r} has no assistant turn (roles {roles}); "
                "SFT trains on the last one"
            )
        if last == 0:
            raise DataError(f"data {source!r} row {index}: column {column!r} opens with the assistant turn: no prompt")
        prompts.append(messages[:last])
        completions.append([messages[last]])
    rows[cfg.prompt_column] = prompts
    if use != "online":
        rows[cfg.completion_column] = completions
    return datasets.Dataset.from_dict(rows)


def _extract_prompt(table, cfg, source: str):
    """TRL's implicit prompt: the longest shared beginning of chosen and rejected (messages, or
    text cut back to before a space), the rest of each is its completion."""
    import datasets

    rows = table.to_dict()
    chosen, rejected = rows.pop(cfg.chosen_column), rows.pop(cfg.rejected_column)
    prompts, chosen_out, rejected_out = [], [], []
    for index, (a, b) in enumerate(zip(chosen, rejected)):
        text = isinstance(a, str) and isinstance(b, str)
        if not text and not (_is_messages(a) and _is_messages(b)):
            raise DataError(f"data {source!r} row {index}: chosen and rejected must both be text or both chat messages")
        shared = 0  # messages, or characters, in common
        while shared < min(len(a), len(b)) and a[shared] == b[shared]:
            shared += 1
        if text and 0 < shared < min(len(a), len(b)) and a[shared - 1] != " ":
            shared = a.rfind(" ", 0, shared) + 1  # do not split a word between prompt and reply
        prompt, rest_a, rest_b = a[:shared], a[shared:], b[shared:]
        if not prompt:
            raise DataError(
                f"data {source!r} row {index}: chosen and rejected share no prompt; "
                f"give a {cfg.prompt_column!r} column (TRL's explicit-prompt format)"
            )
        if not rest_a or not rest_b:
            raise DataError(
                f"data {source!r} row {index}: one of chosen and rejected is the beginning of the other, so no "
                f"prompt can be split off; give a {cfg.prompt_column!r} column"
            )
        prompts.append(prompt)
        chosen_out.append(rest_a)
        rejected_out.append(rest_b)
    rows.update({cfg.prompt_column: prompts, cfg.chosen_column: chosen_out, cfg.rejected_column: rejected_out})
    return datasets.Dataset.from_dict(rows)
