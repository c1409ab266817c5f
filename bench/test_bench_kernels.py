"""Each Triton kernel launcher vs the torch backend's op (TorchOps, what backend="torch" runs), on
GPT-2 shapes in fp16. CUDA only.

Every benchmark round runs the op `inner` times, cycling through enough input sets to move more
than 256 MB (so weights and activations come from HBM, not a warm L2), then synchronises; the
per-call figures in extra_info are the median round over `inner`:

- layernorm (residual add + layernorm) and the two MLP epilogues: effective GB/s, the bytes the op
  must move (each input read once, each output written once) over its time;
- prefill attention: TFLOP/s of the causal attention (2 * B * H * D * T * (T + 1) FLOPs);
- decode attention: µs per call (and the KV bytes read, as GB/s).

`pytest bench/ --benchmark-group-by=group` puts each triton/torch pair side by side; the end of the
run prints the triton-over-torch speedup of each pair.
"""
from __future__ import annotations

import pytest
import torch
from benchlib import NO_CUDA, OP_RESULTS, median_seconds, rotation

from fastgpt2.runtime.ops import TorchOps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)

DTYPE = torch.float16
ROUNDS = 20
IMPLS = ("triton", "torch")


def _timed(benchmark, group: str, impl: str, op, sets: list, inner: int = 32) -> float | None:
    """Seconds per call of op(*set), the median round of `inner` calls; None under --benchmark-disable."""
    benchmark.group = group
    n = len(sets)
    inner = max(inner, n)

    def body():
        for i in range(inner):
            op(*sets[i % n])
        torch.cuda.synchronize()

    body()  # compile and warm outside the timed rounds
    benchmark.pedantic(body, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median = median_seconds(benchmark)
    if median is None:
        return None
    seconds = median / inner
    OP_RESULTS.setdefault(group, {})[impl] = seconds
    benchmark.extra_info.update(impl=impl, us_per_call=round(seconds * 1e6, 3), input_sets=n)
    return seconds


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def _torch_ops(n_head: int | None = None) -> TorchOps:
    ops = TorchOps()
    ops.n_head = n_head
    return ops


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,n", [(8, 768), (4096, 768), (16384, 1600)])
def test_add_layer_norm(benchmark, impl, m, n):
    from fastgpt2.kernels.layernorm import add_layer_norm

    op = add_layer_norm if impl == "triton" else _torch_ops().layer_norm
    nbytes = (4 * m * n + 2 * n) * DTYPE.itemsize  # read x, residual, w, b; write y, s
    sets = rotation(lambda: (_rand(m, n), _rand(m, n), 1 + 0.1 * _rand(n), 0.1 * _rand(n), 1e-5), nbytes)
    seconds = _timed(benchmark, f"add_layer_norm M={m} N={n}", impl, op, sets)
    if seconds is not None:
        benchmark.extra_info["GB_per_s"] = round(nbytes / seconds / 1e9, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("epilogue", ["gelu", "residual"])
@pytest.mark.parametrize("m,e", [(1, 768), (8, 768), (32, 768), (2048, 768), (1, 1600), (32, 1600), (2048, 1600)])
def test_linear_epilogue(benchmark, impl, epilogue, m, e):
    """gelu: c_fc, y = gelu_tanh(x [M, E] @ w [E, 4E] + b); residual: mlp.c_proj, y = x [M, 4E] @ w [4E, E] + b + r."""
    from fastgpt2.kernels.linear import linear

    k, n = (e, 4 * e) if epilogue == "gelu" else (4 * e, e)
    extra = {"activation": "gelu_tanh"} if epilogue == "gelu" else {}
    if impl == "triton":
        op = lambda x, w, b, r: linear(x, w, b, residual=r, **extra)  # noqa: E731
    else:
        torch_linear = _torch_ops().linear
        op = lambda x, w, b, r: torch_linear(x, w, b, residual=r, **extra)  # noqa: E731
    has_residual = epilogue == "residual"
    nbytes = (m * k + k * n + n + m * n * (2 if has_residual else 1)) * DTYPE.itemsize
    sets = rotation(lambda: (_rand(m, k), 0.02 * _rand(k, n), _rand(n), _rand(m, n) if has_residual else None), nbytes)
    seconds = _timed(benchmark, f"linear+{epilogue} M={m} K={k} N={n}", impl, op, sets)
    if seconds is not None:
        benchmark.extra_info["GB_per_s"] = round(nbytes / seconds / 1e9, 1)
        benchmark.extra_info["TFLOP_per_s"] = round(2 * m * k * n / seconds / 1e12, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,t,h", [(8, 1024, 12), (1, 1024, 25), (32, 128, 12)])
def test_prefill_attention(benchmark, impl, b, t, h):
    from fastgpt2.kernels.attention import prefill_attention

    d = 64
    scale = d**-0.5
    if impl == "triton":
        op = lambda qkv, k, v, lens: prefill_attention(qkv, k, v, lens, scale)  # noqa: E731
    else:
        torch_attention = _torch_ops(h).prefill_attention
        op = lambda qkv, k, v, lens: torch_attention(qkv, k, v, lens, scale, False)  # noqa: E731
    lens = torch.full((b,), t, dtype=torch.int32, device="cuda")
    nbytes = (b * t * 3 * h * d + 2 * b * h * t * d + b * t * h * d) * DTYPE.itemsize
    sets = rotation(lambda: (_rand(b, t, 3 * h * d), torch.empty(b, h, t, d, device="cuda", dtype=DTYPE),
                             torch.empty(b, h, t, d, device="cuda", dtype=DTYPE), lens), nbytes)
    seconds = _timed(benchmark, f"prefill_attention B={b} T={t} H={h} D={d}", impl, op, sets)
    if seconds is not None:
        flops = 2 * b * h * d * t * (t + 1)  # QK^T and PV over the causal half (diagonal included)
        benchmark.extra_info["TFLOP_per_s"] = round(flops / seconds / 1e12, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,kv_len,h", [(1, 1024, 12), (8, 1024, 12), (32, 1024, 12), (8, 1024, 25), (32, 256, 12)])
def test_decode_attention(benchmark, impl, b, kv_len, h):
    """One new token per sequence over a cache of kv_len positions (its own K/V written at kv_len - 1)."""
    from fastgpt2.kernels.attention import decode_attention

    d, t_max = 64, 1024
    scale = d**-0.5
    if impl == "triton":
        op = lambda qkv, k, v, lens: decode_attention(qkv, k, v, lens, scale)  # noqa: E731
    else:
        torch_attention = _torch_ops(h).decode_attention
        op = lambda qkv, k, v, lens: torch_attention(qkv, k, v, lens, scale, False, kv_len)  # noqa: E731
    lens = torch.full((b,), kv_len - 1, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * b * h * kv_len * d * DTYPE.itemsize
    sets = rotation(lambda: (_rand(b, 1, 3 * h * d), _rand(b, h, t_max, d), _rand(b, h, t_max, d), lens), kv_bytes)
    seconds = _timed(benchmark, f"decode_attention B={b} kv_len={kv_len} H={h} D={d}", impl, op, sets)
    if seconds is not None:
        benchmark.extra_info["kv_GB_per_s"] = round(kv_bytes / seconds / 1e9, 1)
