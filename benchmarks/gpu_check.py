"""The GPU check (run by benchmarks/gpu_check.sh): one GPU, under ten minutes, one table.

    benchmarks/gpu_check.sh [--steps N]        # on a machine with a GPU
    benchmarks/gpu_check.sh --smoke            # here, on the CPU: the same pipeline, tiny model, 3 steps

Rows, each on a ~100M-parameter GPT-2 built from a config (12 layers, 768 wide, the benchmarks'
30k-token tokenizer), bf16 autocast over fp32 weights (`launch/single_gpu.yaml`):
- align RLOO: 4 prompts × k = 4, exactly 128 new tokens; align DPO: 16 pairs a step;
- TRL's RLOOTrainer and DPOTrainer on the same work (when ``TRL_PYTHON`` imports trl);
- align RLOO under FSDP2 at world size 1 (`launch/fsdp.yaml --num_processes 1`);
- align RLOO with its rollouts from a colocated vLLM engine (``generation.engine: vllm``) against
  TRL's RLOOTrainer with ``use_vllm=True, vllm_mode="colocate"`` (needs vLLM in both venvs);
- align RLOO from a vLLM server (``align vllm-serve``, weights pushed by file each step): in step
  with training, and generating step t + 1 while step t trains (``train.async: {max_staleness: 1}``).
  With two GPUs the server takes the second; with one it shares it (30 % of its memory).
Columns: median seconds per step after 2 warm-up steps, generated (RLOO) or trained (DPO) tokens
per second, peak GPU memory (torch.cuda.max_memory_allocated). Put the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RESULT_PREFIX, TRL_PYTHON, ensure_assets, vllm_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2
GPU_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 512}
SMOKE_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}


def build_model(smoke: bool) -> Path:
    from transformers import AutoTokenizer

    from align.jobs.quickstart.corpus import atomic_dir, build_tiny_model

    name, shape = ("gpu_check_smoke", SMOKE_SHAPE) if smoke else ("gpu_check_100m", GPU_SHAPE)
    tokenizer = AutoTokenizer.from_pretrained(CACHE / "tokenizer")
    return atomic_dir(CACHE / name, lambda d: build_tiny_model(tokenizer, d, seed=0, **shape))


def rloo_recipe(
    model: Path, prompts: Path, steps: int, new_tokens: int, engine: str = "native", server_port: int | None = None
) -> dict:
    recipe = {
        "model": {"path": str(model)},
        "data": {"train": str(prompts)},
        "objective": {"name": "rloo", "k": 4, "beta": 0.05},
        "reward": [{"name": "length", "options": {"target": 10, "unit": "words"}}],
        "generation": {"max_new_tokens": new_tokens, "temperature": 1.0, "engine": engine},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-5, "lr_scheduler": "constant"},
        "output": {"report": False, "save_model": False, "sample_every": 0, "save_every": 0},
    }
    if server_port is not None:
        recipe["generation"]["vllm"] = {"mode": "server", "server_port": server_port}
    return recipe


def server_rows(model: Path, prompts: Path, steps: int, new_tokens: int, work: Path, launch: list[str]) -> dict:
    """RLOO against ``align vllm-serve``: synchronous, then fixed N = 1 (generation beside training)."""
    import torch

    two = torch.cuda.device_count() >= 2
    env = {"CUDA_VISIBLE_DEVICES": "1"} if two else {}
    extra = [] if two else ["--gpu-memory-utilization", "0.3"]
    rows = {}
    with vllm_server(model, extra, env) as port:
        recipe = rloo_recipe(model, prompts, steps, new_tokens, engine="vllm", server_port=port)
        rows["align rloo vllm server"] = run_align(recipe, work, launch)
        recipe["train"]["async"] = {"max_staleness": 1, "mode": "fixed"}
        rows["align rloo server async1"] = run_align(recipe, work, launch)
    return rows


def dpo_recipe(model: Path, pairs: Path, steps: int) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"train": str(pairs)},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"steps": steps, "batch_size": 16, "lr": 1e-5, "lr_scheduler": "constant"},
        "output": {"report": False, "save_model": False, "sample_every": 0, "save_every": 0},
    }


def run_align(recipe: dict, work: Path, launch: list[str]) -> dict:
    import yaml

    run = work / f"run-{len(list(work.iterdir()))}"
    recipe = {**recipe, "output": {**recipe["output"], "dir": str(run)}}
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "align.cli", "train", str(path)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = records[WARMUP:] or records
    step_s = statistics.median(r["step_s"] for r in steady)
    tokens = statistics.median(r.get("tokens", 0) for r in steady)
    return {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s if tokens else None,
        "peak_gib": max((r.get("gpu_peak_gib") or 0.0) for r in records) or None,
    }


def run_trl(worker: str, args: list[str], tokens_per_step: float | None, vllm: bool = False) -> dict | None:
    needs = "import trl, vllm" if vllm else "import trl"
    probe = subprocess.run([TRL_PYTHON, "-c", needs], capture_output=True) if Path(TRL_PYTHON).exists() else None
    if probe is None or probe.returncode != 0:
        return None
    env = {**os.environ, "BENCH_GPU": os.environ.get("BENCH_GPU", "1"), "BENCH_TRL_VLLM": "1" if vllm else "0"}
    done = subprocess.run(
        [TRL_PYTHON, str(ROOT / "benchmarks" / worker), *args], capture_output=True, text=True, env=env, check=True
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX) :])
    step_s = statistics.median(result["step_s"][WARMUP:] or result["step_s"])
    return {
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s if tokens_per_step else None,
        "peak_gib": result.get("peak_gib"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: checks the script itself")
    args = parser.parse_args(argv)
    smoke = args.smoke
    steps = 3 if smoke else args.steps
    new_tokens = 16 if smoke else 128
    if smoke:
        os.environ["BENCH_GPU"] = "0"
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
            return 2
    assets = ensure_assets()
    model = build_model(smoke)
    single = ["--config_file", str(ROOT / "launch" / ("cpu.yaml" if smoke else "single_gpu.yaml"))]
    fsdp = ["--config_file", str(ROOT / "launch" / "fsdp.yaml"), "--num_processes", "1"]
    rows: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows["align rloo"] = run_align(rloo_recipe(model, assets["prompts"], steps, new_tokens), work, single)
        rows["align dpo"] = run_align(dpo_recipe(model, assets["pairs"], steps), work, single)
        rloo_tokens = 16 * new_tokens  # 4 prompts × 4 completions × new_tokens (TRL forces min_new_tokens)
        trl_rloo = [str(model), str(assets["prompts"]), str(new_tokens), str(steps), "1e-5", str(work / "trl_rloo")]
        rows["trl rloo"] = run_trl("_trl_rloo_worker.py", trl_rloo, rloo_tokens)
        trl_dpo = ["time", str(model), str(assets["pairs"]), "sigmoid", str(steps), "1e-5", str(work / "trl_dpo"), "0"]
        rows["trl dpo"] = run_trl("_trl_dpo_worker.py", trl_dpo, None)
        if not smoke:
            rows["align rloo vllm"] = run_align(
                rloo_recipe(model, assets["prompts"], steps, new_tokens, engine="vllm"), work, single
            )
            rows["trl rloo vllm"] = run_trl("_trl_rloo_worker.py", trl_rloo, rloo_tokens, vllm=True)
            rows.update(server_rows(model, assets["prompts"], steps, new_tokens, work, single))
            rows["align rloo fsdp2 ws=1"] = run_align(
                rloo_recipe(model, assets["prompts"], steps, new_tokens), work, fsdp
            )
    print(f"\n{'run':<24} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9}")
    for name, row in rows.items():
        if row is None:
            print(f"{name:<24} {'(TRL not importable from ' + TRL_PYTHON + ')'}")
            continue
        tps = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] else "-"
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] else "-"
        print(f"{name:<24} {row['step_s']:>8.3f} {tps:>10} {peak:>9}")
    for objective in ("rloo", "dpo", "rloo vllm"):
        ours, theirs = rows.get(f"align {objective}"), rows.get(f"trl {objective}")
        if ours and theirs:
            print(f"ratio {objective}: TRL s/step / align s/step = {theirs['step_s'] / ours['step_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
