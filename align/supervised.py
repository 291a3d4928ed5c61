"""One supervised loop for align's own small models: the reward model (``align rm``) and the NLI
classifier of ``align summarize``.

    for step:  rows = step_rows(...)                   # a pure function of (seed, step)
               totals = train_step(...)                # loss, backward, clip, optimizer and LR step
               record = step_record(...)               # metrics.jsonl; epoch means + eval at epoch ends
               maybe save(...)                         # every save_every steps, and at SIGINT/SIGTERM

A job hands in a ``SupervisedTask`` (its loss over a list of rows, its held-out evaluation) and
writes its own outputs; the run machinery is the trainer's: ``align/rundir.py`` (the directory's
lock), ``align/checkpoint.py`` (atomic checkpoints), ``align/metrics_log.py``, ``align/signals.py``
and ``align/resume_check.py``. Resume is exact: weights, optimizer and RNG states
(``accelerator.save_state``), the LR schedule, the step and the epoch's running sums come back,
and the batch order depends on nothing else.

Several processes (DDP): each step's rows are split over the processes and each process's mean
loss is weighted by its share, so DDP's gradient average is the mean over the step's rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from align.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from align.config import RecipeError
from align.distributed import configure_deepspeed, make_accelerator
from align.metrics_log import MetricsLog
from align.resume_check import recipe_changes
from align.rundir import claim_run_dir
from align.schedule import Schedule, lr_scheduler
from align.signals import StopSignal, agreed_signal


class ResumeMismatch(RecipeError):
    """The checkpoint to resume was trained with other settings (refuse_changes)."""


@dataclass
class LoopConfig:
    """How a supervised run trains. A checkpoint's meaning is the job's (``meaning`` below):
    save_every, keep_last and time_limit_s are bookkeeping."""

    epochs: int
    batch_size: int  # rows per optimizer step, over all processes
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: Schedule = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int | None = None  # a checkpoint every N steps (always one at SIGINT/SIGTERM)
    keep_last: int = 1
    time_limit_s: float | None = None  # end early, after a step, once training took longer


def loop_config(section: Any, **fields: Any) -> LoopConfig:
    """A LoopConfig from a job's train section (every LoopConfig field it has), then ``fields``."""
    known = {f.name for f in dataclasses.fields(LoopConfig)}
    return LoopConfig(**{**{n: getattr(section, n) for n in known if hasattr(section, n)}, **fields})


class SupervisedTask(Protocol):
    """What a job trains: called with the prepared model, from every process."""

    def loss(self, model: torch.nn.Module, rows: list) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss over ``rows`` and metric sums over them (``{"loss": mean·n, "accuracy": hits}``)."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics at each epoch's end; ``{}`` for none."""
        ...


@dataclass
class LoopState:
    """What a checkpoint saves besides the weights, optimizer and RNG states."""

    step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # this epoch's metric sums, "rows" included
    history: list[dict] = field(default_factory=list)  # one summary per finished epoch


@dataclass
class LoopResult:
    model: torch.nn.Module  # as prepared: call it from every process, unwrap it to save
    step: int
    history: list[dict]
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT": checkpointed, not finished
    stopped_early: bool = False  # time_limit_s ended it
    checkpoint: Path | None = None  # the last checkpoint this call wrote


# -- the run: accelerator, directory, resume ------------------------------------------------------


def loop_accelerator(device: str | None = None):
    """The launch's Accelerator (one CPU process, DDP, ...); ``device="cpu"`` keeps a run on the
    CPU of a machine with an accelerator. Another device is the launcher's to choose."""
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(cpu=True) if device == "cpu" else make_accelerator()
    except ValueError as err:  # accelerate's state is one per process: another device is in use
        raise RecipeError(f"train.device: {device!r}: {str(err).splitlines()[0]}") from None
    if device is not None and torch.device(device).type != accelerator.device.type:
        raise RecipeError(
            f"train.device: {device!r}, but this launch runs on {accelerator.device}; choose the device "
            "with the launcher (CUDA_VISIBLE_DEVICES, accelerate launch)"
        )
    return accelerator


