"""The toy-bandit lab: tabular policies trained with the SAME ``losses/`` objectives as the trainer.

    from align.jobs.bandit import BanditRecipe, run
    results = run(BanditRecipe(objectives=["rloo", "copg"], seeds=4))

See ``align/jobs/bandit/lab.py`` (training), ``worlds.py`` (bandit and sequence policies),
``targets.py`` (analytic fixed points), ``samplers.py`` (pairs, replay, the lagged policy),
``config.py`` (the recipe schema).
"""

from align.jobs.bandit.config import BanditRecipe, LagSampler, ObjectiveEntry, PairSampler, SequenceConfig
from align.jobs.bandit.lab import run

__all__ = ["BanditRecipe", "LagSampler", "ObjectiveEntry", "PairSampler", "SequenceConfig", "run"]
