"""TRL side of step0_online_dpo.py; runs in the TRL venv and prints one JSON line.

    python _trl_online_dpo_worker.py BATCH.json OUT.pt

BATCH.json: model and reference dirs, beta, loss_type, the prompts' texts and the token ids (prompt
rows left-padded, completion rows right-padded, both samples of a prompt: TRL's layout, every
prompt's first sample then every prompt's second) with their rewards. TRL's OnlineDPOTrainer runs
one ``training_step`` with its generation replaced by these ids and its reward function returning
these rewards; the loss and every parameter's gradient after it are saved to OUT.pt.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULT_PREFIX  # noqa: E402


def main(batch_path: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    spec = json.loads(Path(batch_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    ref = AutoModelForCausalLM.from_pretrained(spec["ref"], dtype=getattr(torch, spec["dtype"]))
    rewards = {
        tuple(ids): r for ids, r in zip(spec["completion_ids"], spec["rewards"])
    }  # padded rows, as TRL passes them

    def reward_fn(prompts, completions, completion_ids, **kwargs):
        return [rewards[tuple(ids)] for ids in completion_ids]

    with tempfile.TemporaryDirectory() as out_dir:
        args = OnlineDPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=len(spec["prompts"]),
            beta=spec["beta"],
            loss_type=spec["loss_type"],
            temperature=1.0,
            max_new_tokens=len(spec["completion_ids"][0]),
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            seed=0,
        )
        trainer = OnlineDPOTrainer(
            model=policy,
            ref_model=ref,
            reward_funcs=[reward_fn],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
            processing_class=tokenizer,
        )
        ids = {k: torch.tensor(spec[k]) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}

        def fixed_generation(model, prompts, images=None):
            return ids["prompt_ids"], ids["prompt_mask"], ids["completion_ids"], ids["completion_mask"], None

        trainer._generate = fixed_generation
        model = trainer.model
        model.zero_grad()
        loss = trainer.training_step(model, {"prompt": spec["prompts"]})
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": float(loss), "grads": grads}, out_path)
    print(RESULT_PREFIX + json.dumps({"loss": float(loss), "params": len(grads)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
