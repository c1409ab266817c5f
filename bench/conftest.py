"""The benchmark suite: `pytest bench/` (pytest-benchmark).

- test_bench_kernels.py: each Triton kernel launcher vs the torch backend's op (CUDA only; they
  skip with the reason elsewhere): GB/s, TFLOP/s and µs in each benchmark's extra_info.
- test_bench_decode.py: end-to-end decode tokens/sec, fastgpt2 vs transformers on the same weights
  (GPT-2 small; FASTGPT2_BENCH_SMALL=1 selects a tiny config, for CI).

Kernels are never timed in Triton's interpreter: TRITON_INTERPRET is cleared here, before anything
imports triton (tests/conftest.py sets it for the tests, and a subprocess inherits it).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from benchlib import DECODE_RESULTS, DEVICE, OP_RESULTS, SMALL  # noqa: E402

from fastgpt2.benchmark import machine_description  # noqa: E402


def pytest_report_header(config):
    size = "tiny config (FASTGPT2_BENCH_SMALL=1)" if SMALL else "GPT-2 small (FASTGPT2_BENCH_SMALL=1: a tiny config)"
    return [f"fastgpt2 bench: {machine_description(DEVICE)}; device {DEVICE}; torch {torch.__version__}; {size}"]


def pytest_terminal_summary(terminalreporter):
    pairs = {g: r for g, r in OP_RESULTS.items() if "triton" in r and "torch" in r}
    if pairs:
        terminalreporter.write_sep("-", "triton kernel vs torch op (median per call)")
        for group, r in pairs.items():
            terminalreporter.write_line(f"{group}: triton {r['triton'] * 1e6:,.1f} us, torch {r['torch'] * 1e6:,.1f} us: "
                                        f"{r['torch'] / r['triton']:.2f}x")
    ref = DECODE_RESULTS.get("transformers", {})
    lines = []
    for engine, by_batch in DECODE_RESULTS.items():
        if engine == "transformers":
            continue
        for batch, tok_s in sorted(by_batch.items()):
            if batch in ref:
                lines.append(f"{engine} batch {batch}: {tok_s:,.1f} tok/s vs transformers {ref[batch]:,.1f} tok/s: "
                             f"{tok_s / ref[batch]:.2f}x")
    if lines:
        terminalreporter.write_sep("-", f"decode speedup vs transformers (same weights, same session, {DEVICE})")
        for line in lines:
            terminalreporter.write_line(line)
