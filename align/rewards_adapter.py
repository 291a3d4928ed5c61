"""The trainer's view of the recipe's reward: scores as tensors, every component kept for logging.

Rewards themselves live in ``rewards/`` (TRL's ``(prompts, completions, **columns) -> list[float]``
convention); this module only turns the recipe's component list into one object the loop calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class RewardFunction:
    def __init__(self, components: list, device: torch.device):
        import rewards as rewards_lib

        specs = [c.model_dump(exclude_none=True) for c in components]
        self.combined = rewards_lib.build_combined(specs, device=str(device))
        self.combined.allow_non_finite = True  # a NaN/inf score skips the step (counted) rather than ending the run
        self.demo_cache = rewards_lib.DemoRewardCache(self.combined)
        self._last: Tensor | None = None
        self.calibration: tuple[Tensor, Tensor] | None = None  # RCfD: demonstrations' (mean, std) [C]

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, list],
        gather: Callable[[list[float]], list[float]] | None = None,
        update: bool = True,
    ) -> tuple[Tensor, dict[str, list[float]]]:
        """Weighted total per sample [N] and each component's raw scores. ``gather``: every
        process's scores concatenated, so whitening moments stay equal on all ranks; ``update=False``
        (evaluation) leaves the moments as training left them."""
        components = self.combined.score_components(prompts, completions, **columns)
        total = self.combined.combine(components, update=update, gather=gather)
        self._last = torch.tensor([components[name] for name in components], dtype=torch.float32).T
        return torch.tensor(total, dtype=torch.float32), components

    def last_components_tensor(self) -> Tensor:
        """[N, C] raw component scores of the last ``score`` call (RCfD calibrates each one)."""
        return self._last

    def score_demonstrations(self, prompts: list[str], demonstrations: list[str], columns: dict[str, list]) -> Tensor:
        """[N, C] raw component scores of the demonstrations (cached)."""
        return torch.as_tensor(self.demo_cache(prompts, demonstrations, **columns), dtype=torch.float32)

    def fit_calibration(self, prompts: list[str], demonstrations: list[str], columns: dict[str, list]) -> None:
        """Per-component moments of the demonstrations' (clipped) scores: the one affine map that
        ``calibrate`` applies to policy and demonstration scores alike (RCfD's per-component
        whitening). Fixed for the run, so the distance is in each component's demonstration std
        whatever the components' raw scales; a component whose demonstrations all score alike
        keeps unit scale."""
        raw = self._clip_components(self.score_demonstrations(prompts, demonstrations, columns).double())
        std = raw.std(0, correction=0)
        self.calibration = (raw.mean(0), torch.where(std > 0, std, 1.0))

    def calibrate(self, components: Tensor) -> Tensor:
        """[N, C] raw scores → clipped per component, whitened with the demonstrations' moments."""
        mean, std = self.calibration
        return ((self._clip_components(components.double()) - mean) / std).float()

    def _clip_components(self, values: Tensor) -> Tensor:
        out = values.clone()
        for c, component in enumerate(self.combined.components):
            if component.clip is not None:
                out[:, c] = out[:, c].clamp(*component.clip)
        return out

    def state_dict(self) -> dict:
        return self.combined.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.combined.load_state_dict(state)


def build_reward(components: list, device: torch.device) -> RewardFunction:
    return RewardFunction(components, device)
