"""GEMM + fused epilogue: ``y = act(x @ w + b) (+ residual)``, one kernel for every linear of GPT-2.

Weights are in GPT-2's Conv1D layout: ``w`` is ``[K, N] = (in, out)``, row-major, so ``y = x @ w + b``.
The same kernel serves the QKV projection (no activation), the attention output projection and the
MLP down projection (residual epilogue) and the MLP up projection (gelu epilogue).

Accumulation is fp32; bias, activation and residual are applied in fp32 and the result is rounded
once to the output dtype. fp32 inputs use ``input_precision="ieee"`` (never tf32).

Tile configs come from a fixed table chosen by M (no autotuning), so the compile check can
enumerate every one:

- decode (M = batch, a handful of rows): the weight read dominates, so a small BLOCK_M and many
  programs over N, each streaming a [K, BLOCK_N] slab of the weight with a deep pipeline;
- prefill (M = tokens): 64x128 output tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .contract import ACTIVATIONS, DTYPES, CompileSpec, check_spec_dtype, kernel_signature
from .launch_checks import check_device, check_dtype



@dataclass(frozen=True)
class GemmConfig:
    name: str
    max_m: int | None  # the config serves M <= max_m (None: any M)
    block_m: int
    block_n: int
    block_k: int  # fp16 / bf16
    num_warps: int
    num_stages: int  # fp16 / bf16
    # fp32 (the ieee dot runs on FMA units, operands in registers): a shorter K tile or fewer stages
    # keep registers and shared memory in bounds (a 64x128x64 fp32 tile spills on sm_80)
    block_k_fp32: int
    num_stages_fp32: int

    def tiles(self, dtype: str) -> tuple[int, int]:
        """-> (BLOCK_K, num_stages) for "fp32", "fp16" or "bf16"."""
        return (self.block_k_fp32, self.num_stages_fp32) if dtype == "fp32" else (self.block_k, self.num_stages)


# Picked by M, first match. Shared memory per stage (16-bit) = (BM*BK + BK*BN) * 2 bytes; Triton
# keeps num_stages - 1 stages in flight (decode: 3 * 20 KiB, prefill: 2 * 24 KiB).
CONFIGS = (
    # M = batch (1..64): 16-row tiles, N split into 64-wide slabs so N/64 programs stream the weight,
    # BK=128 and 4 stages keep ~60 KiB of weight loads in flight per program. M in 17..64 runs
    # ceil(M/16) row blocks side by side (axis 0), which re-read each weight slab from L2, not DRAM.
    GemmConfig("decode", max_m=64, block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4,
               block_k_fp32=128, num_stages_fp32=2),
    # M = tokens: 64x128 tiles; 8 warps keep the fp32 accumulator plus the residual tile out of
    # local memory when the operands are not 16-byte aligned (4 warps spill there)
    GemmConfig("prefill", max_m=None, block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3,
               block_k_fp32=32, num_stages_fp32=3),
)


def pick_config(m: int) -> GemmConfig:
    for cfg in CONFIGS:
        if cfg.max_m is None or m <= cfg.max_m:
            return cfg
    raise AssertionError("the last config takes any M")


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    # y: fp32 tile; ACTIVATION is resolved at compile time
    if ACTIVATION == "gelu_tanh":
        # 0.5*y*(1 + tanh(u)) == y * sigmoid(2u), u = sqrt(2/pi) * (y + 0.044715 y^3)
        u2 = 1.5957691216057308 * (y + 0.044715 * y * y * y)  # 2 * sqrt(2/pi) * (...)
        y = y / (1.0 + tl.exp(-u2))
    elif ACTIVATION == "gelu_erf":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    else:
        tl.static_assert(ACTIVATION == "none", "unknown ACTIVATION")
    return y


@triton.jit(do_not_specialize=["M"])  # M (the batch in decode) varies; one binary for every M
def _linear_kernel(
    x_ptr,  # [M, K], row stride stride_xm, last dim contiguous
    w_ptr,  # [K, N], row stride stride_wk, last dim contiguous (Conv1D layout)
    b_ptr,  # [N]
    r_ptr,  # [M, N] residual, row stride stride_rm (unused when not HAS_RESIDUAL)
    y_ptr,  # [M, N] out, row stride stride_ym
    M: "tl.int32",
    N: "tl.int32",
    K: "tl.int32",
    stride_xm: "tl.int32",
    stride_wk: "tl.int32",
    stride_rm: "tl.int32",
    stride_ym: "tl.int32",
    ACTIVATION: tl.constexpr,  # one of ACTIVATIONS
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): axis 0 (fastest) runs over M, so programs launched
    # together share a weight slab [K, BLOCK_N] (read once from DRAM, then from L2)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] int64
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]  # [BK, BN]
    w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)  # int64 step per K tile (stride_wk may be a constexpr 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0  # [BK]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        # ieee: exact fp32 products for fp32 inputs (no tf32); fp16/bf16 products are exact anyway
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += w_step

    # epilogue, all fp32: bias, activation, residual, then one rounding
    bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
    y = _activation(acc + bias[None, :], ACTIVATION)
    mask_mn = mask_m[:, None] & mask_n[None, :]  # [BM, BN]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_mn, other=0.0)
        y += r.to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_mn)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that t's elements occupy."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def linear(x, w, b, *, activation="none", residual=None, out=None):
    """y = act(x @ w + b) (+ residual) -> out [M, N].

    x: [M, K]; w: [K, N] (Conv1D layout); b: [N]; residual, out: [M, N]. One dtype (fp32, fp16,
    bf16) and one device for all; last dims contiguous. out may be the residual tensor itself
    (an in-place residual add) but must not overlap x or w.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    for name, t, dim in (("x", x, 2), ("w", w, 2), ("b", b, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"linear: {name} must be a {dim}-D tensor, got {getattr(t, 'shape', type(t))}")
    check_dtype("linear", "x", x)
    m, k = x.shape
    if w.shape[0] != k:
        raise ValueError(f"linear: w has shape {tuple(w.shape)}, expected [K={k}, N] (Conv1D layout, x is {tuple(x.shape)})")
    n = w.shape[1]
    if tuple(b.shape) != (n,):
        raise ValueError(f"linear: b has shape {tuple(b.shape)}, expected ({n},)")
    tensors = {"x": x, "w": w, "b": b}
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (m, n):
            raise ValueError(f"linear: residual has shape {tuple(getattr(residual, 'shape', ()))}, expected ({m}, {n})")
        tensors["residual"] = residual
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, n):
            raise ValueError(f"linear: out has shape {tuple(getattr(out, 'shape', ()))}, expected ({m}, {n})")
        tensors["out"] = out
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise ValueError(f"linear: {name} is {t.dtype}, x is {x.dtype}; mixed dtypes are not supported")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"linear: {name} must have a contiguous last dim (strides {t.stride()})")
    check_device("linear", tensors, _linear_kernel)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif _overlap(out, x) or _overlap(out, w):
        raise ValueError("linear: out overlaps x or w (other programs still read them)")
    if m == 0 or n == 0:
        return out

    cfg = pick_config(m)
    block_k, num_stages = cfg.tiles(DTYPES[x.dtype])
    r = residual if residual is not None else out  # placeholder, never read without HAS_RESIDUAL
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _linear_kernel[grid](
        x, w, b, r, out,
        m, n, k,
        x.stride(0), w.stride(0), r.stride(0), out.stride(0),
        ACTIVATION=activation,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        num_warps=cfg.num_warps,
        num_stages=num_stages,
    )
    return out