@contextlib.contextmanager
def claimed_run(
    run_dir: Path, resume: str | None, overwrite: bool, meaning: dict, changeable: tuple[str, ...], accelerator
) -> Iterator[Path | None]:
    """Hold ``run_dir`` for one run (``align/rundir.py``) and yield the checkpoint to resume from,
    if any, checked against ``meaning``. Runs before any model loads, so bad input fails in seconds."""
    checkpoint = resolve_resume(resume, run_dir, accelerator)
    lock = claim_run_dir(run_dir, resume is not None, overwrite, accelerator)
    try:
        if checkpoint is not None:
            refuse_changes(checkpoint, meaning, changeable)
        yield checkpoint
    finally:
        lock.release()


def refuse_changes(checkpoint: Path, meaning: dict, changeable: tuple[str, ...]) -> None:
    """A resume continues the same run: a field outside ``changeable`` (dotted names; ``"x."``
    covers a section) that differs from the checkpoint's is refused, in one line."""
    # plain types only (weights_only): a forged checkpoint cannot run code here
    saved = json.loads(torch.load(checkpoint / "trainer_state.pt", weights_only=True)["recipe"])
    changed = [
        key
        for key in recipe_changes(saved, meaning)
        if not any(key == c or (c.endswith(".") and key.startswith(c)) for c in changeable)
    ]
    if changed:
        raise ResumeMismatch(
            f"resume: {checkpoint} was trained with other {', '.join(changed)}; a resume continues the same "
            "run -- start a new one for that"
        )


# -- batches ------------------------------------------------------------------------------------


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


@functools.lru_cache(maxsize=2)
def epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The rows' order in ``epoch``, a pure function of (seed, epoch): a resumed run sees the
    batches an uninterrupted one does (a string seed is hashed with SHA-512, the same every run)."""
    order = list(range(n_rows))
    random.Random(f"align.supervised:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_rows(rows: list, step: int, batch_size: int, seed: int, accelerator) -> tuple[list, float]:
    """This process's rows of ``step`` (0-based) and their share of the step's rows."""
    epoch, index = divmod(step, steps_per_epoch(len(rows), batch_size))
    batch = epoch_order(len(rows), seed, epoch)[index * batch_size : (index + 1) * batch_size]
    mine = batch[accelerator.process_index :: accelerator.num_processes]
    if not mine:  # a last batch smaller than the process count: one row at weight 0 keeps DDP in step
        return [rows[batch[0]]], 0.0
    return [rows[i] for i in mine], len(mine) / len(batch)


# -- one step -----------------------------------------------------------------------------------


def train_step(
    model, optimizer, scheduler, task: SupervisedTask, rows: list, share: float, accelerator, cfg: LoopConfig
) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step on this process's ``rows``: (metric sums of the whole step over every
    process, with "rows"; lr and gradient norm)."""
    loss, sums = task.loss(model, rows)
    local = {k: v if share > 0 else 0.0 for k, v in sums.items()}
    local.update(rows=len(rows) if share > 0 else 0, nonfinite=float(not torch.isfinite(loss)))
    totals = sum_over_processes(local, accelerator)  # before backward: every process stops together
    if totals.pop("nonfinite"):
        step = scheduler.last_epoch + 1  # the scheduler counts the steps taken
        raise RecipeError(f"train: non-finite loss at step {step}; lower train.lr")
    if accelerator.num_processes > 1:  # DDP averages gradients: weight each process's mean by its share
        loss = loss * (share * accelerator.num_processes)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    info = {"lr": scheduler.get_last_lr()[0]}  # the rate this step uses
    if cfg.max_grad_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if norm is not None:  # DeepSpeed clips inside its engine and reports nothing here
            info["grad_norm"] = float(norm)
    optimizer.step()
    scheduler.step()
    return totals, info


def sum_over_processes(values: dict[str, float], accelerator) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    summed = accelerator.reduce(torch.tensor([float(values[k]) for k in keys], device=accelerator.device), "sum")
    by_key = dict(zip(keys, summed.tolist()))
    return {k: by_key[k] for k in values}  # the task's order, as one process logs it


# -- records ------------------------------------------------------------------------------------


