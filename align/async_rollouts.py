"""Rollouts generated ahead of training (``train.async: {max_staleness: N, mode}``).

The policy version of a rollout is the number of optimizer steps applied to the weights that
sampled it; the synchronous loop trains step s (0-based, ``Run.step``) on samples of version s.

    fixed   step s trains on samples of version max(0, s − N) -- always. Deterministic: N = 0 is the
            synchronous loop itself; the rollouts in flight are saved in every checkpoint, so a
            resumed run trains on exactly what the uninterrupted one would.
    bounded step s trains on whatever rollout of its prompts is ready, sampled by the freshest
            weights the generator had, never older than version s − N (the generator may not start
            step u's rollout before the trainer reaches version u − N). For speed: not deterministic.

Where the generation overlaps the training: with the native engine on whole (unsharded) weights a
*shadow* copy of the policy generates in a worker thread, loaded with the trainer's weights of the
version it samples (the trainer hands them over between optimizer steps, never during one); with a
vLLM server and one training process the worker has the server generate, the trainer publishing
each version's weights as a file between optimizer steps (``ServerShadow``). Anything else (the
colocated vLLM engine, FSDP2 / ZeRO-3 shards, a server with several training processes) generates
in line: ``fixed`` keeps its exact schedule without the overlap; ``bounded`` needs the worker and is
refused without it.

What the trainer scores and trains is unchanged: the rollout carries its sampler's log-probs
(``Rollout.sampler_logprobs``) and its version; the step recomputes π_old with the current weights
and, for the objectives that take it, applies the run's importance correction π_old/π_sampler
(losses/correction.py) -- the same path as a vLLM engine's mismatch. Logged per step: ``staleness``
(the version gap of the step's samples), ``async_wait_s`` (time the trainer waited for them),
``generation_s`` (the time their generation took, wherever it ran) and ``generator_wait_s`` (the time
the generator sat idle, waiting for the trainer's weights, before starting them).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields
from typing import Literal

import torch
from pydantic import Field

from align.config import Strict
from align.rollout import Rollout, RolloutEngine


class AsyncConfig(Strict):
    max_staleness: int = Field(
        ..., ge=0, description="N: a step never trains on samples of weights more than N optimizer steps old"
    )
    mode: Literal["fixed", "bounded"] = Field(
        "fixed",
        description="fixed: step t always trains on samples of the weights of step t − N (deterministic, exact "
        "resume; N = 0 is the synchronous loop); bounded: the freshest ready, never older than N (speed)",
    )


# what one step's generation is: (step, engine, version) -> the rollout of that step's prompts
Produce = Callable[[int, RolloutEngine, int], Rollout]


class ShadowPolicy:
    """A copy of the policy that generates in a worker thread, with its own native engine; loaded
    with the trainer's weights only between optimizer steps."""

    def __init__(self, policy: torch.nn.Module, make_engine: Callable[[torch.nn.Module], RolloutEngine]):
        self.model = copy.deepcopy(policy).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.engine = make_engine(self.model)
        self.handed: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def load(self, policy: torch.nn.Module, version: int) -> None:
        """The trainer's weights into the copy now (the worker is idle)."""
        self.model.load_state_dict(policy.state_dict())

    def hand_over(self, policy: torch.nn.Module, version: int) -> None:
        """A snapshot of the trainer's weights, for the worker to take when it next starts a rollout."""
        self.handed = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    @torch.no_grad()
    def take_over(self) -> None:
        self.model.load_state_dict(self.handed)


class ServerShadow:
    """A vLLM server as the generator beside training: the trainer publishes each version's weights
    (a file write, between optimizer steps); the server reloads them when a rollout asks for that
    version (align/vllm_server.py)."""

    def __init__(self, engine):
        self.engine = engine

    def load(self, policy: torch.nn.Module, version: int) -> None:
        self.engine.publish(policy, version)

    hand_over = load

    def take_over(self) -> None:  # the engine pushes the published version with the rollout
        pass