def linear_ref(x, w, b, *, activation="none", residual=None):
    """Plain PyTorch in the input dtype: act(x @ w + b) (+ residual)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_ref: unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    y = ACTIVATIONS[activation](x @ w + b)
    return y if residual is None else y + residual


def compile_specs(dtype: str) -> list[CompileSpec]:
    """Every (config, ACTIVATION, HAS_RESIDUAL) the launcher can produce, for dtype "fp16" or "bf16"
    ("fp32" also works: the fp32 stage counts, and no tensor cores since the dot is ieee)."""
    check_spec_dtype(dtype)
    signature = kernel_signature(_linear_kernel, f"*{dtype}")
    specs = []
    for cfg in CONFIGS:
        block_k, num_stages = cfg.tiles(dtype)
        for activation in ACTIVATIONS:
            for has_res in (False, True):
                epilogue = activation + ("+residual" if has_res else "")
                specs.append(
                    CompileSpec(
                        name=f"linear.linear[{epilogue}] {cfg.name} BM={cfg.block_m} BN={cfg.block_n} BK={block_k}",
                        fn=_linear_kernel,
                        signature=dict(signature),
                        constexprs={
                            "ACTIVATION": activation, "HAS_RESIDUAL": has_res,
                            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": block_k,
                        },
                        num_warps=cfg.num_warps,
                        num_stages=num_stages,
                        uses_dot=dtype != "fp32",
                    )
                )
    return specs
