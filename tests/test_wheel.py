"""An installed wheel runs a bundled recipe by name from any directory: the recipes ship inside
the package (``align/recipes/``), found without the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel (offline: the hatchling of the test extra) and unpacked into
    a fresh directory, its dependencies taken from this environment."""
    pytest.importorskip("hatchling")
    work = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(work / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (work / "dist").glob("align-*.whl")
    site = work / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(site / "bin" / "align"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_wheel_carries_the_recipes_and_is_what_runs(installed, tmp_path) -> None:
    assert (installed / "align" / "recipes" / "quickstart.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [sys.executable, "-c", "import align.config as c; print(c.__file__); print(c.bundled_recipes_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [str(installed / "align" / "config.py"), str(installed / "align" / "recipes")]
    listed = _run(installed, tmp_path, "recipes")
    assert listed.returncode == 0, listed.stderr
    for name in ("quickstart", "bandit/default", "summarize/entailment_rloo", "overopt/quickstart"):
        assert name in listed.stdout


def test_align_train_quickstart_from_any_directory(installed, tmp_path) -> None:
    out = _run(installed, tmp_path, "train", "quickstart", "train.steps=2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "runs" / "quickstart"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")  # a plain HF directory
    missing = _run(installed, tmp_path, "train", "no_such_recipe")
    assert missing.returncode == 2
    assert "no bundled recipe of that name" in missing.stderr and "Traceback" not in missing.stderr
