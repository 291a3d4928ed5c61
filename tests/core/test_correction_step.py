"""The importance correction in the trainer's step (align/step.py, losses/correction.py): an engine
whose log-probs are deliberately off by log 2 gives an update that is the formula's multiple of the
uncorrected one (RLOO's loss is linear in the weights): ×2 when kept, ×C_max when truncated, none
when masked; per token and per sequence. The native engine stands in for the engine here."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import final_params, make_recipe, run_metrics
from safetensors.torch import load_file

from align.native_engine import NativeEngine
from align.trainer import train

SHIFT = math.log(2.0)


def shifted_engine(monkeypatch, where: str) -> None:
    """The native engine, reporting log π_engine = log π − log 2 on every token ("all") or on each
    completion's first token only ("first": a sequence's summed δ is log 2 too)."""
    original = NativeEngine.generate

    def generate(self, *args, **kwargs):
        rollout = original(self, *args, **kwargs)
        shift = torch.zeros_like(rollout.sampler_logprobs)
        if where == "all":
            shift += SHIFT
        else:
            shift[:, 0] = SHIFT
        return replace(rollout, sampler_logprobs=(rollout.sampler_logprobs - shift) * rollout.completion_mask)

    monkeypatch.setattr(NativeEngine, "generate", generate)


def update(tiny_model_dir, tiny_data_files, run_dir, correction: dict | None) -> dict[str, torch.Tensor]:
    generation = {} if correction is None else {"importance_correction": correction}
    recipe = make_recipe(
        tiny_model_dir,
        tiny_data_files,
        run_dir,
        "rloo",
        generation=generation,
        steps=1,
        optimizer="sgd",
        lr=0.05,
        max_grad_norm=None,
    )
    train(recipe)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    return {name: value - start[name] for name, value in final_params(run_dir).items() if name in start}


@pytest.mark.parametrize(
    "where, correction, factor",
    [
        ("all", {"mode": "token_truncate", "clip_max": 10.0}, 2.0),
        ("all", {"mode": "token_truncate", "clip_max": 1.5}, 1.5),
        ("all", {"mode": "token_mask", "clip_max": 1.5}, 0.0),
        ("first", {"mode": "sequence_truncate", "clip_max": 1.5}, 1.5),
        ("first", {"mode": "sequence_mask", "clip_max": 3.0}, 2.0),
        ("first", {"mode": "sequence_mask", "clip_max": 3.0, "clip_min": 2.5}, 0.0),
    ],
)
def test_a_perturbed_engine_gives_the_formulas_update(
    where, correction, factor, tiny_model_dir, tiny_data_files, tmp_path, monkeypatch
):
    plain = update(tiny_model_dir, tiny_data_files, tmp_path / "plain", None)
    shifted_engine(monkeypatch, where)
    corrected = update(tiny_model_dir, tiny_data_files, tmp_path / "corrected", correction)
    assert max(float(v.abs().max()) for v in plain.values()) > 1e-4  # the step moved the weights
    for name, delta in plain.items():
        # atol: θ − θ₀ of float32 weights near 1 carries their rounding (ulp 1.2e-7)
        assert torch.allclose(corrected[name], factor * delta, rtol=1e-4, atol=1e-6), name
    (record,) = run_metrics(tmp_path / "corrected")
    assert record["is_ratio_mean"] == pytest.approx(2.0, rel=1e-4)
    assert record["engine_kl"] > 0.1 if where == "all" else record["engine_kl"] > 0.01
    assert record["is_clipped_fraction"] == (0.0 if factor == 2.0 else 1.0)


def test_the_native_engine_applies_no_correction_unless_asked(tiny_model_dir, tiny_data_files, tmp_path):
    train(make_recipe(tiny_model_dir, tiny_data_files, tmp_path / "run", "rloo", steps=1))
    (record,) = run_metrics(tmp_path / "run")
    assert "is_ratio_mean" not in record