class AheadRollouts:
    """The rollouts of the coming steps, generated ahead by version as ``train.async`` says."""

    def __init__(
        self,
        produce: Produce,
        config: AsyncConfig,
        engine: RolloutEngine,
        total_steps: int,
        shadow: ShadowPolicy | ServerShadow | None = None,
        policy: torch.nn.Module | None = None,
    ):
        if config.mode == "bounded" and shadow is None:
            raise ValueError("train.async.mode: bounded needs a generator beside training (a shadow)")
        self.produce, self.engine, self.total_steps = produce, engine, total_steps
        self.n, self.mode, self.shadow, self.policy = config.max_staleness, config.mode, shadow, policy
        self.pending: dict[int, Rollout] = {}
        self.seconds: dict[int, float] = {}  # each pending rollout's generation time
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="align-rollout") if shadow else None
        self.future: Future | None = None
        # bounded: the weights the trainer last handed over, and the generator's progress
        self.ready = threading.Condition()
        self.published_version = -1
        self.trainer_version = -1
        self.next_step = 0
        self.stopped = False
        self.generator_waits: dict[int, float] = {}  # the time the generator sat idle before each rollout
        self.idle_since: float | None = None

    # ----------------------------------------------------------------------------- the trainer's side

    def take(self, step: int) -> tuple[Rollout, dict[str, float]]:
        """Step ``step``'s rollout (the trainer's weights are version ``step``), and its metrics."""
        started = time.perf_counter()
        rollout = self._take_bounded(step) if self.mode == "bounded" else self._take_fixed(step)
        waited = time.perf_counter() - started
        staleness = step - rollout.policy_version
        if staleness > self.n or staleness < 0:  # the schedule's invariant: never silently broken
            raise RuntimeError(f"async: step {step} got samples of version {rollout.policy_version} (N = {self.n})")
        metrics = {
            "staleness": float(staleness),
            "async_wait_s": waited,
            "generation_s": self.seconds.pop(step),
            "generator_wait_s": self.generator_waits.pop(step, 0.0),
        }
        return rollout, metrics

    def _take_fixed(self, step: int) -> Rollout:
        self._join()
        for u in range(step, min(step + self.n, self.total_steps)):  # the run's first steps (or a fresh resume)
            if u not in self.pending:
                self._generate(u, self.engine, step)
        ahead = step + self.n
        if ahead < self.total_steps and ahead not in self.pending:
            if self.shadow is not None and self.n > 0:  # sampled by this version while this step trains
                self.shadow.load(self.policy, step)
                if self.idle_since is not None:  # the worker waited for this step's weights since then
                    self.generator_waits[ahead] = time.perf_counter() - self.idle_since
                self.future = self.worker.submit(self._generate, ahead, self.shadow.engine, step)
            else:
                self._generate(ahead, self.engine, step)
        return self.pending.pop(step)

    def _take_bounded(self, step: int) -> Rollout:
        with self.ready:
            # the weights of version ``step``, handed over now: between optimizer steps
            self.shadow.hand_over(self.policy, step)
            self.published_version = self.trainer_version = step
            if self.future is None:
                self.next_step = step
                self.future = self.worker.submit(self._generator)
            self.ready.notify_all()
            while step not in self.pending:
                if self.future.done():  # the generator died: its error, not a hang
                    self.future.result()
                    raise RuntimeError("async: the rollout generator stopped")
                self.ready.wait(timeout=1.0)
            return self.pending.pop(step)

    # ----------------------------------------------------------------------------- generation

    def _generate(self, step: int, engine: RolloutEngine, version: int) -> None:
        started = time.perf_counter()
        rollout = self.produce(step, engine, version)
        with self.ready:
            self.pending[step] = rollout
            self.idle_since = time.perf_counter()
            self.seconds[step] = self.idle_since - started
            self.ready.notify_all()

    def _generator(self) -> None:
        """bounded: each step's rollout in order, from the freshest weights handed over, starting
        step u only once the trainer has reached version u − N."""
        loaded = -1
        while True:
            with self.ready:
                u = self.next_step
                waiting = time.perf_counter()
                while not self.stopped and self.trainer_version < u - self.n:  # N versions ahead: wait
                    self.ready.wait()
                self.generator_waits[u] = time.perf_counter() - waiting
                if self.stopped or u >= self.total_steps:
                    return
                if self.published_version != loaded:
                    self.shadow.take_over()
                    loaded = self.published_version
                self.next_step = u + 1
            self._generate(u, self.shadow.engine, loaded)

    def _join(self) -> None:
        if self.future is not None:
            future, self.future = self.future, None
            future.result()  # re-raises the worker's error here

    def close(self) -> None:
        with self.ready:
            self.stopped = True
            self.ready.notify_all()
        if self.future is not None:
            try:
                self.future.result()
            except Exception:  # the run is ending anyway; its own error is the one to report
                pass
            self.future = None
        if self.worker is not None:
            self.worker.shutdown(wait=True)

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """fixed: the rollouts in flight (after the one being generated has landed), so a resumed
        run trains on exactly these; bounded: nothing (it resumes from fresh samples)."""
        if self.mode != "fixed":
            return {}
        self._join()
        return {
            "pending": {
                step: {f.name: _cpu(getattr(r, f.name)) for f in fields(r) if f.name != "probs"}
                for step, r in self.pending.items()
            },
            "seconds": dict(self.seconds),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.mode != "fixed":
            return
        self.pending = {int(step): Rollout(**values) for step, values in state.get("pending", {}).items()}
        self.seconds = {int(step): s for step, s in state.get("seconds", {}).items()}


def _cpu(value):
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
