"""Rewards: callables ``(prompts, completions, **columns) -> list[float]``, chosen by name.

    import rewards
    sentiment = rewards.build("sentiment")
    scores = sentiment(prompts, completions)                     # one float per completion

    reward = rewards.build_combined([
        {"name": "entailment", "model": "microsoft/deberta-large-mnli", "weight": 1.0},
        {"name": "length", "target": 40, "weight": 0.1, "normalize": True, "clip": [-3, 3]},
    ])
    parts = reward.score_components(prompts, completions, document=documents)  # raw, by name
    total = reward.combine(parts)                                 # weighted sum [N]
    demo = rewards.DemoRewardCache(reward)(prompts, demonstrations, document=documents)  # [N, C]

One reward per module (``rewards/<name>.py``, its docstring states the maths); the registry is
in ``rewards/registry.py``, the composite in ``rewards/combined.py``, RCfD's demonstration
scores in ``rewards/demo.py``, and ``call_reward``/``RewardError`` in ``rewards/base.py``.
"""

from rewards.base import Reward, RewardError, TRLView, call_reward, resolve_device
from rewards.combined import CombinedReward, Component, RunningMoments, build_combined
from rewards.contains import Contains
from rewards.demo import DemoRewardCache
from rewards.entailment import Entailment
from rewards.length import Length
from rewards.regex import Regex
from rewards.registry import REGISTRY, build, check_options, options, register
from rewards.reward_model import RewardModel
from rewards.rouge import Rouge
from rewards.sentiment import Sentiment

__all__ = [
    "REGISTRY",
    "CombinedReward",
    "Component",
    "Contains",
    "DemoRewardCache",
    "Entailment",
    "Length",
    "Regex",
    "Reward",
    "RewardError",
    "RewardModel",
    "Rouge",
    "RunningMoments",
    "Sentiment",
    "TRLView",
    "build",
    "check_options",
    "build_combined",
    "call_reward",
    "options",
    "register",
    "resolve_device",
]
