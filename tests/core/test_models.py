"""A model id that cannot be resolved is one line naming the field, the id and the fix, exit 2,
before any weights load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _overrides(field: str, model_dir, data_files, tmp_path) -> list[str]:
    """A DPO run whose ``field`` names a hub id that is nowhere."""
    return [
        f"model.path={model_dir}",
        f"data.train={data_files['pairs']}",
        "objective.name=dpo",
        f"output.dir={tmp_path / 'run'}",
        f"{field}=align-tests/not-cached-anywhere",
    ]


@pytest.mark.parametrize("field", ["model.path", "reference"])
def test_an_unresolvable_hub_id_is_one_line_with_the_fix(field, tiny_model_dir, tiny_data_files, tmp_path):
    overrides = _overrides(field, tiny_model_dir, tiny_data_files, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "quickstart", "prepare=null", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(f"align train: {field}: cannot load")
    assert "'align-tests/not-cached-anywhere'" in lines[0] and "hf download align-tests/not-cached-anywhere" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("field", ["model.path", "reference"])
def test_an_unreachable_hub_is_one_line_without_retries(field, tiny_model_dir, tiny_data_files, tmp_path):
    """Without HF_HUB_OFFLINE and with the hub unreachable (here: an endpoint nobody listens on),
    the run probes the hub once, goes offline, and fails in one line -- not after ~50 s of retries."""
    overrides = _overrides(field, tiny_model_dir, tiny_data_files, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: connection refused at once
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "train", "quickstart", "prepare=null", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=40,  # the retries this replaces took ~50 s
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "127.0.0.1 cannot be reached; loading from the local Hugging Face cache only" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"align train: {field}: cannot load"), done.stderr[-2000:]
    assert "hf download align-tests/not-cached-anywhere" in lines[0]
