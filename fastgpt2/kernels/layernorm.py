"""Residual add + LayerNorm: ``s = x + residual``, ``y = (s - mean) / sqrt(var + eps) * weight + bias``.

One program per row; the whole row lives in registers (``BLOCK_N = next_power_of_2(N)``, at least
128, masked), so any width up to ``MAX_N`` works, the GPT-2 ones included (768, 1024, 1280, 1600).
Statistics (mean, biased variance) are fp32 whatever the I/O dtype (fp32 / fp16 / bf16). The sum
``s`` is rounded to the I/O dtype and stored, and ``y`` is computed from that stored value, which is
what PyTorch's ``F.layer_norm(x + residual)`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .spec import CompileSpec

# BLOCK_N -> num_warps. The launcher picks BLOCK_N = max(128, next_power_of_2(N)); this table is
# every config it can produce (compile_specs enumerates it). N <= 2048 covers GPT-2 (max 1600); a
# 4096-wide row with 8 warps spills to the stack on sm_90 when unaligned, so it is not offered.
_WARPS_BY_BLOCK_N = {128: 1, 256: 1, 512: 2, 1024: 4, 2048: 8}
MIN_BLOCK_N = min(_WARPS_BY_BLOCK_N)
MAX_N = max(_WARPS_BY_BLOCK_N)
_NUM_STAGES = 1  # no loop to pipeline

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _add_layernorm_kernel(
    x_ptr,  # [M, N], row stride stride_x, last dim contiguous
    r_ptr,  # [M, N] residual (unused when not HAS_RESIDUAL)
    w_ptr,  # [N] weight
    b_ptr,  # [N] bias
    y_ptr,  # [M, N] out: the normalized row
    s_ptr,  # [M, N] out: x + residual (unused when not HAS_RESIDUAL)
    N,  # row length (i32)
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    eps,  # fp32
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64 before any stride product
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask = cols < N

    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)  # [BLOCK_N], I/O dtype
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # the sum in fp32, rounded once to the I/O dtype (as PyTorch's x + residual), then stored
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
    else:
        s = x
    s32 = s.to(tl.float32)  # statistics from the stored (rounded) s

    mean = tl.sum(s32, axis=0) / N  # scalar fp32 (masked lanes hold 0)
    d = tl.where(mask, s32 - mean, 0.0)  # [BLOCK_N]
    var = tl.sum(d * d, axis=0) / N  # biased variance, two-pass on the registers
    rstd = tl.rsqrt(var + eps)

    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _block_n(n: int) -> int:
    return max(MIN_BLOCK_N, triton.next_power_of_2(n))


def _interpreted() -> bool:
    # triton.jit returns an InterpretedFunction instead of a JITFunction under TRITON_INTERPRET=1
    return not isinstance(_add_layernorm_kernel, triton.runtime.JITFunction)


def _check_device(tensors: dict) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"add_layer_norm: tensors on different devices: {devices}")
    if first.type != "cuda" and not (first.type == "cpu" and _interpreted()):
        raise ValueError(
            f"add_layer_norm: tensors are on {first}; the Triton kernel runs on CUDA "
            "(or on the CPU only under TRITON_INTERPRET=1)"
        )
    return first


def _check_rows(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"add_layer_norm: {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        raise ValueError(f"add_layer_norm: {name} is {t.dtype}, x is {dtype}; mixed dtypes are not supported")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"add_layer_norm: {name} must have a contiguous last dim (strides {t.stride()})")


def add_layer_norm(x, residual, weight, bias, eps, *, out=None, residual_out=None):
    """y = layer_norm(s), s = x + residual (or x when residual is None). Returns (y, s).

    x, residual, out, residual_out: [M, N], last dim contiguous; weight, bias: [N]; all one dtype
    (fp32, fp16 or bf16) on one device. With residual=None, s is x itself (no copy) and
    residual_out must not be given.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"add_layer_norm: x must be a 2-D tensor [M, N], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"add_layer_norm: dtype {x.dtype} is not supported; use one of {list(_DTYPES)}")
    m, n = x.shape
    if n == 0 or n > MAX_N:
        raise ValueError(f"add_layer_norm: row length N={n} is not supported (1 <= N <= {MAX_N})")
    _check_rows("x", x, (m, n), x.dtype)
    if residual is not None:
        _check_rows("residual", residual, (m, n), x.dtype)
    elif residual_out is not None:
        raise ValueError("add_layer_norm: residual_out was given but residual is None (s would be x itself)")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"add_layer_norm: {name} has shape {tuple(t.shape)}, expected ({n},)")
        if t.dtype != x.dtype:
            raise ValueError(f"add_layer_norm: {name} is {t.dtype}, x is {x.dtype}; mixed dtypes are not supported")
        if n > 1 and t.stride(0) != 1:
            raise ValueError(f"add_layer_norm: {name} must be contiguous")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        _check_rows("out", out, (m, n), x.dtype)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            _check_rows("residual_out", residual_out, (m, n), x.dtype)
    tensors = {"x": x, "weight": weight, "bias": bias, "out": out}
    if residual is not None:
        tensors.update(residual=residual, residual_out=residual_out)
    _check_device(tensors)

    s = residual_out if residual is not None else x
    if m == 0:
        return out, s
    block_n = _block_n(n)
    r = residual if residual is not None else x  # placeholders, never touched without HAS_RESIDUAL
    _add_layernorm_kernel[(m,)](
        x, r, weight, bias, out, s,
        n, x.stride(0), r.stride(0), out.stride(0), s.stride(0),
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        num_warps=_WARPS_BY_BLOCK_N[block_n],
        num_stages=_NUM_STAGES,
    )
    return out, s


def add_layer_norm_ref(x, residual, weight, bias, eps):
    """Plain PyTorch, in the input dtype: (layer_norm(s), s) with s = x + residual (or x)."""
    s = x if residual is None else x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s


def compile_specs(dtype: str) -> list[CompileSpec]:
    """Every (BLOCK_N, HAS_RESIDUAL) the launcher can produce, for dtype "fp16" or "bf16"."""
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"compile_specs: dtype {dtype!r} is not one of 'fp16', 'bf16', 'fp32'")
    ptr = f"*{dtype}"
    specs = []
    for block_n, warps in _WARPS_BY_BLOCK_N.items():
        for has_res in (False, True):
            signature = {
                "x_ptr": ptr, "r_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "s_ptr": ptr,
                "N": "i32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "stride_s": "i32",
                "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK_N": "constexpr",
            }
            specs.append(
                CompileSpec(
                    name=f"layernorm.add_layer_norm[{'residual' if has_res else 'no_residual'}] BLOCK_N={block_n}",
                    fn=_add_layernorm_kernel,
                    signature=signature,
                    constexprs={"HAS_RESIDUAL": has_res, "BLOCK_N": block_n},
                    num_warps=warps,
                    num_stages=_NUM_STAGES,
                    uses_dot=False,
                )
            )
    return specs
