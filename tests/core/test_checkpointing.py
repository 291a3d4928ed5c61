"""train.gradient_checkpointing (align/step.py, align/run_setup.py): the layers' activations are
recomputed in the backward (each decoder layer runs once more per training forward) and nothing
else changes: the weights after two SGD steps equal those of the run without it, for an online
objective, an offline one and LoRA; the rollouts still decode with a KV cache (eval mode)."""

from __future__ import annotations

import pytest
from helpers import final_params, make_recipe, make_tiny_model_dir, max_diff, run_metrics
from safetensors.torch import load_file
from transformers.models.llama import modeling_llama

from align.trainer import train


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("ckpt_llama"), n_embd=32, n_head=4, architecture="llama")


@pytest.mark.parametrize(
    "key, model",
    [("rloo", {}), ("dpo", {}), ("rloo", {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}})],
)
def test_checkpointing_recomputes_the_layers_and_changes_no_weight(
    key, model, tiny_llama, tiny_data_files, tmp_path, monkeypatch
):  # noqa: E501
    calls = {"n": 0}
    # a layer's MLP: patching the checkpointed layer's own forward would hide it from transformers' wrapper
    forward = modeling_llama.LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    runs, counts = {}, {}
    for checkpointing in (False, True):
        run = tmp_path / f"ckpt{int(checkpointing)}"
        calls["n"] = 0
        recipe = make_recipe(
            tiny_llama,
            tiny_data_files,
            run,
            key,
            model=model,
            steps=2,
            optimizer="sgd",
            lr=0.05,
            max_grad_norm=None,
            gradient_checkpointing=checkpointing,
        )
        train(recipe)
        weights = load_file(str(run / "final" / "adapter_model.safetensors")) if model else final_params(run)
        runs[checkpointing], counts[checkpointing] = weights, calls["n"]
        assert len(run_metrics(run)) == 2
    assert max_diff(runs[False], runs[True]) < 1e-6
    # two training forwards (2 layers each) recomputed in the backward: 2 steps × 2 layers more at least
    assert counts[True] >= counts[False] + 4, counts
