"""Residual add + LayerNorm: ``s = x + residual``, ``y = (s - mean) / sqrt(var + eps) * weight + bias``.

The same kernel also gathers its two inputs (GATHER): ``x = wte[ids]``, ``residual = wpe[positions]``,
so GPT-2's token + position embedding is fused into layer 0's ln_1 (``embed_layer_norm``). Positions
are ``start[b] + s`` for token s of sequence b, with ``start`` read on the device (the KV cache's
lengths in decode), or ``s`` when there is no start (prefill).

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

from .contract import CompileSpec, check_spec_dtype, kernel_signature
from .launch_checks import check_device, check_dtype, check_operand

# BLOCK_N -> num_warps. The launcher picks BLOCK_N = max(128, next_power_of_2(N)); this table is
# every config it can produce (compile_specs enumerates it). N <= 2048 covers GPT-2 (max 1600); a
# 4096-wide row with 8 warps spills to the stack on sm_90 when unaligned, so it is not offered.
_WARPS_BY_BLOCK_N = {128: 1, 256: 1, 512: 2, 1024: 4, 2048: 8}
MIN_BLOCK_N = min(_WARPS_BY_BLOCK_N)
MAX_N = max(_WARPS_BY_BLOCK_N)
_NUM_STAGES = 1  # no loop to pipeline



@triton.jit(do_not_specialize=["S"])  # S == 1 (decode) must not compile a variant the compile check never saw
def _add_layernorm_kernel(
    x_ptr,  # [M, N], row stride stride_x, last dim contiguous; GATHER: the table [V, N] (wte)
    r_ptr,  # [M, N] residual (unused when not HAS_RESIDUAL); GATHER: the table [P, N] (wpe)
    w_ptr,  # [N] weight
    b_ptr,  # [N] bias
    y_ptr,  # [M, N] out: the normalized row
    s_ptr,  # [M, N] out: x + residual (unused when not HAS_RESIDUAL)
    N: "tl.int32",  # row length
    stride_x: "tl.int32",
    stride_r: "tl.int32",
    stride_y: "tl.int32",
    stride_s: "tl.int32",
    eps: "tl.float32",
    ids_ptr,  # GATHER: [M] int64 token ids, row m is token m % S of sequence m // S
    start_ptr,  # GATHER and HAS_START: [M // S] int32 position of each sequence's first token
    S: "tl.int32",  # GATHER: tokens per sequence
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,  # power of two >= N
    GATHER: tl.constexpr,  # x and residual rows gathered by token id and position (needs HAS_RESIDUAL)
    HAS_START: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64 before any stride product
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask = cols < N
    x_row = row
    r_row = row
    if GATHER:
        x_row = tl.load(ids_ptr + row).to(tl.int64)  # token id
        r_row = row % S  # position within the step
        if HAS_START:
            r_row += tl.load(start_ptr + row // S).to(tl.int64)

    x = tl.load(x_ptr + x_row * stride_x + cols, mask=mask, other=0.0)  # [BLOCK_N], I/O dtype
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + r_row * stride_r + cols, mask=mask, other=0.0)
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


def add_layer_norm(x, residual, weight, bias, eps, *, out=None, residual_out=None):
    """y = layer_norm(s), s = x + residual (or x when residual is None). Returns (y, s).

    x, residual, out, residual_out: [M, N], last dim contiguous; weight, bias: [N]; all one dtype
    (fp32, fp16 or bf16) on one device. With residual=None, s is x itself (no copy) and
    residual_out must not be given.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"add_layer_norm: x must be a 2-D tensor [M, N], got {getattr(x, 'shape', type(x))}")
    check_dtype("add_layer_norm", "x", x)
    m, n = x.shape
    if n == 0 or n > MAX_N:
        raise ValueError(f"add_layer_norm: row length N={n} is not supported (1 <= N <= {MAX_N})")
    check_operand("add_layer_norm", "x", x, x.dtype)
    if residual is not None:
        check_operand("add_layer_norm", "residual", residual, x.dtype, shape=(m, n))
    elif residual_out is not None:
        raise ValueError("add_layer_norm: residual_out was given but residual is None (s would be x itself)")
    for name, t in (("weight", weight), ("bias", bias)):
        check_operand("add_layer_norm", name, t, x.dtype, shape=(n,))
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        check_operand("add_layer_norm", "out", out, x.dtype, shape=(m, n))
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            check_operand("add_layer_norm", "residual_out", residual_out, x.dtype, shape=(m, n))
    check_device("add_layer_norm", {"x": x, "residual": residual, "weight": weight, "bias": bias, "out": out,
                                    "residual_out": residual_out}, _add_layernorm_kernel)

    s = residual_out if residual is not None else x
    if m == 0:
        return out, s
    block_n = _block_n(n)
    r = residual if residual is not None else x  # placeholders, never touched without HAS_RESIDUAL
    _add_layernorm_kernel[(m,)](
        x, r, weight, bias, out, s,
        n, x.stride(0), r.stride(0), out.stride(0), s.stride(0),
        float(eps),
        x, x, 1,  # ids, start, S: unused without GATHER
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        GATHER=False,
        HAS_START=False,
        num_warps=_WARPS_BY_BLOCK_N[block_n],
        num_stages=_NUM_STAGES,
    )
    return out, s


