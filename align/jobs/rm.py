"""``align rm``: train a scalar reward model on preference pairs (Bradley–Terry).

Each row of a JSONL file holds a prompt x, a preferred completion y_w and a rejected one y_l.
The model r (any ``AutoModelForSequenceClassification`` loaded with ``num_labels = 1``: a BERT
or a GPT-2 base gets a fresh one-logit head) reads ``prompt + separator + completion`` and is
trained to rank them, with the Bradley–Terry likelihood P(y_w ≻ y_l) = σ(r(x, y_w) − r(x, y_l)):

    L = −mean log σ(r(x, y_w) − r(x, y_l))

A fraction of the pairs (or a separate file) is held out; held-out accuracy is the share of pairs
with r(x, y_w) > r(x, y_l). The result is saved with ``save_pretrained`` (safetensors) and the
tokenizer, plus ``metrics.json``, the resolved ``recipe.yaml`` and ``align_rm.json`` (the text
format), so ``rewards.build("reward_model", model=DIR)`` scores exactly as it was trained.

Training runs through the shared supervised loop (``align/supervised.py``): ``output_dir`` holds
one run (a lock; a finished or interrupted run there is replaced only with ``overwrite=true``),
``metrics.jsonl`` gets a line per step, a checkpoint goes to ``output_dir/checkpoints`` every
``save_every`` steps and at SIGINT/SIGTERM (exit code 128 + the signal), and ``resume=latest``
continues a run exactly where it stopped.

    align rm recipes/rm.yaml model=path/to/base data.path=pairs.jsonl train.epochs=2
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from align.config import RecipeError, Seed, Strict, dump_recipe, load_recipe
from losses.bradley_terry import bradley_terry_loss


class RMData(Strict):
    path: str = Field(..., description="JSONL file of preference pairs")
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    eval_path: str | None = Field(None, description="held-out pairs (default: eval_fraction of path)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of pairs held out when no eval_path")
    max_pairs: int | None = Field(None, gt=0, description="use only the first N pairs of path")
    separator: str = Field("", description="text between prompt and completion")
    max_length: int | None = Field(None, gt=0, description="tokens per text (default: the model's limit)")
    truncation_side: Literal["left", "right"] = Field("left", description="left keeps the completion's end")


class RMTrain(Strict):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="pairs per optimizer step")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    lr_scheduler: Literal["constant", "linear"] = Field(
        "linear", description="after warm-up: constant, or linear decay to 0 at the last step"
    )
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: Seed = 0
    device: str | None = Field(None, description="default: cuda if available, else cpu")

    @field_validator("device")
    @classmethod
    def a_torch_device(cls, value: str | None) -> str | None:
        import torch

        if value is not None:
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError("expected a torch device such as cpu, cuda or cuda:1") from None
        return value

    eval_batch_size: int = Field(32, gt=0)


class RMRecipe(Strict):
    description: str = ""
    model: str = Field(..., description="base model: hub id or local path")
    tokenizer: str | None = Field(None, description="default: the model's")
    data: RMData
    train: RMTrain = Field(default_factory=RMTrain)
    output_dir: str = Field("runs/rm", description="where the reward model and metrics.json go")
    resume: str | None = Field(None, description="'latest' or a checkpoint directory (output_dir/checkpoints/step-N)")
    overwrite: bool = Field(False, description="replace the run output_dir already holds")
    save_every: int | None = Field(None, gt=0, description="a checkpoint every N steps (always one at SIGINT/SIGTERM)")
    keep_last: int = Field(1, gt=0, description="checkpoints kept in output_dir/checkpoints")


# what a resume may change; the rest (model, data, train.*) is what the checkpoint's steps meant
CHANGEABLE = ("description", "output_dir", "resume", "overwrite", "save_every", "keep_last", "train.device")


# -- data ---------------------------------------------------------------------------------------


def read_pairs(path: str, data: RMData) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from a JSONL file; RecipeError for a bad file."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"data: {path!r}: no such file")
    columns = (data.prompt_column, data.chosen_column, data.rejected_column)
    rows = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RecipeError(f"data: {path!r} line {lineno}: not valid JSON") from None
            missing = [c for c in columns if c not in row]
            if missing:
                raise RecipeError(f"data: {path!r} line {lineno}: no column(s) {missing}; has {sorted(row)}")
            not_text = [c for c in columns if not isinstance(row[c], str)]
            if not_text:  # str(None) or str(1) would be trained on as text
                raise RecipeError(
                    f"data: {path!r} line {lineno}: column {not_text[0]!r} is {type(row[not_text[0]]).__name__}, "
                    "expected text"
                )
            rows.append(tuple(row[c] for c in columns))
    if not rows:
        raise RecipeError(f"data: {path!r}: no pairs")
    return rows


def split_pairs(recipe: RMRecipe) -> tuple[list, list]:
    pairs = read_pairs(recipe.data.path, recipe.data)
    if recipe.data.max_pairs:
        pairs = pairs[: recipe.data.max_pairs]
    if recipe.data.eval_path:
        return pairs, read_pairs(recipe.data.eval_path, recipe.data)
    order = list(range(len(pairs)))
    random.Random(recipe.train.seed).shuffle(order)
    n_eval = math.ceil(recipe.data.eval_fraction * len(pairs)) if recipe.data.eval_fraction > 0 else 0
    if n_eval >= len(pairs):
        raise RecipeError(f"data.eval_fraction: holds out all {len(pairs)} pairs")
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


# -- model --------------------------------------------------------------------------------------


def pair_scores(model: Any, tokenizer: Any, batch: list[tuple[str, str, str]], recipe: RMRecipe, device: str):
    """r(x, y_w) and r(x, y_l) for a batch of pairs, in one forward pass of 2P texts."""
    from rewards.reward_model import join_texts

    prompts = [p for p, _, _ in batch]
    texts = join_texts(prompts, [c for _, c, _ in batch], recipe.data.separator)
    texts += join_texts(prompts, [r for _, _, r in batch], recipe.data.separator)
    max_length = recipe.data.max_length
    enc = tokenizer(
        texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
    ).to(device)
    scores = model(**enc).logits[:, 0].float()
    return scores[: len(batch)], scores[len(batch) :]


def evaluate(model: Any, tokenizer: Any, pairs: list, recipe: RMRecipe, device: str) -> dict[str, float]:
    """Held-out accuracy (share of pairs with r_w > r_l), Bradley–Terry loss and mean margin."""
    import torch

    if not pairs:
        return {}
    model.eval()
    correct, loss, margin = 0, 0.0, 0.0
    size = recipe.train.eval_batch_size
    with torch.no_grad():
        for lo in range(0, len(pairs), size):
            batch = pairs[lo : lo + size]
            rw, rl = pair_scores(model, tokenizer, batch, recipe, device)
            correct += int((rw > rl).sum())
            loss += float(bradley_terry_loss(rw, rl)) * len(batch)
            margin += float((rw - rl).sum())
    model.train()
    n = len(pairs)
    return {"accuracy": correct / n, "loss": loss / n, "margin": margin / n}


def load_scalar_model(recipe: RMRecipe, device: str) -> tuple[Any, Any, RMRecipe]:
    """(tokenizer, model, recipe): a scalar head on any backbone (a causal LM's head is replaced
    by one fresh output), and the recipe with ``data.max_length`` filled in from the model."""
    import torch

    from rewards.base import load_pretrained
    from rewards.entailment import model_max_length
    from rewards.reward_model import ensure_padding

    random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)  # the fresh head: the same on a resume, before its weights load
    tokenizer, model = load_pretrained(
        recipe.model,
        recipe.tokenizer,
        "AutoModelForSequenceClassification",
        device,
        num_labels=1,
        ignore_mismatched_sizes=True,
    )
    tokenizer.truncation_side = recipe.data.truncation_side
    ensure_padding(tokenizer, model)
    if recipe.data.max_length is None:
        limit = model_max_length(tokenizer, model.config)
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": limit})})
    return tokenizer, model, recipe


class PairTask:
    """Bradley–Terry over pairs for the supervised loop (align/supervised.py)."""

    def __init__(self, tokenizer: Any, eval_pairs: list, recipe: RMRecipe, device: str):
        self.tokenizer, self.eval_pairs, self.recipe, self.device = tokenizer, eval_pairs, recipe, device

    def loss(self, model: Any, rows: list) -> tuple[Any, dict[str, float]]:
        rw, rl = pair_scores(model, self.tokenizer, rows, self.recipe, self.device)
        loss = bradley_terry_loss(rw, rl)
        return loss, {"loss": loss.item() * len(rows), "accuracy": float((rw > rl).sum())}

    def evaluate(self, model: Any) -> dict[str, float]:
        return evaluate(model, self.tokenizer, self.eval_pairs, self.recipe, self.device)


def train_reward_model(
    recipe: RMRecipe, log: Any = print, on_step: Callable[[int, dict], None] | None = None
) -> dict[str, Any]:
    """Train, evaluate and save; returns the metrics written to ``output_dir/metrics.json``, or,
    for a run stopped by SIGINT/SIGTERM, ``stopped_by``, ``steps`` and ``checkpoint`` (nothing
    else is written: ``resume=latest`` continues it)."""
    from align.distributed import full_state_dict
    from align.supervised import claimed_run, loop_accelerator, loop_config, run_supervised
    from rewards.reward_model import FORMAT_FILE

    start = time.perf_counter()
    train_pairs, eval_pairs = split_pairs(recipe)
    accelerator = loop_accelerator(recipe.train.device)
    out = Path(recipe.output_dir)
    meaning = recipe.model_dump(mode="json")
    with _field_names(), claimed_run(out, recipe.resume, recipe.overwrite, meaning, CHANGEABLE, accelerator) as ckpt:
        device = str(accelerator.device)
        tokenizer, model, recipe = load_scalar_model(recipe, device)
        task = PairTask(tokenizer, eval_pairs, recipe, device)
        before = task.evaluate(model)
        loop = loop_config(recipe.train, save_every=recipe.save_every, keep_last=recipe.keep_last)

        def each_step(step: int, record: dict) -> None:
            if "train_loss" in record and accelerator.is_main_process:  # an epoch's end
                shown = {k: v for k, v in record.items() if k == "epoch" or k.startswith(("train_", "eval_"))}
                log(f"align rm: step {step}  " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
            if on_step is not None:
                on_step(step, record)

        result = run_supervised(model, tokenizer, train_pairs, task, loop, accelerator, out, meaning, ckpt, each_step)
        if result.stopped_by is not None:
            return {"stopped_by": result.stopped_by, "steps": result.step, "checkpoint": str(result.checkpoint)}
        state_dict = full_state_dict(accelerator, result.model)  # collective: every process takes part
        if not accelerator.is_main_process:
            return {}
        accelerator.unwrap_model(result.model).save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        text_format = {k: getattr(recipe.data, k) for k in ("separator", "max_length", "truncation_side")}
        (out / FORMAT_FILE).write_text(json.dumps(text_format, indent=2))
        dump_recipe(recipe, out / "recipe.yaml")
        metrics = {
            "n_train": len(train_pairs),
            "n_eval": len(eval_pairs),
            "steps": result.step,
            **{f"eval_{k}_before": v for k, v in before.items()},
            **result.history[-1],
            "history": result.history,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@contextlib.contextmanager
def _field_names() -> Iterator[None]:
    """The run-directory messages name the trainer's fields; say this recipe's instead."""
    try:
        yield
    except RecipeError as err:
        message = str(err).replace("output.overwrite", "overwrite").replace("output.dir", "output_dir")
        raise RecipeError(message) from None


def main(args: Any) -> int:
    from align.models import check_model_source

    recipe = load_recipe(RMRecipe, args.recipe, list(args.overrides))
    split_pairs(recipe)  # the data files, read before any model loads
    check_model_source("model", recipe.model)
    if recipe.tokenizer is not None:
        check_model_source("tokenizer", recipe.tokenizer)
    metrics = train_reward_model(recipe)
    if metrics.get("stopped_by"):
        print(
            f"align rm: stopped by {metrics['stopped_by']} at step {metrics['steps']}; checkpoint "
            f"{metrics['checkpoint']}; continue with resume=latest",
            file=sys.stdout,
        )
        return 128 + signal.Signals[metrics["stopped_by"]].value
    if not metrics:  # not the main process of a launch
        return 0
    acc = metrics.get("eval_accuracy")
    shown = f"held-out accuracy {acc:.3f} on {metrics['n_eval']} pairs" if acc is not None else "no held-out pairs"
    print(f"align rm: {shown}; saved to {recipe.output_dir}", file=sys.stdout)
    return 0
