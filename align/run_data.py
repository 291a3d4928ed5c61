"""The data sets a run trains on, read and tokenised once before any model loads: prompts (plus
the columns rewards read) for online objectives, pairs or (prompt, completion) rows for offline
ones, in any of TRL's formats (``align.formats``), with the held-out pair split of
``data.eval_fraction`` / ``data.eval_pairs``."""

from __future__ import annotations

import torch
from torch import Tensor

import losses
from align import data as data_lib
from align import formats
from align.recipe import Recipe


class OnlineData:
    """Prompts (plus the columns rewards read) for objectives trained on fresh samples."""

    def __init__(self, recipe: Recipe, tokenizer):
        cfg = recipe.data
        table = formats.normalise(data_lib.load_table(cfg.train, cfg.split, cfg.subset), cfg, "online", cfg.train)
        first = [] if cfg.prompt_template else [cfg.prompt_column]
        wanted = first + [c for c in table.column_names if c not in first]
        self.columns = data_lib.read_columns(cfg.train, table, wanted, non_empty=first)
        self.prompts, self.prompt_ids, self.messages = data_lib.prompt_rows(tokenizer, self.columns, cfg, cfg.train)
        self.conversational = data_lib.is_conversational(self.columns, cfg)  # TRL rewards get message lists
        self.columns.pop(cfg.prompt_column, None)
        if "demo_rewards" in recipe.objective.needs and cfg.demonstration_column not in self.columns:
            raise data_lib.DataError(
                f"data {cfg.train!r}: missing column {cfg.demonstration_column!r} (rcfd demonstrations)"
            )

    def __len__(self) -> int:
        return len(self.prompts)


class OfflineData:
    """Pairs (prompt, chosen, rejected) for dpo/ipo/copg, or (prompt, completion) rows for sft, and
    (prompt, completion, label) rows with their ``labels`` for an unpaired objective that reads them (kto)."""

    def __init__(self, recipe: Recipe, tokenizer, eos_token_id: int | None, source: str | None = None):
        cfg = recipe.data
        declared = losses.REGISTRY[recipe.objective.name]
        self.paired = declared.paired
        train_file = source is None
        source = source or cfg.train
        table = data_lib.load_table(source, cfg.split if train_file else "train", cfg.subset if train_file else None)
        if not self.paired:
            table = formats.language_modeling(table, cfg, tokenizer, source)
        table = formats.normalise(table, cfg, "pairs" if self.paired else "rows", source)
        # unpaired rows an objective reads the label of (KTO): 1.0 desirable, 0.0 not, per row
        self.labels = None
        if not self.paired and "rewards" in declared.needs:
            self.labels = formats.unpaired_labels(table, cfg, source, recipe.objective.name)
        texts = [cfg.chosen_column, cfg.rejected_column] if self.paired else [cfg.completion_column]
        if self.paired and not {*texts, cfg.reward_column, cfg.label_column} & set(table.column_names):
            raise data_lib.DataError(
                f"data {source!r}: missing columns {texts}: {recipe.objective.name!r} trains on preference pairs "
                f"({cfg.prompt_column}, {', '.join(texts)}) or scored rows ({cfg.prompt_column}, "
                f"{cfg.completion_column}, {cfg.reward_column} or {cfg.label_column}); columns: {table.column_names}"
            )
        if self.paired and cfg.chosen_column not in table.column_names and cfg.reward_column in table.column_names:
            # (prompt, completion, reward) rows: every two completions of a prompt form a pair; a
            # preference objective (DPO, IPO) learns only from each pair's order
            ordered = declared.preference
            table, ties = data_lib.rows_to_pairs(
                table, cfg.prompt_column, cfg.completion_column, cfg.reward_column, ordered=ordered
            )
            if ties:
                print(f"data {source!r}: {ties} pair(s) with equal rewards dropped (no preference to learn)")
            texts = ["chosen", "rejected"]
        reward_cols = [c for c in ("chosen_reward", "rejected_reward") if c in table.column_names]
        prompt_cols = (
            [cfg.prompt_column]
            if not cfg.prompt_template
            else [c for c in table.column_names if c not in texts + reward_cols]
        )
        columns = data_lib.read_columns(
            source,
            table,
            [*prompt_cols, *texts, *reward_cols],
            non_empty=[*prompt_cols[:1], *texts] if not cfg.prompt_template else texts,
        )
        self.prompts, self.prompt_ids, self.messages = data_lib.prompt_rows(
            tokenizer, {c: columns[c] for c in prompt_cols}, cfg, source
        )
        self.conversational = data_lib.is_conversational(columns, cfg)
        self.completion_texts = [[data_lib.message_text(v) for v in columns[c]] for c in texts]
        # a chat prompt's completion is the template's rendering of the assistant turn
        self.completion_ids = [
            data_lib.completion_token_ids(tokenizer, self.messages, columns[c], cfg, source, eos_token_id)
            for c in texts
        ]
        self.pair_rewards = [columns[c] for c in reward_cols] if len(reward_cols) == 2 else None
        self.ref_cache: list[Tensor] | None = None  # per dataset row: [n_texts, T] reference log-probs
        self.held_out: OfflineData | None = None  # pairs the report measures margin and accuracy on
        if train_file and cfg.eval_pairs:
            self.held_out = OfflineData(recipe, tokenizer, eos_token_id, source=cfg.eval_pairs)
        elif train_file and cfg.eval_fraction:
            held = held_out_rows(self.prompts, cfg.eval_fraction, recipe.train.seed)
            if not held or len(held) == len(self):
                raise data_lib.DataError(
                    f"data {source!r}: data.eval_fraction={cfg.eval_fraction} of {len(set(self.prompts))} "
                    "prompts leaves no training or no held-out rows"
                )
            held_set = set(held)
            kept = [i for i in range(len(self)) if i not in held_set]
            self.held_out = self.subset(held)
            self._keep(kept)

    def subset(self, rows: list[int]) -> OfflineData:
        out = object.__new__(OfflineData)
        out.__dict__.update(self.__dict__)
        out._keep(rows)
        out.held_out = None
        return out

    def _keep(self, rows: list[int]) -> None:
        def pick(values):
            return [values[i] for i in rows]

        self.prompts, self.prompt_ids, self.messages = pick(self.prompts), pick(self.prompt_ids), pick(self.messages)
        self.completion_texts = [pick(c) for c in self.completion_texts]
        self.completion_ids = [pick(c) for c in self.completion_ids]
        if self.pair_rewards is not None:
            self.pair_rewards = [pick(c) for c in self.pair_rewards]
        if self.labels is not None:
            self.labels = pick(self.labels)

    def __len__(self) -> int:
        return len(self.prompts)


def held_out_rows(prompts: list[str], fraction: float, seed: int) -> list[int]:
    """Rows of a ``fraction`` of the distinct prompts (drawn with ``seed``): every pair of a
    held-out prompt is held out, so no prompt is both trained on and measured."""
    distinct = sorted(set(prompts))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed * 104_729 + 1)).tolist()
    chosen = {distinct[i] for i in order[: round(fraction * len(distinct))]}
    return [i for i, p in enumerate(prompts) if p in chosen]
