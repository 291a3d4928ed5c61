"""Models: the tokenizer, the policy and its frozen reference (or LoRA adapters off), and the
checks that need only the model's config -- loaded from a hub id or a local directory alike."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from align import data as data_lib
from align.recipe import Recipe


@dataclass
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None with LoRA: the policy with adapters disabled
    tokenizer: object
    eos_token_id: int | None
    pad_token_id: int
    adapters: bool = False  # LoRA: the reference is the policy with its adapters off
    critic: torch.nn.Module | None = None  # objectives that read values (align/critic.py)

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.adapters


HUB_PROBE_TIMEOUT_S = 3.0


def go_offline_if_hub_unreachable(source: str) -> bool:
    """Before the first hub id loads: when the hub cannot be reached (no route, no DNS), switch
    this process to offline mode, so cached files load at once and a missing one fails in one line
    -- instead of ~50 s of retries per file. True when it switched. Local paths probe nothing."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or Path(source).expanduser().exists():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub.HF_HUB_OFFLINE = True
        print(f"align: {endpoint.hostname} cannot be reached; loading from the local Hugging Face cache only")
        return True


def unresolvable(field_name: str, source: str, what: str, err: BaseException) -> str:
    """One line for a model id or path that cannot be loaded: the field, the id, and the fix."""
    import os

    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    line = f"{field_name}: cannot load {what} from {source!r} ({reason})"
    if not Path(source).expanduser().exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
        where = "the local Hugging Face cache (offline: HF_HUB_OFFLINE)" if offline else "the hub or the local cache"
        line += (
            f"; it is not a local directory and not in {where}: download it once with network "
            f"(`hf download {source}`) or set {field_name} to a local directory"
        )
    return line


def check_loadable(recipe: Recipe) -> None:
    """Every model id the run will load resolves (config only), before any weights load."""

    cfg = recipe.model
    critic = recipe.critic.path if recipe.critic is not None else None
    for field_name, source in (("model.path", cfg.path), ("reference", recipe.reference), ("critic.path", critic)):
        if source is not None:
            check_model_source(field_name, source, cfg.revision, cfg.trust_remote_code)


