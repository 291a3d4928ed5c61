"""The machine's fp32 GEMM throughput: the ceiling every benchmark's FLOP fraction is measured against.

    .venv/bin/python benchmarks/peak.py [--size 2048] [--repeats 20] [--threads N]

A [n, n] × [n, n] fp32 matmul (2·n³ FLOPs) through torch (MKL / oneDNN on CPU, cuBLAS on a GPU),
warmed up, then the median of ``repeats`` timed calls. Other benchmarks call ``measure()`` in the
same run, so the ratio they print compares like with like on a noisy machine.

Last line: peak_gflops=<median GFLOP/s>.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def measure(size: int = 2048, repeats: int = 20, threads: int | None = None) -> float:
    """Median FLOP/s of an fp32 size × size matmul."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    peak = measure(args.size, args.repeats, args.threads)
    print(f"fp32 {args.size}² matmul, median of {args.repeats}")
    print(f"peak_gflops={peak / 1e9:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
