"""Evaluation studies that go beyond one training run: ``align overopt`` (reward over-optimization).

- ``align/eval/metrics.py``: the maths -- Gao et al.'s fitted forms, best-of-n KL, distinct-n,
  the peak and the divergence point of a gold/proxy curve.
- ``align/eval/overopt.py``: the study -- gold-labelled pairs, proxy reward model, RL runs per
  objective and seed, checkpoint evaluation, best-of-n baseline; ``main`` for the CLI.
- ``align/eval/overopt_report.py``: ``report.json``, ``report.md``, plots and the terminal table.
"""
