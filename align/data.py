"""Data: prompts, pairs and SFT rows through ``datasets``; tokenisation and padding.

Rows are checked once at load (missing column, empty prompt) with errors naming the row and
column. Step batches are drawn from per-epoch permutations that depend only on (seed, step),
so a resumed run, or a run split over more processes, sees the same rows at the same step.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from torch import Tensor

from align.config import RecipeError

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(RecipeError):
    """Bad data rows: the message names the file, row and column."""


def load_table(source: str, split: str = "train", subset: str | None = None):
    """A ``datasets.Dataset`` from a local file (by extension) or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    datasets.logging.get_logger("datasets.packaged_modules.json.json").setLevel(50)  # we report it in one line
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in _LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"data {source!r}: no such file")
        if not path.read_bytes().strip():
            raise DataError(f"data {source!r}: the file is empty (no rows)")
        try:
            return datasets.load_dataset(_LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as err:  # a malformed file: name it, keep the parser's reason
            reason = str(err.__cause__ or err).strip().splitlines()[-1] if str(err.__cause__ or err).strip() else ""
            raise DataError(f"data {source!r}: cannot be read as {_LOCAL_FORMATS[suffix]} ({reason})") from None
    if path.exists() and not path.is_dir():
        raise DataError(
            f"data {source!r}: {suffix or 'no extension'} is not a data format align reads; "
            f"expected one of {sorted(_LOCAL_FORMATS)}, a dataset directory or a hub dataset name"
        )
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else source, subset, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        # a hub name that cannot be reached or does not exist, a missing split or subset
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data {source!r}: cannot be loaded ({reason})") from None


def read_columns(source: str, table, columns: list[str], non_empty: list[str]) -> dict[str, list]:
    """Columns as python lists; a missing column or an empty text names the row and column."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"data {source!r}: missing column {missing[0]!r} (columns: {table.column_names})")
    try:
        out = {c: list(v) for c, v in table.select_columns(columns).to_dict().items()}
    except UnicodeDecodeError as err:
        raise DataError(
            f"data {source!r}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start} of a value)"
        ) from None
    for column in non_empty:
        for row, value in enumerate(out[column]):
            if isinstance(value, list) and value:  # chat messages
                continue
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"data {source!r} row {row}: column {column!r} is empty or not text")
    if not out[columns[0]]:
        raise DataError(f"data {source!r}: no rows")
    return out


def rows_to_pairs(table, prompt_column: str, completion_column: str, reward_column: str, ordered: bool = False):
    """(prompt, completion, reward) rows → every pair of completions of the same prompt, with
    their rewards as ``chosen_reward``/``rejected_reward``.

    ``ordered`` (objectives that read only the pair's order, DPO/IPO): the higher-reward row of
    each pair is ``chosen`` and tied pairs are dropped. Unordered (offline CoPG, which reads the
    reward gap): the order is immaterial and every pair is kept. Returns ``(pairs, n_ties_dropped)``.
    """
    import datasets

    columns = read_columns("pairs", table, [prompt_column, completion_column, reward_column], [prompt_column])
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(columns[prompt_column]):
        by_prompt.setdefault(prompt, []).append(i)
    out: dict[str, list] = {prompt_column: [], "chosen": [], "rejected": [], "chosen_reward": [], "rejected_reward": []}
    ties = 0
    for prompt, rows in by_prompt.items():
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                i, j = rows[a], rows[b]
                r_i, r_j = float(columns[reward_column][i]), float(columns[reward_column][j])
                if ordered and r_i == r_j:
                    ties += 1
                    continue
                if ordered and r_j > r_i:
                    i, j, r_i, r_j = j, i, r_j, r_i
                out[prompt_column].append(prompt)
                out["chosen"].append(columns[completion_column][i])
                out["rejected"].append(columns[completion_column][j])
                out["chosen_reward"].append(r_i)
                out["rejected_reward"].append(r_j)
    if not out["chosen"]:
        what = "two or more rows with different rewards" if ordered else "two or more rows"
        raise DataError(f"data: no prompt has {what} to pair (column {reward_column!r})")
    return datasets.Dataset.from_dict(out), ties


def step_rows(n_rows: int, step: int, rows_per_step: int, seed: int) -> list[int]:
    """Dataset indices for optimizer step ``step``: consecutive slices of per-epoch permutations."""
    start = step * rows_per_step
    out: list[int] = []
    while len(out) < rows_per_step:
        epoch, offset = divmod(start + len(out), n_rows)
        generator = torch.Generator().manual_seed(seed * 7_919 + epoch)
        order = torch.randperm(n_rows, generator=generator)
        take = min(rows_per_step - len(out), n_rows - offset)
        out.extend(order[offset : offset + take].tolist())
    return out


def message_text(value) -> str:
    """A completion given as chat messages (TRL's conversational format) → the assistant's text."""
    if isinstance(value, list):
        replies = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        return "".join(replies) if replies else "".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return value


def format_prompts(tokenizer, columns: dict[str, list], cfg, source: str) -> list[str]:
    """Prompt strings from a column or a ``prompt_template``; messages go through the chat template."""
    names = list(columns)
    return [_render(tokenizer, dict(zip(names, row)), cfg, source, i) for i, row in enumerate(zip(*columns.values()))]


def is_conversational(columns: dict[str, list], cfg) -> bool:
    """TRL's test: the data's own prompts are chat messages. Rewards written for TRL then get
    message lists; prompts that are text in the data (even wrapped by ``chat_template``) stay text."""
    return cfg.prompt_template is None and any(isinstance(v, list) for v in columns.get(cfg.prompt_column, []))


def prompt_messages(row: dict, cfg, source: str, index: int) -> str | list[dict]:
    """A row's prompt before rendering: its text (a column, or the ``prompt_template`` filled), or
    chat messages -- the column's own, or the text as one user turn (``chat_template``) -- led by
    ``system_prompt`` unless they open with a system turn of their own."""
    if cfg.prompt_template is not None:
        try:
            prompt = cfg.prompt_template.format(**row)
        except KeyError as err:
            raise DataError(f"data {source!r}: prompt_template uses missing column {err.args[0]!r}") from None
        except (ValueError, IndexError, AttributeError) as err:
            raise DataError(f"data {source!r} row {index}: prompt_template cannot be filled ({err})") from None
    else:
        prompt = row[cfg.prompt_column]
    if isinstance(prompt, str) and cfg.chat_template:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and cfg.system_prompt is not None:
        if not (prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system"):
            prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    return prompt


def apply_template(tokenizer, messages: list[dict], cfg, source: str, index: int, generation_prompt: bool) -> str:
    """Chat messages rendered by the tokenizer's template, with ``chat_template_kwargs``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"data {source!r} row {index}: chat messages, but the tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **cfg.chat_template_kwargs
        )
    except Exception as err:  # a template that raises on these messages (roles it does not allow, ...)
        raise DataError(f"data {source!r} row {index}: the chat template cannot render this row ({err})") from None


def _render(tokenizer, row: dict, cfg, source: str, index: int) -> str:
    prompt = prompt_messages(row, cfg, source, index)
    if isinstance(prompt, list):
        prompt = apply_template(tokenizer, prompt, cfg, source, index, generation_prompt=True)
    return prompt


def chat_completion_ids(
    tokenizer,
    prompts: list,
    completions: list,
    cfg,
    source: str,
    eos_token_id: int | None,
    rows: list[int] | None = None,
) -> list[list[int]]:
    """Completions of chat prompts as the template renders the assistant turn: the text after the
    rendered prompt (``add_generation_prompt``) in the rendering of prompt + reply, end-of-turn
    included. It is cut after its first EOS (where generation stops, so a newline the template
    writes after the turn is not trained on); a rendering with no EOS gets one, so the policy
    learns to stop. A completion is a reply string or a list of assistant messages."""
    texts = []
    for position, (prompt, completion) in enumerate(zip(prompts, completions)):
        index = position if rows is None else rows[position]
        reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
        head = apply_template(tokenizer, prompt, cfg, source, index, generation_prompt=True)
        whole = apply_template(tokenizer, [*prompt, *reply], cfg, source, index, generation_prompt=False)
        if not whole.startswith(head):
            raise DataError(
                f"data {source!r} row {index}: the chat template renders the prompt differently once the "
                "reply follows, so the reply's tokens cannot be told apart; give text completions instead"
            )
        texts.append(whole[len(head) :])
    out = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if eos_token_id is not None:
            row = row[: row.index(eos_token_id) + 1] if eos_token_id in row else [*row, eos_token_id]
        out.append(row[: cfg.max_completion_tokens])
    return out


def _source_column(row: dict, cfg) -> str | None:
    """The column cut when a prompt is too long: ``truncate_column``, else the longest text the
    prompt_template reads, else the prompt column (None when that holds chat messages)."""
    if cfg.truncate_column is not None:
        return cfg.truncate_column
    if cfg.prompt_template is not None:
        used = [name for _, name, _, _ in string.Formatter().parse(cfg.prompt_template) if name in row]
        texts = [name for name in used if isinstance(row[name], str)]
        return max(texts, key=lambda name: len(row[name])) if texts else None
    return cfg.prompt_column if isinstance(row.get(cfg.prompt_column), str) else None


def prompt_rows(tokenizer, columns: dict[str, list], cfg, source: str) -> tuple[list[str], list[list[int]], list]:
    """Rendered prompts, their token ids (each at most ``cfg.max_prompt_tokens`` long) and each
    row's chat messages (None for a text prompt).

    A prompt over budget is cut *inside* its source column, so the template's fixed text, the chat
    header and the special tokens stay whole. A source wrapped by a template keeps its beginning
    (a document's lede); a bare prompt, continued as it is, keeps its end. Prints once how many
    rows were cut. Chat-message prompts, which have no single source text, keep their last tokens.
    """
    import logging

    # we measure and cut long prompts ourselves: transformers' "longer than the maximum" warning is noise
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    names, budget = list(columns), cfg.max_prompt_tokens
    rows = [dict(zip(names, values)) for values in zip(*columns.values())]
    messages = [prompt_messages(row, cfg, source, index) for index, row in enumerate(rows)]
    prompts = [
        apply_template(tokenizer, m, cfg, source, index, generation_prompt=True) if isinstance(m, list) else m
        for index, m in enumerate(messages)
    ]
    messages = [m if isinstance(m, list) else None for m in messages]
    ids = encode_rendered(tokenizer, prompts)
    wrapped = cfg.prompt_template is not None or cfg.chat_template
    cut = 0
    for index, tokens in enumerate(ids):
        if len(tokens) <= budget:
            continue
        cut += 1
        column = _source_column(rows[index], cfg)
        if column is None:
            ids[index] = tokens[-budget:]
            prompts[index] = tokenizer.decode(ids[index], skip_special_tokens=False)
        else:
            prompts[index], ids[index] = _cut_source(tokenizer, rows[index], column, cfg, source, index, wrapped)
    if cut:
        print(f"data {source!r}: {cut} prompt(s) longer than data.max_prompt_tokens={budget} cut inside their source")
    return prompts, ids, messages


def _cut_source(tokenizer, row: dict, column: str, cfg, source: str, index: int, keep_start: bool):
    if column not in row or not isinstance(row[column], str):
        raise DataError(f"data {source!r}: truncate_column {column!r} is not a text column of the prompt")
    value, budget = row[column], cfg.max_prompt_tokens
    pieces = tokenizer(value, add_special_tokens=False)["input_ids"]
    keep = len(pieces)
    while keep > 0:
        kept = pieces[:keep] if keep_start else pieces[len(pieces) - keep :]
        text = _render(tokenizer, {**row, column: tokenizer.decode(kept)}, cfg, source, index)
        tokens = encode_rendered(tokenizer, [text])[0]
        if len(tokens) <= budget:
            return text, tokens
        keep -= max(1, len(tokens) - budget)  # re-tokenising at the cut can shift a token or two
    raise DataError(
        f"data {source!r} row {index}: the prompt without column {column!r} is already over "
        f"data.max_prompt_tokens={budget} tokens"
    )


def encode_rendered(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, special tokens added once: a text that already begins with the
    tokenizer's BOS (a chat template with ``{{ bos_token }}``: Llama 3, Gemma, Mistral) is taken as
    it is; any other text gets the tokenizer's own special tokens, as at inference. Batched."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = [bool(bos) and text.startswith(bos) for text in texts]
    out: list[list[int] | None] = [None] * len(texts)
    for add, group in (
        (True, [i for i, b in enumerate(has_bos) if not b]),
        (False, [i for i, b in enumerate(has_bos) if b]),
    ):
        if group:
            encoded = tokenizer([texts[i] for i in group], add_special_tokens=add)["input_ids"]
            for i, row in zip(group, encoded):
                out[i] = row
    return out  # type: ignore[return-value]


def encode_prompts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of already-rendered prompts, keeping each one's last ``max_tokens``."""
    return [row[-max_tokens:] for row in encode_rendered(tokenizer, texts)]


def completion_token_ids(
    tokenizer, messages: list, completions: list, cfg, source: str, eos_token_id: int | None
) -> list[list[int]]:
    """Token ids of offline completions: rendered by the chat template after a chat prompt
    (``messages[i]`` not None), else the text + EOS, as ``encode_completions``."""
    chat = [i for i, m in enumerate(messages) if m is not None]
    out = (
        encode_completions(tokenizer, [message_text(c) for c in completions], cfg.max_completion_tokens, eos_token_id)
        if len(chat) < len(completions)
        else [[] for _ in completions]
    )
    if chat:
        rendered = chat_completion_ids(
            tokenizer, [messages[i] for i in chat], [completions[i] for i in chat], cfg, source, eos_token_id, chat
        )
        for i, ids in zip(chat, rendered):
            out[i] = ids
    return out


def encode_completions(tokenizer, texts: list[str], max_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tail = [] if eos_token_id is None else [eos_token_id]
    return [(row + tail)[:max_tokens] for row in ids]


def pad(rows: list[list[int]], pad_id: int, side: str, device=None) -> tuple[Tensor, Tensor]:
    """(ids, mask) as [B, max_len] tensors padded on ``side`` ('left' or 'right')."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if side == "left":
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        else:
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)