def check_model_source(field_name: str, source: str, revision: str | None = None, trust_remote_code: bool = False):
    """A model id or directory resolves to a config (nothing else loads); one line naming
    ``field_name`` otherwise. Every command that loads a model asks here first."""
    from transformers import AutoConfig

    from align.config import RecipeError

    go_offline_if_hub_unreachable(source)
    try:
        AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise RecipeError(unresolvable(field_name, source, "a model config", err)) from None


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, left-padded, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    from align.config import RecipeError

    cfg = recipe.model
    source, field_name = (cfg.tokenizer, "model.tokenizer") if cfg.tokenizer else (cfg.path, "model.path")
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().is_dir():
        raise RecipeError(f"{field_name}: no such directory {source!r} (expected a local model directory or a hub id)")
    go_offline_if_hub_unreachable(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise RecipeError(unresolvable(field_name, source, "a tokenizer", err)) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(recipe: Recipe):
    """The policy's config (nothing else loads)."""
    from transformers import AutoConfig

    cfg = recipe.model
    return AutoConfig.from_pretrained(cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def position_limit(recipe: Recipe) -> int | None:
    """The policy's positions (max_position_embeddings), read from its config."""
    config = model_config(recipe)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_positions(recipe: Recipe, dataset) -> None:
    """The longest prompt plus what follows it must fit the model's positions (read from its config)."""
    limit = position_limit(recipe)
    if not limit or not dataset.prompt_ids:
        return
    row = max(range(len(dataset.prompt_ids)), key=lambda i: len(dataset.prompt_ids[i]))
    prompt = len(dataset.prompt_ids[row])
    if recipe.objective.online:
        after = recipe.generation.max_new_tokens
        what = f"generation.max_new_tokens ({after})"
    else:
        after = max(len(ids) for texts in dataset.completion_ids for ids in texts)
        what = f"the longest completion ({after} tokens)"
    if prompt + after > limit:
        raise data_lib.DataError(
            f"data.max_prompt_tokens: the longest prompt (row {row}, {prompt} tokens) plus {what} exceeds "
            f"the model's {limit} positions (max_position_embeddings); lower data.max_prompt_tokens, "
            "generation.max_new_tokens or data.max_completion_tokens"
        )


def load_models(
    recipe: Recipe, device: torch.device, need_reference: bool, tokenizer=None, need_critic: bool = False
) -> Models:
    """Policy (and frozen reference, and critic) from a hub id or a local directory: the same code path."""
    from transformers import AutoModelForCausalLM

    cfg = recipe.model
    dtype = torch_dtype(cfg.dtype)
    load = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype, **quantised(cfg, device))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    policy = AutoModelForCausalLM.from_pretrained(cfg.path, **load)
    if cfg.load_in_4bit:  # QLoRA: norms in fp32, input gradients for the adapters (peft's recipe)
        from peft import prepare_model_for_kbit_training

        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
    reference = None
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        policy = get_peft_model(policy, lora)
        if recipe.reference is not None:
            reference = load_reference(recipe, device)
    elif need_reference:
        reference = load_reference(recipe, device)
    if cfg.disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    critic = None
    if need_critic:
        from align.critic import load_critic

        source = recipe.critic.path if recipe.critic is not None and recipe.critic.path else cfg.path
        critic = load_critic(source, dtype, cfg.revision, cfg.trust_remote_code, cfg.disable_dropout)
    eos = tokenizer.eos_token_id
    return Models(
        policy, reference, tokenizer, eos, tokenizer.pad_token_id, adapters=cfg.lora is not None, critic=critic
    )


def check_quantisation(recipe: Recipe) -> None:
    """model.load_in_4bit where it can run: bitsandbytes' 4-bit kernels on a CUDA GPU; one line otherwise."""
    import importlib.util

    from align.config import RecipeError

    if not recipe.model.load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise RecipeError(
            "model.load_in_4bit: QLoRA's 4-bit kernels (bitsandbytes) need a CUDA GPU and this machine has none; "
            "remove it (model.lora alone trains here)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("model.load_in_4bit: bitsandbytes is not installed (pip install bitsandbytes)")


def quantised(cfg, device) -> dict:
    """from_pretrained's 4-bit NF4 quantisation (double-quantised, bf16 compute) for QLoRA, else nothing."""
    if not cfg.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.device(device).index or 0}}


def load_reference(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The frozen reference: ``reference`` when the recipe names one, else the policy's starting weights."""
    from transformers import AutoModelForCausalLM

    cfg = recipe.model
    load = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=torch_dtype(cfg.dtype))
    reference = AutoModelForCausalLM.from_pretrained(recipe.reference or cfg.path, **load)
    return reference.requires_grad_(False).eval().to(device)


def load_saved_policy(recipe: Recipe, path: str | Path, device) -> torch.nn.Module:
    """A checkpoint's ``model/`` (or ``final/``) in eval mode: whole weights, or the recipe's base
    model with the saved LoRA adapters."""
    from transformers import AutoModelForCausalLM

    cfg = recipe.model
    load = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=torch_dtype(cfg.dtype))
    four_bit = cfg.load_in_4bit and torch.device(device).type == "cuda"  # merging (on CPU) reads the whole base
    load.update(quantised(cfg, device) if four_bit else {})
    if cfg.lora is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(cfg.path, **load)
        adapted = PeftModel.from_pretrained(base, str(path))
        return (adapted if four_bit else adapted.to(device)).eval()  # a 4-bit model is placed by device_map
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=load["dtype"]).to(device).eval()


def torch_dtype(name: str) -> torch.dtype | str:
    """A recipe's ``model.dtype`` as ``from_pretrained`` takes it ("auto" stays a string)."""
    return name if name == "auto" else getattr(torch, name)


@contextlib.contextmanager
def reference_model(models: Models, accelerator=None):
    """The reference: the frozen copy, or the LoRA policy with its adapters switched off (the one
    place that knows how; the trainer, the offline cache and the reports all ask here)."""
    if models.reference is not None:
        yield models.reference
        return
    if not models.adapters:
        raise RuntimeError("no reference model was loaded (the objective reads none: β = 0)")
    policy = models.policy if accelerator is None else accelerator.unwrap_model(models.policy)
    training = policy.training
    policy.eval()  # the reference is one fixed function: no dropout even when the policy trains with it
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(training)