def step_record(step: int, per_epoch: int, totals: dict[str, float], info: dict, seconds: float) -> dict[str, Any]:
    """One metrics.jsonl line: the step's means over its rows, lr, gradient norm, time."""
    rows = max(totals["rows"], 1)
    means = {k: v / rows for k, v in totals.items() if k != "rows"}
    return {"step": step, "epoch": -(-step // per_epoch), **means, **info, "step_s": seconds}


def end_epoch(state: LoopState, per_epoch: int, task: SupervisedTask, model) -> dict[str, Any]:
    """The finished (or cut short) epoch's train means and the task's held-out metrics; kept in
    the history and merged into the step's record."""
    sums = state.epoch_sums
    rows = max(sums.get("rows", 0), 1)
    summary = {
        "epoch": -(-state.step // per_epoch),
        "step": state.step,
        **{f"train_{k}": v / rows for k, v in sums.items() if k != "rows"},
        **{f"eval_{k}": v for k, v in task.evaluate(model).items()},
    }
    state.history.append(summary)
    state.epoch_sums = {}
    return summary


# -- checkpoints --------------------------------------------------------------------------------


def save(accelerator, model, tokenizer, state: LoopState, scheduler, meaning: dict, run_dir: Path, keep_last: int):
    """``run_dir/checkpoints/step-N`` (align/checkpoint.py): model/ is a plain HF directory."""
    trainer_state = {
        "step": state.step,
        "scheduler": scheduler.state_dict(),
        "recipe": json.dumps(meaning),  # checked on resume (refuse_changes)
        "epoch_sums": dict(state.epoch_sums),
        "history": list(state.history),
    }
    return save_checkpoint(accelerator, model, tokenizer, trainer_state, run_dir, keep_last)


def restore(accelerator, checkpoint: Path, state: LoopState, scheduler) -> None:
    """Weights, optimizer and RNG states (accelerate), then the schedule, step and sums."""
    saved = load_checkpoint(accelerator, checkpoint)
    scheduler.load_state_dict(saved["scheduler"])
    state.step, state.epoch_sums, state.history = saved["step"], dict(saved["epoch_sums"]), list(saved["history"])


# -- the loop -----------------------------------------------------------------------------------


def run_supervised(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list,
    task: SupervisedTask,
    cfg: LoopConfig,
    accelerator,
    run_dir: Path,
    meaning: dict,
    resume_from: Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> LoopResult:
    """Train ``model`` on ``rows`` for ``cfg.epochs`` with AdamW and ``cfg.lr_scheduler``, from
    ``resume_from`` if given (see ``claimed_run``). ``on_step(step, record)`` runs after each
    logged step, on every process. A SIGINT/SIGTERM ends the loop after the step, checkpointed."""
    per_epoch = steps_per_epoch(len(rows), cfg.batch_size)
    total = cfg.epochs * per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, total, cfg.lr_scheduler, cfg.warmup_steps)
    micro = steps_per_epoch(cfg.batch_size, accelerator.num_processes)  # rows per process per step
    configure_deepspeed(accelerator, micro, cfg.max_grad_norm)
    # the scheduler is not prepared, as in the trainer: its state goes into trainer_state.pt
    model, optimizer = accelerator.prepare(model, optimizer)
    state = LoopState()
    if resume_from is not None:
        restore(accelerator, resume_from, state, scheduler)
    log = MetricsLog(run_dir, state.step, accelerator.is_main_process, [], meaning, "align")
    model.train()
    result = LoopResult(model, state.step, state.history)

    def checkpoint() -> Path:
        return save(accelerator, model, tokenizer, state, scheduler, meaning, run_dir, cfg.keep_last)

    started = time.perf_counter()
    try:
        with StopSignal() as stop:
            while state.step < total:
                step_started = time.perf_counter()
                mine, share = step_rows(rows, state.step, cfg.batch_size, cfg.seed, accelerator)
                totals, info = train_step(model, optimizer, scheduler, task, mine, share, accelerator, cfg)
                for key, value in totals.items():
                    state.epoch_sums[key] = state.epoch_sums.get(key, 0.0) + value
                state.step += 1
                record = step_record(state.step, per_epoch, totals, info, time.perf_counter() - step_started)
                if cfg.time_limit_s is not None and state.step < total:
                    over = time.perf_counter() - started > cfg.time_limit_s  # every process ends at one step
                    result.stopped_early = agreed_signal(int(over) or None, accelerator) is not None
                if state.step % per_epoch == 0 or result.stopped_early:
                    record.update(end_epoch(state, per_epoch, task, model))
                log.log(record)
                if on_step is not None:
                    on_step(state.step, record)
                if result.stopped_early:
                    break
                received = agreed_signal(stop.received, accelerator) if state.step < total else None
                if received is not None:  # checkpoint, then stop: resume continues from this step
                    result.stopped_by, result.checkpoint = signal.Signals(received).name, checkpoint()
                    break
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
                    result.checkpoint = checkpoint()
    finally:
        log.close()
    result.step, result.history = state.step, state.history
    return result
