"""Tokenizers and the tiny NLI model: built, trained here with an auxiliary word-overlap loss,
evaluated, saved with ``save_pretrained``."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.jobs.quickstart.corpus import save_quietly
from align.jobs.summarize.grammar import FEMALE_NAMES, LABELS, MALE_NAMES, POOLS, SURNAMES, TYPES
from align.schedule import lr_scheduler

# ---------------------------------------------------------------------------------------------
# Tokenizers and models
# ---------------------------------------------------------------------------------------------

MAX_LENGTH = 256  # NLI tokens: a document plus a statement is under 100 words and punctuation


def train_policy_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1024):
    """The quickstart's byte-level BPE (``<s>`` prepended, ``</s>`` = EOS), sized for documents."""
    from align.jobs.quickstart.corpus import train_tokenizer

    tokenizer = train_tokenizer(texts, out_dir, vocab_size)
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def vocabulary_texts() -> list[str]:
    """Every word the corpus grammar can produce (templates and slot values), for the NLI vocabulary."""
    texts = [v for pool in POOLS.values() for v in pool] + FEMALE_NAMES + MALE_NAMES + SURNAMES
    for entity in TYPES.values():
        for slot in (entity.kind, *entity.extras):
            texts += [slot.sentence, slot.statement, slot.fragment]
    return texts + ["He She It His Her Its Summary :"]


def train_nli_tokenizer(texts: list[str], out_dir: Path):
    """A word-level tokenizer (words and punctuation) with BERT's pair layout:
    ``[CLS] premise [SEP] hypothesis [SEP]``, token type ids 0 / 1; saved so
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it (fast, with character offsets, as the
    entailment reward's windowing needs).

    One token per word makes "does this hypothesis word occur in the premise" a comparison of
    token ids; every word of the grammar is in the vocabulary, so ``[UNK]`` only stands for a word
    the corpus never uses (a policy's misspelling), which no premise contains.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts) + vocabulary_texts(), trainers.WordLevelTrainer(special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_nli_model(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    match_init: float = 10.0,
    position_init_scale: float = 0.2,
):
    """A randomly initialised tiny BERT classifier with the three NLI labels named in its config.

    Initialisation helps it find the premise-hypothesis alignment fast (from a standard init a
    tiny BERT sits at chance for thousands of steps on this task): in the first layer the key
    projection starts equal to the query projection, both scaled by ``match_init``, so a token
    attends to the other occurrences of the same word from the start; position embeddings start
    ``position_init_scale`` times smaller, so the word, not the position, dominates that match.
    Training is free to undo both.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=MAX_LENGTH,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    with torch.no_grad():
        attention = model.bert.encoder.layer[0].attention.self
        attention.query.weight.mul_(match_init)
        attention.key.weight.copy_(attention.query.weight)
        model.bert.embeddings.position_embeddings.weight.mul_(position_init_scale)
    return model


@dataclass
class NLITrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    match_init: float = 10.0  # see build_nli_model
    position_init_scale: float = 0.2
    # weight of the auxiliary loss: from each hypothesis token's last hidden state, predict
    # whether the same token occurs in the premise (a per-token signal the label alone lacks)
    match_loss: float = 3.0
    time_limit_s: float | None = None  # stop early (after a batch) when training takes longer


def token_in_premise(enc, sep_token_id: int) -> tuple[Any, Any]:
    """(target, mask) [B, T]: whether each hypothesis token also occurs in the premise; the mask
    selects the hypothesis tokens (segment B, without its [SEP])."""
    ids, types, attn = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"].bool()
    premise = (types == 0) & attn
    hypothesis = (types == 1) & attn & (ids != sep_token_id)
    target = ((ids[:, :, None] == ids[:, None, :]) & premise[:, None, :]).any(-1)
    return target.float(), hypothesis


def _nli_batches(tokenizer, rows: list[dict], batch_size: int):
    import torch

    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        enc = tokenizer(
            [r["premise"] for r in batch],
            [r["hypothesis"] for r in batch],
            padding=True,
            truncation="only_first",
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        yield enc, torch.tensor([r["label"] for r in batch])


def nli_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 128) -> dict[str, Any]:
    """Held-out accuracy, overall, per gold label and per way the statement was made."""
    import torch

    model.eval()
    predictions: list[int] = []
    with torch.no_grad():
        for enc, _ in _nli_batches(tokenizer, rows, batch_size):
            predictions += model(**enc).logits.argmax(-1).tolist()
    correct = [int(p == r["label"]) for p, r in zip(predictions, rows)]
    by_label = {LABELS[label]: _mean([c for c, r in zip(correct, rows) if r["label"] == label]) for label in range(3)}
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: _mean([c for c, r in zip(correct, rows) if r["kind"] == k]) for k in kinds}
    return {"accuracy": _mean(correct), "n": len(rows), "by_label": by_label, "by_kind": by_kind}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def train_nli(
    train_rows: list[dict], eval_rows: list[dict], tokenizer, out_dir: Path, cfg: NLITrainConfig | None = None
) -> dict[str, Any]:
    """Train the tiny NLI classifier with cross-entropy, save it with its tokenizer and
    ``metrics.json`` (held-out accuracy) to ``out_dir``; returns the metrics."""
    import torch

    cfg = cfg or NLITrainConfig()
    start = time.perf_counter()
    model = build_nli_model(
        tokenizer, cfg.hidden, cfg.layers, cfg.heads, cfg.seed, cfg.match_init, cfg.position_init_scale
    )
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        match_head = torch.nn.Linear(cfg.hidden, 1)  # auxiliary, not saved
    params = [*model.parameters(), *match_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    scheduler = lr_scheduler(optimizer, total, "linear", cfg.warmup_steps)  # warm-up, then linear decay to 0
    rng = random.Random(cfg.seed)
    step, history, stopped = 0, [], False
    for epoch in range(cfg.epochs):
        rows = train_rows[:]
        rng.shuffle(rows)
        losses, hits = [], []
        for enc, labels in _nli_batches(tokenizer, rows, cfg.batch_size):
            out = model(**enc, output_hidden_states=cfg.match_loss > 0)
            logits = out.logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
            if cfg.match_loss > 0:
                target, mask = token_in_premise(enc, tokenizer.sep_token_id)
                match_logits = match_head(out.hidden_states[-1]).squeeze(-1)
                bce = torch.nn.functional.binary_cross_entropy_with_logits(match_logits, target, reduction="none")
                loss = loss + cfg.match_loss * (bce * mask).sum() / mask.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            hits.append(float((logits.argmax(-1) == labels).float().mean()))
            if cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s:
                stopped = True
                break
        history.append({"epoch": epoch + 1, "step": step, "train_loss": _mean(losses), "train_accuracy": _mean(hits)})
        if stopped:
            break
    held_out = nli_accuracy(model, tokenizer, eval_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_quietly(model, tokenizer, out_dir)
    metrics = {
        "eval_accuracy": held_out["accuracy"],
        "eval": held_out,
        "n_train": len(train_rows),
        "steps": step,
        "stopped_early": stopped,
        "history": history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
