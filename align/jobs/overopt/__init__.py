"""``align overopt``: reward over-optimization (Gao et al. 2022), gold vs proxy reward against KL.

- ``metrics.py``: the maths -- Gao et al.'s fitted forms, best-of-n KL, distinct-n, the peak and
  the divergence point of a gold/proxy curve.
- ``config.py``: the study's recipe schema and how one run's training recipe is built from it.
- ``study.py``: the study -- gold-labelled pairs, proxy reward model, RL runs per objective and
  seed, checkpoint evaluation, best-of-n baseline; ``main`` for the CLI.
- ``report.py``: ``report.json``, ``report.md``, plots and the terminal table.
"""
