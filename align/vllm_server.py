"""The ``vllm`` rollout engine in server mode: rollouts from a vLLM server on devices the trainer
does not use (TRL's ``vllm_mode="server"``), started by ``align vllm-serve`` (align/jobs/vllm_serve.py).

The server is vLLM's own OpenAI-compatible server with its RL endpoints on (``VLLM_SERVER_DEV_MODE``,
``--enable-scale-out``); nothing here is a hand-written server. What the trainer uses of it:

- ``POST /inference/v1/generate`` (token ids in, token ids out): one request per (prompt, sample),
  seeded with align's sample key, so a completion depends on its key and the weights only, as with
  the native and colocated engines. Each sampled token's log-prob after the temperature
  (``--logprobs-mode processed_logprobs``) is kept as ``Rollout.sampler_logprobs``; the response's
  ``weight_versions`` say which weights sampled each token, and a rollout whose tokens did not all
  come from the version asked for is refused, not trained on.
- **Weights by file** (any device, this machine's path): the trainer writes the policy's weights as
  one safetensors file under ``weights_dir`` (``/dev/shm``: memory, not disk), renamed into place
  whole, and the server reloads them in place (``/collective_rpc`` → the workers' ``reload_weights``
  from that directory), then ``/update_weight_version`` and ``/reset_prefix_cache`` (cached keys and
  values were computed by the old weights). LoRA adapters are merged into the written weights,
  FSDP2 / ZeRO-3 shards are gathered one tensor at a time (align/vllm_engine.py ``policy_weights``).
- **Failure.** No server at setup: one line naming host, port and the command that starts one. A
  server that stops answering during the run raises :class:`EngineUnavailable` on every process
  together; the trainer saves a checkpoint and stops (align/trainer.py).

Beside training (``train.async``, one training process): the trainer publishes the weights of a
version between optimizer steps (a file write) and a worker thread has the server reload them and
generate while the step trains (align/async_rollouts.py ``ServerShadow``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from align.config import RecipeError
from align.native_engine import decode_completions
from align.rollout import EngineUnavailable, Rollout, SamplingSettings
from align.vllm_engine import policy_weights, sampling_params, to_rollout

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
MAX_CONCURRENT_REQUESTS = 64


def base_url(settings) -> str:
    return f"http://{settings.server_host}:{settings.server_port}"


def serve_hint(recipe) -> str:
    settings = recipe.generation.vllm
    model = recipe.model.path
    return f"align vllm-serve {model} --host {settings.server_host} --port {settings.server_port}"


def check_server(recipe, needed_len: int) -> None:
    """Before any weights load: a server answering at host:port (waiting up to ``server_timeout``),
    started with the endpoints the trainer uses, holding enough context; one line otherwise."""
    settings = recipe.generation.vllm
    url = base_url(settings)
    deadline, reason = time.monotonic() + settings.server_timeout, ""
    while True:
        try:
            _call(url, "GET", "/health", timeout=min(5.0, settings.server_timeout))
            break
        except EngineUnavailable as err:
            reason = str(err.__cause__ or err)
            if time.monotonic() >= deadline:
                raise RecipeError(
                    f"generation.vllm: no vLLM server at {url} after {settings.server_timeout:g}s ({reason}); "
                    f"start one with: {serve_hint(recipe)}"
                ) from None
            time.sleep(0.5)
    try:
        _call(url, "GET", "/is_paused", timeout=settings.server_timeout)
    except EngineUnavailable:
        raise RecipeError(
            f"generation.vllm: the server at {url} has no weight-sync endpoints (started without "
            f"VLLM_SERVER_DEV_MODE=1); start it with: {serve_hint(recipe)}"
        ) from None
    served = _call(url, "GET", "/v1/models", timeout=settings.server_timeout)["data"][0]
    if served.get("max_model_len") and served["max_model_len"] < needed_len:
        raise RecipeError(
            f"data.max_prompt_tokens + generation.max_new_tokens: {needed_len} tokens, more than the server's "
            f"max_model_len {served['max_model_len']}; restart it with --max-model-len {needed_len}"
        )
    if settings.weights_dir is None and settings.server_host not in LOCAL_HOSTS | {socket.gethostname()}:
        raise RecipeError(
            f"generation.vllm.weights_dir: the server at {settings.server_host} is not this machine; "
            f"name a directory the trainer and the server both see"
        )


class VLLMServerEngine:
    """Rollouts from a vLLM server, its weights pushed by file at each new policy version."""

    def __init__(self, recipe, models, accelerator):
        self.models, self.accelerator = models, accelerator
        self.settings = settings = recipe.generation.vllm
        self.url = base_url(settings)
        self.hint = serve_hint(recipe)
        root = Path(settings.weights_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
        run_tag = uuid.uuid4().hex[:12] if accelerator.is_main_process else ""
        run_tag = _broadcast(run_tag, accelerator)  # one directory for the run, named by the main process
        self.weights_root = root / f"align-weights-{run_tag}"
        self.published: int | None = None  # the newest version written to weights_root
        self.pushed: int | None = None  # the version the server holds (None: not yet pushed by this run)
        self.lock = threading.Lock()  # publish (trainer thread) and push (worker thread) one at a time
        if accelerator.is_main_process:
            for earlier in _WEIGHT_DIRS:  # a finished run's weights (a study's runs share one process)
                shutil.rmtree(earlier, ignore_errors=True)
            _WEIGHT_DIRS[:] = [self.weights_root]
            self.weights_root.mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------------------------- the seam

    def generate(
        self, prompts: list[list[int]], keys: Tensor, k: int, sampling: SamplingSettings, policy_version: int
    ) -> Rollout:
        """k completions per prompt, by the server holding the weights of ``policy_version`` (or a
        newer published version, when the trainer moved on while a worker generated: ``bounded``)."""
        if self.pushed != policy_version:  # the same on every process: each phase ends agreed
            self._phase(lambda: self._sync(policy_version))
        completions = self._phase(lambda: self.request_all(prompts, keys, k, sampling, self.pushed))
        tokens = [out["token_ids"] for out in completions]
        logprobs = [[c["logprob"] for c in out["logprobs"]["content"]] for out in completions]
        rollout = to_rollout(prompts, k, tokens, logprobs, sampling, self.accelerator.device)
        rollout = decode_completions(rollout, self.models.tokenizer, sampling)
        return replace(rollout, policy_version=self.pushed)

    def _phase(self, work):
        """``work`` on every process; if it failed anywhere, every process raises the same error
        together (a process left waiting in a collective would hang the run)."""
        result, error = None, None
        try:
            result = work()
        except EngineUnavailable as err:
            error = str(err)
        if self.accelerator.num_processes > 1:
            error = _agreed(error, self.accelerator)
        if error is not None:
            raise EngineUnavailable(error)
        return result

    def _sync(self, version: int) -> None:
        if self.published is None or self.published < version:
            self.publish(self.models.policy, version)  # every process: a gather under sharding
        if self.accelerator.is_main_process:
            self.push()
        else:
            self.pushed = self.published

    # --------------------------------------------------------------------------------- weights

    @torch.no_grad()
    def publish(self, policy, version: int) -> None:
        """The policy's weights of ``version`` written whole under ``weights_root`` (main process;
        every process takes part in the gather of sharded weights). Between optimizer steps only."""
        from safetensors.torch import save_file

        main = self.accelerator.is_main_process
        tensors, seen = {}, set()
        for name, tensor in policy_weights(policy):
            if not main:
                continue
            tensor = tensor.detach().to("cpu")
            if tensor.untyped_storage().data_ptr() in seen:  # a tied head: safetensors stores each storage once
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor.contiguous()
        if main:
            with self.lock:
                staged = self.weights_root / f".v{version}.partial"
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir()
                save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
                final = self.weights_root / f"v{version}"
                shutil.rmtree(final, ignore_errors=True)
                os.replace(staged, final)  # the server never sees a half-written file
                for old in self.weights_root.glob("v*"):
                    if old != final:
                        shutil.rmtree(old, ignore_errors=True)
        self.published = version

    def push(self) -> None:
        """The newest published weights into the server, in place; its version tag set to match and
        its prefix cache dropped (computed by the old weights)."""
        with self.lock:
            version = self.published
            if version == self.pushed:
                return
            path = str(self.weights_root / f"v{version}")
            timeout = self.settings.server_timeout
            self._post("/pause", None, timeout, query="mode=wait")
            try:
                self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}}, timeout)
                self._post("/update_weight_version", {"new_version": str(version)}, timeout)
                self._post("/reset_prefix_cache", None, timeout)
            finally:
                self._post("/resume", None, timeout)
            self.pushed = version

    # --------------------------------------------------------------------------------- sampling

    def request_all(self, prompts, keys: Tensor, k: int, sampling: SamplingSettings, version: int) -> list:
        params = [sampling_params(int(key), sampling) for key in keys.tolist()]
        bodies = [{"token_ids": prompts[i // k], "sampling_params": p} for i, p in enumerate(params)]
        outputs = list(_pool().map(self._generate_one, bodies))
        for out in outputs:
            versions = {span["version"] for span in out.get("weight_versions") or []}
            if versions and versions != {str(version)}:
                raise EngineUnavailable(
                    f"the vLLM server at {self.url} sampled with weight versions {sorted(versions)}, not {version}: "
                    f"another trainer is pushing weights to it"
                )
        return outputs

    def _generate_one(self, body: dict) -> dict:
        return self._post("/inference/v1/generate", body, self.settings.server_timeout)["choices"][0]

    def _post(self, path: str, body: dict | None, timeout: float, query: str = "") -> dict | None:
        try:
            return _call(self.url, "POST", path + (f"?{query}" if query else ""), body, timeout)
        except EngineUnavailable as err:
            if isinstance(err.__cause__, urllib.error.HTTPError):  # it answered, with an error
                what = f"failed {err}"
            else:
                what = f"stopped answering ({err.__cause__ or err})"
            raise EngineUnavailable(
                f"the vLLM server at {self.url} {what}; restart it ({self.hint}) and resume the run with resume=latest"
            ) from None


_WEIGHT_DIRS: list[Path] = []  # this process's weights directory (at most one: the running run's)
_POOL: list[ThreadPoolExecutor] = []


@atexit.register
def _remove_weight_dirs() -> None:
    for path in _WEIGHT_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def _pool() -> ThreadPoolExecutor:
    """The threads that hold a step's requests open together (one per sample, up to 64), shared by
    the process's runs."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=MAX_CONCURRENT_REQUESTS, thread_name_prefix="align-vllm-http"))
    return _POOL[0]


def _call(url: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise EngineUnavailable(f"{method} {path}: HTTP {err.code} {detail}") from err
    except (OSError, urllib.error.URLError) as err:  # refused, reset, timed out
        raise EngineUnavailable(f"{method} {path}: {err}") from err
    return json.loads(raw) if raw else None


def _broadcast(value: str, accelerator) -> str:
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _agreed(error: str | None, accelerator) -> str | None:
    """Every process's outcome gathered: the first error any process met, or None."""
    import torch.distributed as dist

    errors: list = [None] * accelerator.num_processes
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)
