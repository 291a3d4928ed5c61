"""Shared pieces of the side-by-side benchmarks (run by hand, never in CI).

Assets, built once under ``benchmarks/.cache/`` (``ensure_assets``; needs the align venv):

* a byte-level BPE tokenizer with exactly 30,000 tokens. The quickstart review grammar alone
  has a few hundred distinct words, far too few for 30k merges, so the tokenizer is trained on
  the 4,000 generated reviews plus 60,000 pronounceable pseudo-words (2-4 random syllables):
  the BPE merges then fill the whole vocabulary and the LM head really is 30,000 × hidden;
* ``tiny``: GPT-2, 2 layers, 64 hidden, 2 heads (the issue's "2-layer GPT-2, 64 hidden, 30k
  vocab"), 24 new tokens; ``medium``: GPT-2, 4 layers, 256 hidden, 4 heads, 128 new tokens.
  Each also has a ``*_ref`` twin (same shape, another seed) for the DPO step-0 loss check,
  where a reference equal to the policy would make every loss log 2;
* ``prompts.jsonl`` (prompt) and ``pairs.jsonl`` (prompt, chosen, rejected) from
  ``align.jobs.quickstart.build_corpus``.

Both trainers run in their own interpreter (TRL lives in a side venv and is never a dependency
of align): ``ALIGN_PYTHON`` (default: the python running the benchmark) and ``TRL_PYTHON`` (default
/work/trl-venv/bin/python). Drivers alternate the two sides, run after run, and compare medians.

This module is imported by the TRL workers too, so it imports nothing from align at top level.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
ALIGN_PYTHON = os.environ.get("ALIGN_PYTHON", sys.executable)  # the python running the benchmark
TRL_PYTHON = os.environ.get("TRL_PYTHON", "/work/trl-venv/bin/python")

VOCAB_SIZE = 30_000
_SMALL = {"n_layer": 2, "n_embd": 64, "n_positions": 64, "new_tokens": 24}
_MEDIUM = {"n_layer": 4, "n_embd": 256, "n_positions": 256, "new_tokens": 128}
# Llama / Qwen2: rotary positions, RMSNorm, SwiGLU (intermediate 2·hidden), grouped KV heads
# (n_head / 2); Llama's head untied, Qwen2's tied to the embeddings, as the released models are
MODELS = {
    "tiny": {**_SMALL, "n_head": 2},
    "medium": {**_MEDIUM, "n_head": 4},
    "llama_small": {**_SMALL, "n_head": 4, "architecture": "llama"},
    "llama_medium": {**_MEDIUM, "n_head": 8, "architecture": "llama"},
    "qwen2_small": {**_SMALL, "n_head": 4, "architecture": "qwen2", "tie_word_embeddings": True},
    "qwen2_medium": {**_MEDIUM, "n_head": 8, "architecture": "qwen2", "tie_word_embeddings": True},
}
DPO_BETA = 0.1
LENGTH_TARGET = 10  # words: the reward both sides use, align's `length` reward (linear, no tolerance)
RESULT_PREFIX = "BENCH_RESULT "  # a worker's JSON line (TRL prints its own log dicts to stdout)
WARMUP_STEPS = 3  # per run, the first steps are left out of the timing


# --------------------------------------------------------------------------------------------
# assets


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(n)]
    return [" ".join(words[i : i + 12]) for i in range(0, n, 12)]


def _build_tokenizer(out: Path) -> None:
    from align.jobs.quickstart.corpus import generate_reviews, train_tokenizer

    tokenizer = train_tokenizer(generate_reviews(4000) + pseudo_words(60_000), out, vocab_size=VOCAB_SIZE)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")


def _build_model(out: Path, size: str, seed: int) -> None:
    from transformers import AutoTokenizer

    from align.jobs.quickstart.corpus import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(CACHE / "tokenizer")
    shape = {k: v for k, v in MODELS[size].items() if k != "new_tokens"}
    build_tiny_model(tokenizer, out, seed=seed, **shape)


def ensure_assets() -> dict[str, Path]:
    """Build (once) and return the paths: prompts, pairs, tokenizer, tiny, tiny_ref, medium, medium_ref."""
    from align.jobs.quickstart.corpus import atomic_dir, build_corpus

    corpus = build_corpus(CACHE / "corpus")
    paths = {"prompts": corpus["prompts"], "pairs": corpus["pairs"]}
    paths["tokenizer"] = atomic_dir(CACHE / "tokenizer", _build_tokenizer)
    for size in MODELS:
        paths[size] = atomic_dir(CACHE / size, lambda d, s=size: _build_model(d, s, seed=0))
        paths[f"{size}_ref"] = atomic_dir(CACHE / f"{size}_ref", lambda d, s=size: _build_model(d, s, seed=1))
    return paths


# --------------------------------------------------------------------------------------------
# the reward both sides use


def length_reward(completions: list[str]) -> list[float]:
    """−|words − 10|: align's ``length`` reward with target 10 words, written out for TRL."""
    return [0.0 - abs(len(text.split()) - LENGTH_TARGET) for text in completions]


