"""``align vllm-serve MODEL``: a vLLM server for ``generation.vllm.mode: server`` (TRL's
``trl vllm-serve``), on devices the trainer does not use.

It is vLLM's own OpenAI-compatible server (``vllm.entrypoints.openai.api_server``, this process
replaced by it), started with what the trainer relies on: the RL endpoints (pause/resume, weight
reload, weight version: ``VLLM_SERVER_DEV_MODE=1``), the token-in token-out generate endpoint
(``--enable-scale-out``), log-probs after the temperature (``--logprobs-mode processed_logprobs``),
prefix caching (a prompt's k samples share its prefill) and eager mode on CPU. Anything after
``--`` goes to vLLM unchanged.

    align vllm-serve runs/sft/final --port 8000              # then, beside it:
    align train recipe.yaml generation.engine=vllm generation.vllm.mode=server generation.vllm.server_port=8000

On GPUs pick the server's devices with ``CUDA_VISIBLE_DEVICES`` and the trainer's the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from align.config import RecipeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="hub id or local path (the policy's starting weights)")
    parser.add_argument("--tokenizer", help="hub id or local path (default: MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU: fraction of its memory")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the server spans")
    parser.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs (CPU: always)")
    parser.add_argument("--cpu-kvcache-gib", type=int, default=1, help="vLLM's CPU build: KV cache size in GiB")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then arguments passed to vLLM unchanged")


def command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The server's command line and environment."""
    import torch

    on_gpu = torch.cuda.is_available()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args.model,
        "--tokenizer",
        args.tokenizer or args.model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--seed",
        "0",  # every request carries its own seed (align's sample key)
        "--logprobs-mode",
        "processed_logprobs",
        "--enable-prefix-caching",
        "--enable-scale-out",
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
    ]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager or (args.enforce_eager is None and not on_gpu):
        argv.append("--enforce-eager")
    if args.trust_remote_code:
        argv.append("--trust-remote-code")
    extra = list(args.vllm_args or [])
    argv += extra[1:] if extra[:1] == ["--"] else extra
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if not on_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.cpu_kvcache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # no pinning
    return argv, env


def main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("vllm") is None:
        from align.vllm_engine import INSTALL_HINT

        raise RecipeError(f"vllm-serve: vLLM is not installed ({INSTALL_HINT})")
    if not 0 < args.port < 65536:
        raise RecipeError(f"vllm-serve: --port must be between 1 and 65535, got {args.port}")
    argv, env = command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **env})  # the server replaces this process: signals reach it
    return 0  # not reached