def embed_layer_norm(ids, start, wte, wpe, weight, bias, eps, *, out=None, residual_out=None):
    """GPT-2's embedding fused into the first layernorm: h = wte[ids] + wpe[positions], y = layer_norm(h).
    Returns (y, h), both [B*S, N].

    ids: [B, S] int64 token ids (checked against the vocabulary by the caller); start: [B] int32 on
    the device (sequence b's tokens sit at positions start[b] .. start[b] + S - 1) or None (positions
    0 .. S-1); wte: [V, N]; wpe: [P, N]; weight, bias: [N]; one float dtype on one device. Positions
    must be < P (the caller's cache checks guarantee it).
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"embed_layer_norm: ids must be a [B, S] int64 tensor, got {getattr(ids, 'shape', type(ids))} "
                         f"{getattr(ids, 'dtype', '')}")
    b, seq = ids.shape
    check_dtype("embed_layer_norm", "wte", wte)
    for name, table in (("wte", wte), ("wpe", wpe)):
        if table.dim() != 2 or table.dtype != weight.dtype or table.stride(-1) != 1:
            raise ValueError(f"embed_layer_norm: {name} must be a 2-D {weight.dtype} table with a contiguous "
                             f"last dim, got shape {tuple(table.shape)} {table.dtype}")
    n = wte.shape[1]
    if wpe.shape[1] != n:
        raise ValueError(f"embed_layer_norm: wte has width {n}, wpe {wpe.shape[1]}; they must match")
    if not 0 < n <= MAX_N:
        raise ValueError(f"embed_layer_norm: row length N={n} is not supported (1 <= N <= {MAX_N})")
    if start is not None and (tuple(start.shape) != (b,) or start.dtype != torch.int32):
        raise ValueError(f"embed_layer_norm: start must be [B]={b} int32, got {tuple(start.shape)} {start.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_operand("embed_layer_norm", name, t, wte.dtype, "wte", shape=(n,))
    m = b * seq
    out = torch.empty((m, n), dtype=wte.dtype, device=wte.device) if out is None else out
    h = torch.empty((m, n), dtype=wte.dtype, device=wte.device) if residual_out is None else residual_out
    check_operand("embed_layer_norm", "out", out, wte.dtype, "wte", shape=(m, n))
    check_operand("embed_layer_norm", "residual_out", h, wte.dtype, "wte", shape=(m, n))
    ids = ids.contiguous()
    check_device("embed_layer_norm", {"ids": ids, "start": start, "wte": wte, "wpe": wpe, "weight": weight,
                                      "bias": bias, "out": out, "residual_out": h}, _add_layernorm_kernel)
    if m == 0:
        return out, h
    block_n = _block_n(n)
    _add_layernorm_kernel[(m,)](
        wte, wpe, weight, bias, out, h,
        n, wte.stride(0), wpe.stride(0), out.stride(0), h.stride(0),
        float(eps),
        ids, start if start is not None else ids, seq,
        HAS_RESIDUAL=True,
        BLOCK_N=block_n,
        GATHER=True,
        HAS_START=start is not None,
        num_warps=_WARPS_BY_BLOCK_N[block_n],
        num_stages=_NUM_STAGES,
    )
    return out, h


def embed_layer_norm_ref(ids, start, wte, wpe, weight, bias, eps):
    """Plain PyTorch, in the tables' dtype: (layer_norm(h), h), h = wte[ids] + wpe[positions]."""
    b, seq = ids.shape
    positions = torch.arange(seq, device=ids.device).expand(b, seq)
    if start is not None:
        positions = positions + start[:, None].long()
    h = (wte[ids] + wpe[positions]).reshape(b * seq, -1)
    return F.layer_norm(h, h.shape[-1:], weight, bias, eps), h


def add_layer_norm_ref(x, residual, weight, bias, eps):
    """Plain PyTorch, in the input dtype: (layer_norm(s), s) with s = x + residual (or x)."""
    s = x if residual is None else x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s


def compile_specs(dtype: str) -> list[CompileSpec]:
    """Every (BLOCK_N, HAS_RESIDUAL, GATHER, HAS_START) the launchers can produce, for dtype "fp16" or "bf16"."""
    check_spec_dtype(dtype)
    ptr = f"*{dtype}"
    specs = []
    # (launcher, HAS_RESIDUAL, GATHER, HAS_START): add_layer_norm without and with a residual;
    # embed_layer_norm for prefill (positions from 0) and decode (positions from the cache lengths)
    variants = [("add_layer_norm[no_residual]", False, False, False), ("add_layer_norm[residual]", True, False, False),
                ("embed_layer_norm[prefill]", True, True, False), ("embed_layer_norm[decode]", True, True, True)]
    for block_n, warps in _WARPS_BY_BLOCK_N.items():
        for label, has_res, gather, has_start in variants:
            # without GATHER, ids/start are placeholders the launcher fills with x; GATHER without
            # HAS_START fills start with ids
            signature = kernel_signature(_add_layernorm_kernel, ptr, {
                "ids_ptr": "*i64" if gather else ptr, "start_ptr": "*i32" if has_start else ("*i64" if gather else ptr)})
            specs.append(
                CompileSpec(
                    name=f"layernorm.{label} BLOCK_N={block_n}",
                    fn=_add_layernorm_kernel,
                    signature=signature,
                    constexprs={"HAS_RESIDUAL": has_res, "BLOCK_N": block_n, "GATHER": gather, "HAS_START": has_start},
                    num_warps=warps,
                    num_stages=_NUM_STAGES,
                    uses_dot=False,
                )
            )
    return specs
