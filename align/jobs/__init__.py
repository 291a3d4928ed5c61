"""The job layer: what a user runs. Each job calls the core (``align/``) and the leaves
(``losses/``, ``rewards/``); nothing in the core imports a job.

- ``train``: ``align train`` / ``align sft`` / ``align recipes`` -- prepares a recipe's assets,
  runs the core trainer, writes the end-of-run report (``report``).
- ``quickstart``: the embedded corpus, tokenizer and tiny GPT-2 of ``recipes/quickstart.yaml``.
- ``summarize``: offline summarisation with an entailment reward (corpus, NLI model, pipeline, report).
- ``overopt``: the reward over-optimization study (gold vs proxy against KL).
- ``bandit``: objectives on toy bandits with closed-form optima.
- ``rm``: Bradley–Terry reward-model training.
"""
