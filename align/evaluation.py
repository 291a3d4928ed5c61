"""Evaluation of a policy: keyed samples on prompts, their reward and KL to the reference, and
held-out preference pairs' implicit-reward margin and accuracy.

The end-of-run report (``align.jobs.report``), ``align sample``, the studies (``align compare``,
``align overopt``) and ``align summarize`` all evaluate through these functions, so a number means
the same thing in each of them."""

from __future__ import annotations

import torch

import losses
from align import data as data_lib
from align import formats
from align.logprobs import completion_logprobs
from align.models import reference_model
from align.native_engine import decode_completions, generate
from align.rollout import Rollout, sampling_settings
from align.sampling import sample_keys

EVAL_SEED_OFFSET = 10_007  # evaluation samples never reuse a training step's keys


@torch.no_grad()
def sample_prompts(
    recipe, models, policy, prompts: list[str], seed: int, k: int, device, first_index: int = 0
) -> Rollout:
    """k keyed samples per prompt (prompt i of the list is sample index ``first_index + i``), decoded:
    the same prompts, seed and index always draw the same completions."""
    ids = data_lib.encode_prompts(models.tokenizer, prompts, recipe.data.max_prompt_tokens)
    prompt_ids, prompt_mask = data_lib.pad(ids, models.pad_token_id, "left", device)
    keys = sample_keys(seed, 0, torch.arange(first_index, first_index + len(prompts)), k)
    sampling = sampling_settings(recipe.generation, models.eos_token_id, models.pad_token_id)
    rollout = generate(policy, prompt_ids, prompt_mask, keys, k=k, sampling=sampling)
    return decode_completions(rollout, models.tokenizer, sampling)


@torch.no_grad()
def evaluate_policy(
    recipe,
    models,
    policy,
    prompts: list[str],
    reward,
    device,
    columns: dict | None = None,
    messages: list | None = None,
    with_reference: bool = True,
) -> dict:
    """One sample per prompt from ``policy``; its reward (mean, and each sample's in ``scores``) and
    its KL to the reference (k1, k3; left out without ``with_reference``)."""
    rollout = sample_prompts(recipe, models, policy, prompts, recipe.train.seed + EVAL_SEED_OFFSET, 1, device)
    texts = list(rollout.texts)
    temperature = recipe.generation.temperature
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, temperature)
    out = {"length": float(rollout.completion_mask.sum(-1).float().mean()), "texts": texts}
    if with_reference:
        logp = completion_logprobs(policy, *args)
        with reference_model(models) as ref:
            ref_logp = completion_logprobs(ref, *args)
        mask = rollout.completion_mask
        out["kl_k1"] = float(losses.sequence_kl(logp, ref_logp, mask, "k1").mean())
        out["kl_k3"] = float(losses.sequence_kl(logp, ref_logp, mask, "k3").mean())
    if reward is not None:
        scores = reward.score(prompts, texts, columns or {}, update=False, messages=messages)
        out["scores"] = scores.total.float().tolist()
        out["reward"] = float(scores.total.float().nanmean())  # over the samples some reward scored
        out["components"] = {k: float(torch.tensor(v).nanmean()) for k, v in scores.components.items()}
    return out


@torch.no_grad()
def evaluate_pairs(recipe, models, policy, held_out, device) -> dict:
    """Held-out pairs (chosen, rejected) under the policy and the reference, as TRL's DPO logs them:
    the implicit reward β·(ℓ_π(y) − ℓ_ref(y)) of each side (ℓ summed over the completion's
    tokens), their mean margin and how often chosen's is higher (``reward_accuracy``); and how often
    each model alone gives chosen the higher log-likelihood (``loglik_accuracy``). A reference-free
    objective (SimPO, ORPO) runs no reference: its implicit reward is β·ℓ_π(y) and the reference's
    accuracy is left out."""
    objective = recipe.build_objective()
    beta = float(getattr(objective, "beta", 0.0) or 0.0)
    with_reference = not objective.reference_free
    chunk = max(1, recipe.train.batch_size)
    n = len(held_out)
    sums: dict[str, list[torch.Tensor]] = {"policy": [], "reference": []}

    def sequence_sums(model, inputs) -> torch.Tensor:
        lp = completion_logprobs(model, *inputs)
        return losses.sequence_logprobs(lp, inputs[3].to(lp.dtype)).double().view(2, -1).cpu()

    for lo in range(0, n, chunk):
        rows = list(range(lo, min(lo + chunk, n)))
        p_ids, p_mask = data_lib.pad(
            [held_out.prompt_ids[i] for _ in range(2) for i in rows], models.pad_token_id, "left", device
        )
        c_ids, c_mask = data_lib.pad(
            [held_out.completion_ids[t][i] for t in range(2) for i in rows], models.pad_token_id, "right", device
        )
        inputs = (p_ids, p_mask, c_ids, c_mask)
        # the policy's pass outside the reference's: under LoRA the reference is the same model with
        # its adapters switched off for as long as its context is open
        sums["policy"].append(sequence_sums(policy, inputs))
        if with_reference:
            with reference_model(models) as reference:
                sums["reference"].append(sequence_sums(reference, inputs))
    policy_lp = torch.cat(sums["policy"], 1)
    ref_lp = torch.cat(sums["reference"], 1) if with_reference else torch.zeros_like(policy_lp)
    implicit = beta * (policy_lp - ref_lp)  # [2, P]: chosen, rejected
    margin = implicit[0] - implicit[1]
    out = {
        "pairs": n,
        "beta": beta,
        "reward_margin": float(margin.mean()),
        "reward_accuracy": float((margin > 0).double().mean()),
        "loglik_accuracy": float((policy_lp[0] > policy_lp[1]).double().mean()),
        "chosen_logp": float(policy_lp[0].mean()),
        "rejected_logp": float(policy_lp[1].mean()),
    }
    if with_reference:
        out["loglik_accuracy_reference"] = float((ref_lp[0] > ref_lp[1]).double().mean())
    return out


def eval_prompts(recipe, dataset, tokenizer, limit: int = 64) -> tuple[list[str], dict[str, list], str, list]:
    """(prompts, their rows' other columns, what they are, their chat messages for TRL rewards --
    None unless the data's prompts are messages): the
    held-out ``data.eval_prompts`` rendered like training prompts (template, chat template, TRL's
    formats), else the first training prompts."""
    cfg = recipe.data
    if cfg.eval_prompts:
        table = data_lib.load_table(cfg.eval_prompts)
        table = formats.normalise(table.select(range(min(limit, len(table)))), cfg, "online", cfg.eval_prompts)
        prompt_column = [cfg.prompt_column] if cfg.prompt_column in table.column_names else []
        columns = data_lib.read_columns(cfg.eval_prompts, table, list(table.column_names), prompt_column)
        prompts, _, messages = data_lib.prompt_rows(tokenizer, columns, cfg, cfg.eval_prompts)
        conversational = data_lib.is_conversational(columns, cfg)
        columns.pop(cfg.prompt_column, None)
        return prompts, columns, "held-out prompts", messages if conversational else None
    if dataset is None:
        return [], {}, "", None
    columns = {name: values[:limit] for name, values in dataset.columns.items()}
    messages = dataset.messages[:limit] if dataset.conversational else None
    return dataset.prompts[:limit], columns, "training prompts (no data.eval_prompts)", messages


class models_in_eval:
    """``with models_in_eval(policy):`` the policy in eval mode, its training mode restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