# --------------------------------------------------------------------------------------------
# running the sides

CPU_CLOCK = BENCH / "_cpu_clock.py"
# what align.allocator sets in-process (mallopt), as glibc's environment variables: --same-allocator
# gives the other side (TRL, the bare loop) the same allocator behaviour
TUNED_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@dataclass
class Timing:
    """How both sides are run and clocked (the defaults: wall clock, torch's own thread count).

    ``threads``: OMP_NUM_THREADS for every side. ``cpu_time``: each side's step timer reads
    its process's CPU time instead of the wall clock (``_cpu_clock.py``), so a run is not
    charged for time other jobs on the machine took from it. Use it with ``threads=1``: with
    more threads the CPU time also counts the threads' spinning at every parallel region.
    """

    threads: int | None = None
    cpu_time: bool = False

    def env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}

    def wrap(self, argv: list[str]) -> list[str]:
        """``[python, script, ...]`` run with the CPU clock when asked."""
        return [argv[0], str(CPU_CLOCK), *argv[1:]] if self.cpu_time else argv

    def describe(self) -> str:
        threads = f"OMP_NUM_THREADS={self.threads}" if self.threads else "default threads"
        return f"{threads}, {'CPU time' if self.cpu_time else 'wall clock'}"


def add_comparison_args(parser, other: str) -> None:
    """The arguments every side-by-side script takes; ``other`` names the side align is compared with."""
    parser.add_argument("--medium", action="store_true", help="4 layers, 256 hidden (RLOO: 128 new tokens)")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default=None, help="a benchmark model by name (overrides --medium)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--same-allocator", action="store_true", help=f"{other} with align's glibc allocator settings")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time steps in process CPU seconds (with --threads 1: load-proof)"
    )


def model_name(args) -> str:
    return args.model or ("medium" if args.medium else "tiny")


def step_shape(model_dir: Path):
    """The model's shapes for benchmarks/flops.py (needs transformers: the align venv)."""
    from flops import Shape
    from transformers import AutoConfig

    return Shape.of(AutoConfig.from_pretrained(model_dir))


def padded_prompt_tokens(prompts: Path, model_dir: Path, per_batch: int) -> float:
    """The prompt width the kernels compute on: the mean over batches of ``per_batch`` prompts
    (file order) of the longest prompt's tokens, left padding included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines() if line.strip()]
    lengths = [len(tokenizer(p)["input_ids"]) for p in rows[: 64 * per_batch]]
    widths = [max(lengths[i : i + per_batch]) for i in range(0, len(lengths) - per_batch + 1, per_batch)]
    return statistics.fmean(widths)


def padded_pair_tokens(pairs: Path, model_dir: Path, per_batch: int) -> tuple[float, float]:
    """DPO batches of ``per_batch`` pairs (file order): the mean padded sequence width (longest
    prompt + longest completion of the batch) and the mean real completion tokens per row."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()][: 32 * per_batch]
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    widths, completions = [], []
    for i in range(0, len(rows) - per_batch + 1, per_batch):
        batch = rows[i : i + per_batch]
        prompt = max(count(r["prompt"]) for r in batch)
        sides = [count(r[side]) + 1 for r in batch for side in ("chosen", "rejected")]  # + EOS
        widths.append(prompt + max(sides))
        completions.append(statistics.fmean(sides))
    return statistics.fmean(widths), statistics.fmean(completions)


