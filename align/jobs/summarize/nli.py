"""Tokenizers and the tiny NLI model: built, trained with an auxiliary word-overlap loss through
the supervised loop (``align/supervised.py``: metrics.jsonl, checkpoints, exact resume),
evaluated, saved with ``save_pretrained``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from align.jobs.quickstart.corpus import save_quietly
from align.jobs.summarize.grammar import FEMALE_NAMES, LABELS, MALE_NAMES, POOLS, SURNAMES, TYPES

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
    save_every: int | None = None  # a checkpoint every N steps (always one at SIGINT/SIGTERM)


# what a resume may change; every other field is part of what the checkpoint's steps meant
CHANGEABLE = ("time_limit_s", "save_every")


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
            predictions += model(**enc.to(model.device)).logits.argmax(-1).tolist()
    correct = [int(p == r["label"]) for p, r in zip(predictions, rows)]
    by_label = {LABELS[label]: mean_of([c for c, r in zip(correct, rows) if r["label"] == label]) for label in range(3)}
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: mean_of([c for c, r in zip(correct, rows) if r["kind"] == k]) for k in kinds}
    return {"accuracy": mean_of(correct), "n": len(rows), "by_label": by_label, "by_kind": by_kind}


def mean_of(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


class WithMatchHead(torch.nn.Module):
    """The classifier and the auxiliary match head, trained as one module (one forward, so DDP
    sees every parameter used). ``save_pretrained`` writes the classifier alone: checkpoints'
    ``model/`` is the NLI model as ``from_pretrained`` loads it; the head is training scaffolding."""

    def __init__(self, model: Any, match_head: torch.nn.Module | None):
        super().__init__()
        self.model, self.match_head = model, match_head

    def forward(self, **enc: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(**enc, output_hidden_states=self.match_head is not None)
        if self.match_head is None:
            return out.logits, None
        return out.logits, self.match_head(out.hidden_states[-1]).squeeze(-1)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, **kwargs: Any) -> None:
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        self.model.save_pretrained(path, state_dict=state_dict, **kwargs)


@dataclass
class NLITask:
    """Cross-entropy on the label plus ``match_loss`` × the per-token match loss, for the
    supervised loop (align/supervised.py); held-out accuracy is measured once, after training."""

    tokenizer: Any
    match_loss: float
    device: Any

    def loss(self, model: WithMatchHead, rows: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        enc, labels = next(_nli_batches(self.tokenizer, rows, len(rows)))
        enc, labels = enc.to(self.device), labels.to(self.device)
        logits, match_logits = model(**enc)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if match_logits is not None:
            target, mask = token_in_premise(enc, self.tokenizer.sep_token_id)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(match_logits, target, reduction="none")
            loss = loss + self.match_loss * (bce * mask).sum() / mask.sum().clamp(min=1)
        hits = float((logits.argmax(-1) == labels).sum())
        return loss, {"loss": loss.item() * len(rows), "accuracy": hits}

    def evaluate(self, model: WithMatchHead) -> dict[str, float]:
        return {}


def train_nli(
    train_rows: list[dict],
    eval_rows: list[dict],
    tokenizer,
    out_dir: Path,
    cfg: NLITrainConfig | None = None,
    run_dir: Path | None = None,
    resume: str | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train the tiny NLI classifier through the supervised loop, save it with its tokenizer and
    ``metrics.json`` (held-out accuracy) to ``out_dir``; returns the metrics.

    ``run_dir`` (default ``out_dir``) holds the run: ``metrics.jsonl`` and ``checkpoints/``;
    ``resume`` ("latest" or a checkpoint directory) continues it exactly. A run stopped by
    SIGINT/SIGTERM saves a checkpoint, nothing else, and returns ``stopped_by``, ``steps`` and
    ``checkpoint``."""
    from align.supervised import claimed_run, loop_accelerator, loop_config, run_supervised

    cfg = cfg or NLITrainConfig()
    start = time.perf_counter()
    run_dir = Path(run_dir or out_dir)
    meaning = {**asdict(cfg), "rows": len(train_rows)}
    accelerator = loop_accelerator()
    with claimed_run(run_dir, resume, False, meaning, CHANGEABLE, accelerator) as checkpoint:
        model = build_nli_model(
            tokenizer, cfg.hidden, cfg.layers, cfg.heads, cfg.seed, cfg.match_init, cfg.position_init_scale
        )
        match_head = None
        if cfg.match_loss > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                match_head = torch.nn.Linear(cfg.hidden, 1)
        trainee = WithMatchHead(model, match_head).to(accelerator.device)
        # warm-up, then linear decay to 0; the gradient norm clipped at 1
        loop = loop_config(cfg, lr_scheduler="linear", max_grad_norm=1.0)
        task = NLITask(tokenizer, cfg.match_loss, accelerator.device)
        result = run_supervised(
            trainee, tokenizer, train_rows, task, loop, accelerator, run_dir, meaning, checkpoint, on_step
        )
    if result.stopped_by is not None:
        return {"stopped_by": result.stopped_by, "steps": result.step, "checkpoint": str(result.checkpoint)}
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(result.model).model
    held_out = nli_accuracy(model, tokenizer, eval_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_quietly(model, tokenizer, out_dir)
    metrics = {
        "eval_accuracy": held_out["accuracy"],
        "eval": held_out,
        "n_train": len(train_rows),
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "history": result.history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
