"""TRL side of vs_trl_dpo.py; runs in the TRL venv and prints one JSON line.

    python _trl_dpo_worker.py time  MODEL_DIR PAIRS.jsonl LOSS_TYPE STEPS LR OUT_DIR PRECOMPUTE
    python _trl_dpo_worker.py check MODEL_DIR PAIRS.jsonl LOSS_TYPE REF_DIR N OUT_DIR

(python: the TRL venv's, /work/trl-venv/bin/python).

``time``: DPOTrainer for STEPS steps of 16 pairs; per-step seconds from a TrainerCallback
(on_step_begin → on_step_end). PRECOMPUTE (0/1) sets ``precompute_ref_log_probs``.
``check``: the loss of the first N pairs in file order, policy MODEL_DIR against reference
REF_DIR, before any update, plus the token ids TRL built for them (prompt, chosen, rejected),
so the driver can prove both sides saw the same ids.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GPU = os.environ.get("BENCH_GPU") == "1"  # benchmarks/gpu_check.py: one GPU, bf16 autocast

from common import DPO_BETA, RESULT_PREFIX  # noqa: E402


def make_config(out_dir: str, loss_type: str, steps: int, lr: float, precompute: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=16,
        loss_type=[loss_type],
        beta=DPO_BETA,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=GPU,  # TRL's default is bf16=True, even on CPU; align trains in fp32 (bf16 autocast on a GPU)
        gradient_checkpointing=False,  # TRL's default is True: it would recompute activations
        precompute_ref_log_probs=precompute,
        use_cpu=not GPU,
        seed=0,
        dataloader_num_workers=0,
    )


def time_steps(model_dir: str, pairs: str, loss_type: str, steps: str, lr: str, out_dir: str, precompute: str) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.began, self.step_s = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.began)

    config = make_config(out_dir, loss_type, int(steps), float(lr), precompute == "1")
    dataset = load_dataset("json", data_files=pairs, split="train")
    timer = StepTimer()
    started = time.perf_counter()
    trainer = DPOTrainer(model=model_dir, args=config, train_dataset=dataset, callbacks=[timer])
    setup = time.perf_counter() - started
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": timer.step_s, "setup_s": setup, "loss": losses}


def check(model_dir: str, pairs: str, loss_type: str, ref_dir: str, n: str, out_dir: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    config = make_config(out_dir, loss_type, 1, 1e-5, False)
    dataset = load_dataset("json", data_files=pairs, split="train").select(range(int(n)))
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    trainer = DPOTrainer(model=model_dir, ref_model=ref, args=config, train_dataset=dataset)
    rows = [trainer.train_dataset[i] for i in range(int(n))]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return {
        "loss": float(loss),
        "prompt_ids": [r["prompt_ids"] for r in rows],
        "chosen_ids": [r["chosen_ids"] for r in rows],
        "rejected_ids": [r["rejected_ids"] for r in rows],
    }


def main(argv: list[str]) -> int:
    mode, *rest = argv
    result = time_steps(*rest) if mode == "time" else check(*rest)
    if GPU:
        import torch

        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(RESULT_PREFIX + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
