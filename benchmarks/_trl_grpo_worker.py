"""TRL side of step0_policy_gradients.py; runs in the TRL venv and prints one JSON line.

    /work/trl-venv/bin/python benchmarks/_trl_grpo_worker.py BATCH.pt OUT.pt

BATCH.pt (written by step0_policy_gradients.py): the model directory and the cases, each a
GRPOConfig's loss fields and the batch as TRL's ``_compute_loss`` reads it (prompt_ids,
prompt_mask, completion_ids, completion_mask, advantages, old_per_token_logps, ref_per_token_logps,
num_items_in_batch). For each case a GRPOTrainer is built on a fresh copy of the model (fp32, dropout off,
one process, no accumulation: ``steps_per_generation`` 1), its ``_compute_loss`` called once on
the batch in train mode and the loss backpropagated; the loss and every parameter's gradient go
to OUT.pt under the case's name. Generation never runs: the completions are the batch's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULT_PREFIX  # noqa: E402


def main(argv: list[str]) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = torch.load(argv[0])
    model_dir, cases = spec["model_dir"], spec["cases"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out, losses = {}, {}
    for name, case in cases.items():
        batch = case["batch"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, spec["dtype"]))
        config = GRPOConfig(
            output_dir=str(Path(argv[1]).parent / f"trl-{name}"),
            per_device_train_batch_size=batch["completion_ids"].shape[0],
            num_generations=spec["k"],
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            max_completion_length=batch["completion_ids"].shape[1],
            temperature=1.0,
            disable_dropout=True,
            bf16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            **case["fields"],
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda prompts, completions, **kwargs: [0.0] * len(completions),
            args=config,
            train_dataset=Dataset.from_dict({"prompt": ["unused"] * spec["k"]}),
            processing_class=tokenizer,
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer._compute_loss(trainer.model, dict(batch))
        loss.backward()
        out[name] = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        losses[name] = float(loss.detach())
    torch.save(out, argv[1])
    print(RESULT_PREFIX + json.dumps({"loss": losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