def flops_line(label: str, parts: dict[str, int], seconds: float, peak_flops: float) -> str:
    from flops import describe

    return f"{label:6s} {describe(parts, seconds, peak_flops)}"


def timing_from(args) -> Timing:
    return Timing(threads=args.threads, cpu_time=args.cpu_time)


def run_process(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """Run a command to the end; returns its stdout, its peak RSS in MiB and its wall seconds.

    ``os.wait4`` reaps the child with its own resource usage, so the peak RSS is that process's
    alone (not the maximum over every child this driver has started). ``env`` is added to ours.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.stderr.write(stderr[-4000:])
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited with {proc.returncode}")
    return stdout, usage.ru_maxrss / 1024, wall


def run_json(argv: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run a worker; returns the JSON object on its last stdout line and its peak RSS in MiB."""
    stdout, rss, _ = run_process(argv, env)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"{' '.join(argv[:3])} ... printed no {RESULT_PREFIX!r} line")
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), rss


def write_recipe(recipe: dict, workdir: Path) -> tuple[Path, Path]:
    """Write ``recipe`` with a fresh run directory under ``workdir``; returns (yaml path, run dir)."""
    import yaml

    run = workdir / f"run-{time.monotonic_ns()}"
    recipe = {**recipe, "output": {**recipe.get("output", {}), "dir": str(run)}}
    path = workdir / f"recipe-{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, run


def run_align(recipe: dict, workdir: Path, timing: Timing | None = None) -> dict:
    """``align train`` on ``recipe`` (written to ``workdir``); per-step ``step_s`` from metrics.jsonl."""
    timing = timing or Timing()
    path, run = write_recipe(recipe, workdir)
    if timing.cpu_time:
        argv = [ALIGN_PYTHON, str(CPU_CLOCK), "-m", "align.cli", "train", str(path)]
    else:
        argv = [str(Path(ALIGN_PYTHON).parent / "align"), "train", str(path)]
    _, rss, wall = run_process(argv, timing.env())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "step_s": [r["step_s"] for r in records],
        "loss": [r.get("loss") for r in records],
        "completion_length": [r.get("completion_length") for r in records],
        "wall_s": wall,
        "peak_rss_mib": rss,
        "records": records,
    }


def steady(step_seconds: list[float]) -> float:
    """Median seconds per step after the warm-up steps."""
    kept = step_seconds[WARMUP_STEPS:] or step_seconds
    return statistics.median(kept)


def alternate(sides: dict[str, Callable[[int], float]], rounds: int, log=print) -> dict[str, list[float]]:
    """Call each side once per round, the order flipped every round; returns each side's values."""
    names = list(sides)
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            value = sides[name](r)
            values[name].append(value)
            log(f"  round {r + 1}/{rounds}  {name:<24} {value:.4f} s/step")
    return values


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


@contextlib.contextmanager
def vllm_server(model_dir: Path, extra: list[str], env: dict[str, str]):
    """``align vllm-serve MODEL`` (this python needs vLLM) on a free port, up until the block ends;
    yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "align.cli", "vllm-serve", str(model_dir), "--port", str(port), *extra]
    env = {**os.environ, **env, "VLLM_LOGGING_LEVEL": "WARNING"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen(cmd, env=env, start_new_session=True, **quiet)
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            if server.poll() is not None:
                raise SystemExit("the vLLM server did not start (is vLLM installed in this python?)")
            time.sleep(1)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
