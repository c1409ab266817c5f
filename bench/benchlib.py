"""Shared by the bench/ modules (imported by name: pytest puts bench/ on sys.path)."""
from __future__ import annotations

import math
import os

import torch

SMALL = os.environ.get("FASTGPT2_BENCH_SMALL", "") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NO_CUDA = "kernel benchmarks need a CUDA GPU (bench/ never times Triton kernels in the interpreter)"

# filled by the benchmarks, summarised by conftest.py at the end of the run:
DECODE_RESULTS: dict[str, dict[int, float]] = {}  # engine -> batch -> decode tok/s
OP_RESULTS: dict[str, dict[str, float]] = {}  # benchmark group -> impl ("triton", "torch") -> seconds per call


def median_seconds(benchmark) -> float | None:
    """The median round time of a finished benchmark (None under --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


def rotation(make, bytes_per_set: int, flush_bytes: int = 256 << 20, max_sets: int = 64) -> list:
    """Enough independent input sets (make() each) that cycling through them moves more than
    `flush_bytes`, so a timed loop reads from memory, not from a warm L2 (50 MB on an H100)."""
    return [make() for _ in range(min(max_sets, max(1, math.ceil(flush_bytes / max(1, bytes_per_set)))))]
