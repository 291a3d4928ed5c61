"""What the trainer must know about how the processes share the model: the Accelerator for the
launch config, whether parameters are sharded (FSDP2, DeepSpeed ZeRO-3), gathering them once per
rollout for generation, placing the frozen reference like the policy, and the full state dict.

Rule for sharded parameters (one rule, read everywhere): a module whose weights may live in
shards (FSDP2 DTensors, ZeRO-3 partitions) or behind an engine (DeepSpeed at any stage) is only
ever called through its own forward. The fused LM head and the sampler-probs reuse read the
head's weight outside the forward, so ``logprobs.fused_head_weight`` declines them there (the
plain path: logits from the forward); they stay on for one process and DDP, where the trainer's
tests prove them equal to the plain path.

CPU processes: accelerate runs FSDP and DeepSpeed only on an accelerator device. On CPU processes
(gloo) it would silently make every process a one-process run: FSDP becomes no sharding at all,
DeepSpeed keeps its world size but accelerate counts one process (so every rank is "main" and the
batch bookkeeping disagrees). ``make_accelerator`` fixes both, so the same configs run here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch

Sharding = Literal["none", "zero2", "zero3", "fsdp2"]


def _cpu_processes() -> bool:
    """Several processes and no accelerator device: torch.distributed over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    try:
        return torch.accelerator.current_accelerator() is None
    except RuntimeError:
        return True


def make_accelerator(gradient_accumulation_steps: int = 1):
    """Accelerate picks the backend from the launch config (CPU, DDP, DeepSpeed, FSDP); it is told
    the number of micro-batches per step so DeepSpeed's engine steps on the last one."""
    from accelerate import Accelerator

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if _cpu_processes() and fsdp:
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType

        os.environ["ACCELERATE_USE_CPU"] = "1"  # a real process group (gloo), real process counts
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=gradient_accumulation_steps)
        from accelerate.state import AcceleratorState, PartialState

        # both shared states: accelerate re-reads the type from either during prepare()
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        return accelerator
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
    if _cpu_processes() and sharding(accelerator) in ("zero2", "zero3") and accelerator.num_processes == 1:
        import torch.distributed as dist
        from accelerate.state import AcceleratorState, PartialState

        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["num_processes"] = dist.get_world_size()
            shared["process_index"] = dist.get_rank()
            shared["local_process_index"] = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            shared["backend"] = dist.get_backend()
    return accelerator


def sharding(accelerator) -> Sharding:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return "zero3" if stage == 3 else "zero2"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    return "none"


def params_sharded(accelerator) -> bool:
    return sharding(accelerator) in ("zero3", "fsdp2")


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """accelerate infers DeepSpeed's batch sizes only from a prepared DataLoader, and align
    prepares none: the micro-batch (rows per process per forward) is set here, before prepare(),
    so train_batch_size = micro × accumulation × processes agrees with what the trainer does."""
    if sharding(accelerator) not in ("zero2", "zero3"):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["train_batch_size"] = micro_batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
    if config.get("gradient_clipping") in (None, "auto"):
        config["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0
    if sharding(accelerator) == "zero3":
        # final/ and checkpoints' model/ are whole HF directories: gather the weights on save
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def prepare_reference(reference: torch.nn.Module | None, accelerator) -> torch.nn.Module | None:
    """The frozen reference placed like the policy: fully sharded under FSDP2, a ZeRO-3 inference
    engine under ZeRO-3, a whole copy on each process otherwise (DDP and ZeRO-2 keep whole weights)."""
    if reference is None:
        return None
    kind = sharding(accelerator)
    if kind == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        reference = fsdp2_prepare_model(accelerator, reference)
        return reference.eval()
    if kind == "zero3":
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin.deepspeed_config
        config = {
            "train_micro_batch_size_per_gpu": plugin["train_micro_batch_size_per_gpu"],
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
        for precision in ("bf16", "fp16"):
            if plugin.get(precision, {}).get("enabled"):
                config[precision] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=reference, config=config)
        engine.eval()
        return engine
    return reference


def _zero3_offload(engine):
    optimizer = engine.optimizer
    return optimizer.parameter_offload if hasattr(optimizer, "parameter_offload") else optimizer


@contextlib.contextmanager
def gathered_for_generation(model, accelerator) -> Iterator[torch.nn.Module]:
    """The policy with whole weights for a rollout: gathered once, not per token.

    FSDP2: every FSDP unit is unsharded and kept so across the rollout's forwards. ZeRO-3: the
    partitions are gathered and DeepSpeed's fetch/release hooks removed for the rollout (TRL's
    ``unwrap_model_for_generation`` does the same), then restored. Either way the rollout's
    forwards make no collective call, so processes may stop generating at different lengths.
    """
    kind = sharding(accelerator)
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # FSDP2 sets each unit's resharding policy at its first forward (lazy init); done now,
        # so it cannot undo the policy set below
        model._get_fsdp_state()._lazy_init()
        for unit in units:
            unit.unshard()
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield model
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()
    elif kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            offload = _zero3_offload(model)
            for param in offload.module.parameters(recurse=True):
                param.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield accelerator.unwrap_model(model)
            finally:
                offload._register_deepspeed_module(offload.module)
    else:
        yield accelerator.unwrap_model(model)


@contextlib.contextmanager
def loading_whole_models(accelerator) -> Iterator[None]:
    """``from_pretrained`` on one process while a ZeRO-3 run is live: without this transformers
    would partition the new model across processes that are not taking part (zero.Init)."""
    if sharding(accelerator) != "zero3":
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def full_state_dict(accelerator, model) -> dict:
    """The whole model's state dict on the main process (every process must call this)."""
    if sharding(accelerator) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def run_info(accelerator) -> dict:
    """How the run ran, for summary.json: accelerate's distributed type, the process count, the
    mixed precision actually in effect."""
    return {
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
        "sharding": sharding(accelerator),
    }
