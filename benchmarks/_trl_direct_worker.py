"""TRL side of step0_direct_alignment.py; runs in the TRL venv and prints one JSON line.

    python _trl_direct_worker.py SPEC.json GRADS.pt

(python: the TRL venv's, /work/trl-venv/bin/python). SPEC holds the objective (``simpo``,
``orpo``, ``kto``), TRL's options, the policy (and for KTO the reference) directory and the
token ids align trained on at step 0, in align's order. The trainer is TRL's own -- CPOTrainer
(``loss_type="simpo"``), ORPOTrainer, KTOTrainer -- built on a throwaway dataset in a temporary
output directory; its loss code then runs once on a batch made of align's ids (TRL's own
collator for KTO, TRL's tensor layout for the pair trainers: prompt + completion, right-padded,
labels −100 outside the completion), and the gradient of every parameter is saved to GRADS.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULT_PREFIX  # noqa: E402

COMMON_ARGS = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,  # TRL's default is bf16=True, even on CPU; align trains in fp32
    gradient_checkpointing=False,
    save_strategy="no",
    seed=0,
    dataloader_num_workers=0,
)


def pair_batch(spec: dict, pad_id: int) -> dict:
    """TRL's pair tensors (``tokenize_row`` + ``DPODataCollatorWithPadding``'s layout) from align's ids."""
    import torch

    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p + c for p, c in zip(spec["prompt_ids"], spec[f"{side}_ids"])]
        labels = [[-100] * len(p) + c for p, c in zip(spec["prompt_ids"], spec[f"{side}_ids"])]
        width = max(len(r) for r in rows)
        batch[f"{side}_input_ids"] = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batch[f"{side}_labels"] = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return batch


def pair_trainer(spec: dict, model, tokenizer, out_dir: str):
    from datasets import Dataset

    texts = Dataset.from_dict(
        {"prompt": ["the plot"] * 2, "chosen": [" was fine ."] * 2, "rejected": [" was bad ."] * 2}
    )
    args = dict(output_dir=out_dir, per_device_train_batch_size=len(spec["prompt_ids"]), **COMMON_ARGS)
    if spec["objective"] == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config = ORPOConfig(beta=spec["options"]["beta"], **args)
        return ORPOTrainer(model=model, args=config, train_dataset=texts, processing_class=tokenizer)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config = CPOConfig(loss_type="simpo", **spec["options"], **args)
    return CPOTrainer(model=model, args=config, train_dataset=texts, processing_class=tokenizer)


def kto_loss(spec: dict, model, tokenizer, out_dir: str):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    n = len(spec["prompt_ids"])
    texts = Dataset.from_dict({"prompt": ["the plot"] * n, "completion": [" was fine ."] * n, "label": [True] * n})
    config = KTOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=n,
        loss_type="kto",
        precompute_ref_log_probs=False,
        max_length=None,
        **spec["options"],
        **COMMON_ARGS,
    )
    ref = AutoModelForCausalLM.from_pretrained(spec["reference"], dtype=model.dtype)
    trainer = KTOTrainer(model=model, ref_model=ref, args=config, train_dataset=texts, processing_class=tokenizer)
    examples = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": bool(label)}
        for p, c, k, label in zip(spec["prompt_ids"], spec["completion_ids"], spec["kl_completion_ids"], spec["labels"])
    ]
    batch = trainer.data_collator(examples)
    trainer.model.train()  # dropout is off (KTOConfig.disable_dropout); the trainer's own mode
    loss = trainer.compute_loss(trainer.model, batch)
    kl = trainer._metrics["train"]["kl"][-1]
    return trainer, loss, {"kl": kl}


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_path, grads_path = argv
    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    result, saved = {}, {}
    for dtype in spec.get("dtypes", ["float32"]):
        torch.set_default_dtype(getattr(torch, dtype))  # the reference KTO loads too
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, dtype))
        with tempfile.TemporaryDirectory() as out_dir:
            if spec["objective"] == "kto":
                trainer, loss, metrics = kto_loss(spec, model, tokenizer, out_dir)
            else:
                trainer = pair_trainer(spec, model, tokenizer, out_dir)
                trainer.model.train()
                loss, metrics = trainer.get_batch_loss_metrics(trainer.model, pair_batch(spec, tokenizer.pad_token_id))
            loss.backward()
            saved[dtype] = {
                n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None
            }
        result[dtype] = {"loss": float(loss), "metrics": {k: float(v) for k, v in metrics.items()}}
    torch.save(saved, grads_path)
    print(RESULT_PREFIX + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
