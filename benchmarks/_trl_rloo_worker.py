"""TRL side of vs_trl_rloo.py; runs in the TRL venv and prints one JSON line of timings.

    /work/trl-venv/bin/python benchmarks/_trl_rloo_worker.py MODEL_DIR PROMPTS.jsonl NEW_TOKENS STEPS LR OUT_DIR
        [LORA_TARGETS]

Settings match align's recipe (see vs_trl_rloo.py): k = 4 completions of 4 prompts per step,
exactly NEW_TOKENS new tokens, β = 0.05, fp32, no gradient checkpointing, dropout off,
constant learning rate, gradient clipping at 1.0, the same length reward. LORA_TARGETS
(comma-separated module names): LoRA r = 8, α = 16 on them, the reference the base with adapters
off, as align's ``model.lora``.

With STEP0_COMPLETIONS and STEP0_GRADS set (benchmarks/step0_rloo.py): generation returns the
completions in that JSON file for each prompt (by its token ids) instead of sampling, and the
gradient of every parameter as it reaches the first optimizer step is saved to STEP0_GRADS.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GPU = os.environ.get("BENCH_GPU") == "1"  # benchmarks/gpu_check.py: one GPU, bf16 autocast
# benchmarks/gpu_check.py's vLLM rows: TRL's colocated vLLM engine (use_vllm, vllm_mode="colocate")
USE_VLLM = os.environ.get("BENCH_TRL_VLLM") == "1"

from common import RESULT_PREFIX, length_reward  # noqa: E402


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if GPU and torch.cuda.is_available() else None


def reward(prompts, completions, **kwargs) -> list[float]:
    return length_reward(completions)


def main(argv: list[str]) -> int:
    model_dir, prompts, new_tokens, steps, lr, out_dir = argv[:6]
    lora_targets = [t for t in (argv[6] if len(argv) > 6 else "").split(",") if t]
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class StepTimer(TrainerCallback):
        """on_step_begin → on_step_end: generation, scoring, log-probs, loss, backward, optimizer."""

        def __init__(self):
            self.began, self.step_s, self.ends = 0.0, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_s.append(now - self.began)
            self.ends.append(now)

    config = RLOOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=16,  # completions: 4 prompts × 4 generations
        num_generations=4,
        max_completion_length=int(new_tokens),
        # the same exact length either way: vLLM's SamplingParams call it min_tokens
        generation_kwargs={"min_tokens" if USE_VLLM else "min_new_tokens": int(new_tokens)},
        use_vllm=USE_VLLM,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.05,
        learning_rate=float(lr),
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=int(steps),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=GPU,  # TRL's default is bf16=True, even on CPU; align trains in fp32 (bf16 autocast on a GPU)
        gradient_checkpointing=False,  # TRL's default is True: it would recompute activations
        disable_dropout=True,  # align's default; TRL's RLOO default is False
        use_cpu=not GPU,
        seed=0,
        dataloader_num_workers=0,
    )
    dataset = load_dataset("json", data_files=prompts, split="train")
    timer = StepTimer()
    started = time.perf_counter()
    peft_config = None
    if lora_targets:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets)
    trainer = RLOOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        callbacks=[timer],
        peft_config=peft_config,
    )
    setup = time.perf_counter() - started
    grads = _inject_step0(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "loss" in h]
    intervals = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    print(
        RESULT_PREFIX
        + json.dumps(
            {
                "step_s": timer.step_s,
                "interval_s": intervals,
                "setup_s": setup,
                "loss": losses,
                "completion_length": lengths,
                "peak_gib": peak_gib(),
                "grad_norm": [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h],
                "step0_grads": grads.get("saved"),
            }
        )
    )
    return 0


def _with_mask_positions(forward):
    def forward_with_positions(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return forward(*args, **kwargs)

    return forward_with_positions


def _inject_step0(trainer) -> dict:
    """STEP0_COMPLETIONS / STEP0_GRADS (see the module docstring); {} when unset."""
    completions_path, grads_path = os.environ.get("STEP0_COMPLETIONS"), os.environ.get("STEP0_GRADS")
    if not completions_path:
        return {}
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    entries = json.loads(Path(completions_path).read_text())
    by_prompt = {tuple(e["prompt_ids"]): list(e["completion_ids"]) for e in entries}
    served: dict[tuple, int] = {}

    def fixed_completions(prompt_ids, images, multimodal_fields):
        out = []
        for ids in prompt_ids:
            key = tuple(int(t) for t in ids)
            if key not in by_prompt:
                raise KeyError(f"STEP0_COMPLETIONS has no completions for prompt ids {list(key)[:12]}…")
            j = served.get(key, 0)
            served[key] = j + 1
            out.append(by_prompt[key][j % len(by_prompt[key])])
        return out

    trainer._generate_single_turn = fixed_completions
    if os.environ.get("STEP0_MASK_POSITIONS") == "1":  # position ids from the attention mask, as align's
        for model in (trainer.model, trainer.ref_model):
            if model is not None:
                model.forward = _with_mask_positions(model.forward)
    state: dict = {}

    def save_first_grads(optimizer, args, kwargs):
        if "saved" in state:
            return
        named = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save(named, grads_path)
        state["saved"] = grads_path

    register_optimizer_step_pre_hook(save_first_grads)
    return state


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
