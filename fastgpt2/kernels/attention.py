"""Causal self-attention over a preallocated KV cache: prefill (flash-attention style) and decode
(flash-decoding: the key axis split over programs; the last split of a head to finish combines them).

Layouts (per layer):
  qkv      [B, T or S, 3*H*D]  output of the fused QKV GEMM, contiguous; columns [0,HD) = q,
                               [HD,2HD) = k, [2HD,3HD) = v; head h owns h*D .. h*D+D-1 in each.
                               The kernels read q, k and v as three [B, H, T, D] strided views, so
                               the same kernels also take separate tensors (the ``*_separate``
                               launchers: transformers' own cache, read and never written).
  k_cache  [Bmax, H, Tmax, D]  a view of the model's [L, Bmax, H, Tmax, D] cache; last dim contiguous.
  v_cache  [Bmax, H, Tmax, D]  same.
  out      [B, T or S, H*D]    last dim contiguous.

Scores and softmax are computed in fp32 (base-2 exponent, log2(e) folded into the scale). For fp32
inputs every tl.dot uses input_precision="ieee" (no tf32). Configs come from small fixed tables
(by head_dim and dtype, no autotuning) so that ``compile_specs`` can list every one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .contract import (HEAD_DIMS, MAX_DECODE_TOKENS, CompileSpec, causal_visible, check_spec_dtype, kernel_signature,
                       split_heads)
from .launch_checks import check_device, check_dtype, check_operand, pdl_launch_options

_DECODE_BLOCK_S = 16  # query rows per decode program: S padded to tl.dot's minimum M


# --------------------------------------------------------------------------------------------
# Config tables: (dtype kind, head_dim) -> config. "half" = fp16 and bf16 (compile-checked);
# "fp32" uses smaller tiles: IEEE fp32 dots run on FMA units and hold their tiles in registers.
# Every entry compiles for sm_80 and sm_90 without local-memory spills.
# --------------------------------------------------------------------------------------------
# prefill: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M must be a multiple of BLOCK_N.
_PREFILL_CONFIGS = {
    ("half", 32): (64, 64, 4, 3),
    ("half", 64): (128, 64, 8, 3),
    ("half", 128): (128, 32, 8, 3),
    ("fp32", 32): (32, 32, 4, 2),
    ("fp32", 64): (32, 32, 4, 2),
    ("fp32", 128): (32, 16, 4, 2),
}
# decode split kernel: (BLOCK_N, num_warps, num_stages)
_DECODE_CONFIGS = {
    ("half", 32): (64, 4, 3),
    ("half", 64): (64, 4, 3),
    ("half", 128): (64, 4, 3),
    ("fp32", 32): (32, 8, 2),
    ("fp32", 64): (32, 8, 2),
    ("fp32", 128): (32, 8, 2),
}

# num_splits heuristic: aim for about this many decode programs per sequence, but keep at least
# _MIN_KEYS_PER_SPLIT cache positions (of Tmax) per split, and at most _MAX_SPLITS splits.
_TARGET_PROGRAMS = 256
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 32


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
def _jit_exact(fn):
    """@triton.jit without value or alignment specialisation of the runtime arguments, so the kernel
    that runs is exactly the one ``compile_specs`` lists (no extra variants for S == 1, H == 1,
    num_splits == 1, ...). Alignment comes from explicit tl.multiple_of hints instead, which the
    launchers back with checks (16-byte aligned base pointers, strides multiples of 16 elements)."""
    runtime = [name for name, prm in inspect.signature(fn).parameters.items()
               if "constexpr" not in str(prm.annotation)]
    return triton.jit(fn, do_not_specialize=runtime, do_not_specialize_on_alignment=runtime)


@triton.jit
def _mma(a, b, acc, FP32_IEEE: tl.constexpr):
    # acc += a @ b. fp32 operands: exact IEEE products (no tf32); fp16/bf16: the default.
    if FP32_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, FP32_IEEE: tl.constexpr):
    """One key block of the online softmax: s [R, N] scores in log2 units (masked ones -inf, at
    least one finite per row over the blocks so far), v [N, D]; m_i / l_i [R] the running max and
    sum, acc [R, D] the unnormalised output. Returns the updated (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], FP32_IEEE)
    return m_new, l_i, acc


@triton.jit
def _tile_offsets(rows, stride, HEAD_DIM: tl.constexpr):
    # rows [R] -> element offsets [R, D] of rows*stride + d, in int64. The launchers check that every
    # stride is a multiple of 16 elements; the hint lets the loads vectorise and pipeline.
    r = tl.multiple_of(rows.to(tl.int64) * stride, 16)  # [R]
    return r[:, None] + tl.arange(0, HEAD_DIM)[None, :]


@_jit_exact
def _prefill_attn_kernel(
    q_ptr,  # [B, H, T, D] (strided view)
    k_ptr,  # [B, H, T, D] (strided view)
    v_ptr,  # [B, H, T, D] (strided view)
    k_cache_ptr,  # [Bmax, H, Tmax, D]  (written when WRITE_KV)
    v_cache_ptr,  # [Bmax, H, Tmax, D]
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, T, H*D]
    scale: "tl.float32",
    T: "tl.int32",
    H: "tl.int32",
    stride_q_b: "tl.int64",
    stride_q_h: "tl.int64",
    stride_q_t: "tl.int64",
    stride_k_b: "tl.int64",
    stride_k_h: "tl.int64",
    stride_k_t: "tl.int64",
    stride_v_b: "tl.int64",
    stride_v_h: "tl.int64",
    stride_v_t: "tl.int64",
    stride_kc_b: "tl.int64",
    stride_kc_h: "tl.int64",
    stride_kc_t: "tl.int64",
    stride_vc_b: "tl.int64",
    stride_vc_h: "tl.int64",
    stride_vc_t: "tl.int64",
    stride_o_b: "tl.int64",
    stride_o_t: "tl.int64",
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_KV: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):
    # grid: (B*H, cdiv(T, BLOCK_M)) (B*H on axis 0, which has no 65535 limit); axis 1 runs the
    # query tiles last-first, so the heaviest causal tiles are scheduled first.
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), T)  # scalar int32; clamped against bad input

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BM] query positions
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    # base pointers of (b, h, position 0); all 16-byte aligned (checked by the launcher)
    q_base = tl.multiple_of(q_ptr + b * stride_q_b + h * stride_q_h, 16)
    k_base = tl.multiple_of(k_ptr + b * stride_k_b + h * stride_k_h, 16)
    v_base = tl.multiple_of(v_ptr + b * stride_v_b + h * stride_v_h, 16)
    kc_base = tl.multiple_of(k_cache_ptr + b * stride_kc_b + h * stride_kc_h, 16)
    vc_base = tl.multiple_of(v_cache_ptr + b * stride_vc_b + h * stride_vc_h, 16)
    o_base = tl.multiple_of(out_ptr + b * stride_o_b + h * HEAD_DIM, 16)
    out_ptrs = o_base + _tile_offsets(offs_m, stride_o_t, HEAD_DIM)  # [BM, D]
    in_t = offs_m[:, None] < T  # [BM, 1]

    if m0 >= seq_len:
        # the whole tile is right padding: zeros, no attention, no cache write
        tl.store(out_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=out_ptr.dtype.element_ty), mask=in_t)
    else:
        row_ok = offs_m < seq_len  # [BM]
        q = tl.load(q_base + _tile_offsets(offs_m, stride_q_t, HEAD_DIM),
                    mask=row_ok[:, None], other=0.0)  # [BM, D]
        qk_scale = scale * 1.4426950408889634  # scores in log2 units
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max  [BM]
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum  [BM]
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # [BM, D]

        # 0) WRITE_KV: this tile's own tokens [m0, min(m0 + BM, len)) go to the cache. Attention
        #    reads K/V only from k/v, so no program of this launch reads what another writes. (A
        #    separate copy loop keeps the attention loops free of stores, so their loads stay async.)
        hi = tl.minimum(m0 + BLOCK_M, seq_len)
        if WRITE_KV:
            for n0 in range(m0, hi, BLOCK_N):
                offs_kn = n0 + offs_n  # [BN]
                kv_ok = offs_kn[:, None] < seq_len  # [BN, 1]
                k = tl.load(k_base + _tile_offsets(offs_kn, stride_k_t, HEAD_DIM), mask=kv_ok)
                v = tl.load(v_base + _tile_offsets(offs_kn, stride_v_t, HEAD_DIM), mask=kv_ok)
                tl.store(kc_base + _tile_offsets(offs_kn, stride_kc_t, HEAD_DIM), k, mask=kv_ok)
                tl.store(vc_base + _tile_offsets(offs_kn, stride_vc_t, HEAD_DIM), v, mask=kv_ok)

        # 1) keys [0, m0): strictly before this tile, all real and visible: no masks.
        for n0 in range(0, m0, BLOCK_N):
            k = tl.load(k_base + _tile_offsets(n0 + offs_n, stride_k_t, HEAD_DIM))  # [BN, D]
            v = tl.load(v_base + _tile_offsets(n0 + offs_n, stride_v_t, HEAD_DIM))  # [BN, D]
            s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_IEEE)
            s = s * qk_scale  # [BM, BN]
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_IEEE)

        # 2) keys [m0, min(m0 + BM, len)): the diagonal blocks, causally masked.
        for n0 in range(m0, hi, BLOCK_N):
            offs_kn = n0 + offs_n  # [BN]
            kv_ok = offs_kn < seq_len  # [BN]
            k = tl.load(k_base + _tile_offsets(offs_kn, stride_k_t, HEAD_DIM), mask=kv_ok[:, None], other=0.0)  # [BN, D]
            v = tl.load(v_base + _tile_offsets(offs_kn, stride_v_t, HEAD_DIM), mask=kv_ok[:, None], other=0.0)  # [BN, D]
            s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_IEEE)
            visible = (offs_kn[None, :] <= offs_m[:, None]) & kv_ok[None, :]  # [BM, BN]
            s = tl.where(visible, s * qk_scale, float("-inf"))
            # every row sees key m0 <= its own position in the first diagonal block, so m_new is finite
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_IEEE)

        o = acc / l_i[:, None]
        o = tl.where(row_ok[:, None], o, 0.0)  # padding rows are 0
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=in_t)


@_jit_exact
def _decode_attn_kernel(
    q_ptr,  # [B, H, S, D] (strided view)
    k_new_ptr,  # [B, H, S, D] (strided view): the S new keys
    v_new_ptr,  # [B, H, S, D] (strided view)
    k_cache_ptr,  # [Bmax, H, Tmax, D]
    v_cache_ptr,  # [Bmax, H, Tmax, D]
    cache_lens_ptr,  # [B] int32: tokens in the cache before this step
    kv_start_ptr,  # [B] int32: first cached key each sequence sees (read when HAS_KV_START)
    out_ptr,  # [B, S, H*D]              (written when WRITE_OUT)
    part_m_ptr,  # [B*H, num_splits, S]     fp32 running max, log2 units (when not WRITE_OUT)
    part_l_ptr,  # [B*H, num_splits, S]     fp32 running sum
    part_acc_ptr,  # [B*H, num_splits, S, D]  fp32 unnormalised output
    count_ptr,  # [B*H] int32 arrival counters, zero before and after every launch (when not WRITE_OUT)
    scale: "tl.float32",
    S: "tl.int32",
    H: "tl.int32",
    Tmax: "tl.int32",
    num_splits: "tl.int32",
    stride_q_b: "tl.int64",
    stride_q_h: "tl.int64",
    stride_q_s: "tl.int64",
    stride_kn_b: "tl.int64",
    stride_kn_h: "tl.int64",
    stride_kn_s: "tl.int64",
    stride_vn_b: "tl.int64",
    stride_vn_h: "tl.int64",
    stride_vn_s: "tl.int64",
    stride_kc_b: "tl.int64",
    stride_kc_h: "tl.int64",
    stride_kc_t: "tl.int64",
    stride_vc_b: "tl.int64",
    stride_vc_h: "tl.int64",
    stride_vc_t: "tl.int64",
    stride_o_b: "tl.int64",
    stride_o_s: "tl.int64",
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WRITE_KV: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (sm_90+)
):
    if USE_PDL:  # may start before the previous kernel ends: nothing is read or written before the wait
        tl.extra.cuda.gdc_wait()  # the previous kernel has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled now (it waits in turn)
    # grid: (B*H, num_splits). Split `split` covers one chunk of the cached keys [K0, L) (K0 = 0, or
    # kv_start[b] when HAS_KV_START: a left-padded sequence's padding is never read); the last
    # split also covers the S new keys, read from k_new/v_new, and (WRITE_KV) is the only program
    # writing them to the cache (at L .. L+S-1, which no program of this launch reads from the cache).
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(cache_lens_ptr + b), 0), Tmax)  # scalar int32 in [0, Tmax], read on the device

    offs_s = tl.arange(0, BLOCK_S)  # [BS] query rows (and new-key rows)
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    s_ok = offs_s < S  # [BS]
    q_base = tl.multiple_of(q_ptr + b * stride_q_b + h * stride_q_h, 16)  # 16-byte aligned (launcher-checked)
    q = tl.load(q_base + _tile_offsets(offs_s, stride_q_s, HEAD_DIM), mask=s_ok[:, None], other=0.0)  # [BS, D]
    kc_base = tl.multiple_of(k_cache_ptr + b * stride_kc_b + h * stride_kc_h, 16)
    vc_base = tl.multiple_of(v_cache_ptr + b * stride_vc_b + h * stride_vc_h, 16)

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)  # [BS]
    l_i = tl.zeros([BLOCK_S], dtype=tl.float32)  # [BS]
    acc = tl.zeros([BLOCK_S, HEAD_DIM], dtype=tl.float32)  # [BS, D]

    if HAS_KV_START:
        k0 = tl.minimum(tl.maximum(tl.load(kv_start_ptr + b), 0), L)  # scalar int32, clamped to [0, L]
    else:
        k0 = 0
    # this split's chunk of cached keys, a multiple of BLOCK_N (empty for trailing splits of short caches)
    chunk = tl.cdiv(tl.cdiv(L - k0, num_splits), BLOCK_N) * BLOCK_N
    start = k0 + split * chunk
    end = tl.minimum(start + chunk, L)
    for n0 in range(start, end, BLOCK_N):
        offs_kn = n0 + offs_n  # [BN]
        kv_ok = offs_kn < end  # [BN]
        k = tl.load(kc_base + _tile_offsets(offs_kn, stride_kc_t, HEAD_DIM), mask=kv_ok[:, None], other=0.0)  # [BN, D]
        v = tl.load(vc_base + _tile_offsets(offs_kn, stride_vc_t, HEAD_DIM), mask=kv_ok[:, None], other=0.0)  # [BN, D]
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32), FP32_IEEE)
        s = tl.where(kv_ok[None, :], s * qk_scale, float("-inf"))  # [BS, BN]; cached keys: visible to all
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_IEEE)

    if split == num_splits - 1:
        # the S new keys (positions L .. L+S-1): query s sees new key i iff i <= s
        kn_base = tl.multiple_of(k_new_ptr + b * stride_kn_b + h * stride_kn_h, 16)
        vn_base = tl.multiple_of(v_new_ptr + b * stride_vn_b + h * stride_vn_h, 16)
        k = tl.load(kn_base + _tile_offsets(offs_s, stride_kn_s, HEAD_DIM), mask=s_ok[:, None], other=0.0)  # [BS, D]
        v = tl.load(vn_base + _tile_offsets(offs_s, stride_vn_s, HEAD_DIM), mask=s_ok[:, None], other=0.0)  # [BS, D]
        if WRITE_KV:
            w_ok = (s_ok & (L + offs_s < Tmax))[:, None]  # never write past the cache end, even on bad lengths
            tl.store(kc_base + _tile_offsets(L + offs_s, stride_kc_t, HEAD_DIM), k, mask=w_ok)
            tl.store(vc_base + _tile_offsets(L + offs_s, stride_vc_t, HEAD_DIM), v, mask=w_ok)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32), FP32_IEEE)
        visible = (offs_s[None, :] <= offs_s[:, None]) & s_ok[None, :]  # [BS(query), BS(key)]
        s = tl.where(visible, s * qk_scale, float("-inf"))  # key 0 is visible to every row
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_IEEE)

    if WRITE_OUT:
        o = acc / l_i[:, None]
        o_base = tl.multiple_of(out_ptr + b * stride_o_b + h * HEAD_DIM, 16)
        out_ptrs = o_base + _tile_offsets(offs_s, stride_o_s, HEAD_DIM)  # [BS, D]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=s_ok[:, None])
    else:
        # partials: an empty split writes m=-inf, l=0, acc=0, which the reduce weighs by 0
        row0 = (pid_bh.to(tl.int64) * num_splits + split) * S  # first row of this (b, h, split)
        tl.store(part_m_ptr + row0 + offs_s, m_i, mask=s_ok)
        tl.store(part_l_ptr + row0 + offs_s, l_i, mask=s_ok)
        acc_base = tl.multiple_of(part_acc_ptr + row0 * HEAD_DIM, 16)
        tl.store(acc_base + _tile_offsets(offs_s, HEAD_DIM, HEAD_DIM), acc, mask=s_ok[:, None])
        # the last split of (b, h) to arrive combines all of them (flash-decoding's reduce, no extra
        # kernel), in split order whichever arrives last
        tl.debug_barrier()  # every thread's partials are stored before the release below
        arrived = tl.atomic_add(count_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.store(count_ptr + pid_bh, 0)  # zero again for the next launch
            _combine_splits(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, pid_bh.to(tl.int64) * num_splits * S,
                            b * stride_o_b + h * HEAD_DIM, S, num_splits, stride_o_s, HEAD_DIM, BLOCK_S)


@triton.jit
def _combine_splits(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, bh_row0, out_off, S, num_splits, stride_o_s,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    # the num_splits partials of one (b, h) (rows bh_row0 + sp*S + s) -> out rows s at out_off + s*stride_o_s.
    # The global max first: the last split always holds the new keys, so it is finite; empty splits
    # (m = -inf) then get weight exactly 0. Loads are .cg: other programs wrote them (L2, never L1).
    offs_s = tl.arange(0, BLOCK_S)  # [BS]
    s_ok = offs_s < S
    m_max = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)  # [BS]
    for sp in range(0, num_splits):
        m = tl.load(part_m_ptr + bh_row0 + sp * S + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        m_max = tl.maximum(m_max, m)
    m_max = tl.where(s_ok, m_max, 0.0)  # padding rows: no -inf - -inf
    l_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, HEAD_DIM], dtype=tl.float32)  # [BS, D]
    for sp in range(0, num_splits):
        r = bh_row0 + sp * S
        w = tl.math.exp2(tl.load(part_m_ptr + r + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg") - m_max)
        l_sum += w * tl.load(part_l_ptr + r + offs_s, mask=s_ok, other=0.0, cache_modifier=".cg")
        a = tl.load(tl.multiple_of(part_acc_ptr + r * HEAD_DIM, 16) + _tile_offsets(offs_s, HEAD_DIM, HEAD_DIM),
                    mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
        acc += w[:, None] * a
    o = acc / tl.where(s_ok, l_sum, 1.0)[:, None]
    o_base = tl.multiple_of(out_ptr + out_off, 16)
    tl.store(o_base + _tile_offsets(offs_s, stride_o_s, HEAD_DIM), o.to(out_ptr.dtype.element_ty), mask=s_ok[:, None])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _check_aligned(t: torch.Tensor, name: str) -> None:
    # backs the kernels' tl.multiple_of hints; always true for contiguous tensors and cache views
    # with head_dim in {32, 64, 128}
    if t.data_ptr() % 16 != 0:
        raise ValueError(f"{name} must start at a 16-byte aligned address, got data_ptr % 16 = {t.data_ptr() % 16}")
    bad = [st for st in t.stride()[:-1] if st % 16 != 0]
    if bad:
        raise ValueError(f"{name} strides {tuple(t.stride())} must be multiples of 16 elements (except the last, 1)")


def _check_like(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, layout: str) -> None:
    """A 4-d [.., .., .., D] operand: ref's dtype, last dim contiguous, aligned (devices: check_device)."""
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-d {layout}, got shape {tuple(t.shape)}")
    check_operand(op, name, t, ref.dtype, ref_name)
    _check_aligned(t, name)


def _check_head_dim(D: int) -> None:
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported, expected one of {HEAD_DIMS}")


def _check_cache(op, qkv, k_cache, v_cache):
    """Validates the packed qkv and the cache pair; returns (H, D)."""
    check_dtype(op, "qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-d [B, T, 3*H*D], got shape {tuple(qkv.shape)}")
    if not qkv.is_contiguous():
        raise ValueError("qkv must be contiguous ([B, T, 3*H*D], the fused QKV GEMM's output)")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_like(op, c, name, qkv, "qkv", "[Bmax, H, Tmax, D]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} != v_cache shape {tuple(v_cache.shape)}; expected equal")
    Bmax, H, Tmax, D = k_cache.shape
    _check_head_dim(D)
    if qkv.shape[2] != 3 * H * D:
        raise ValueError(
            f"qkv last dim {qkv.shape[2]} does not match the cache: expected 3*H*D = 3*{H}*{D} = {3 * H * D}")
    if qkv.shape[0] > Bmax:
        raise ValueError(f"qkv batch {qkv.shape[0]} is larger than the cache batch Bmax={Bmax}")
    _check_aligned(qkv, "qkv")
    return H, D


def _check_separate(op, q, k, v):
    """Validates separate q [B, H, S, D] and k, v [B, H, T, D]; returns (B, H, S, T, D)."""
    check_dtype(op, "q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_like(op, t, name, q, "q", "[B, H, T, D]")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}; expected equal")
    B, H, S, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: "
                         f"expected [B, H, T, D] = [{B}, {H}, T, {D}]")
    _check_head_dim(D)
    return B, H, S, k.shape[2], D


def _check_lens(lens, name, B):
    if lens.dtype != torch.int32:
        raise ValueError(f"{name} dtype {lens.dtype} is not supported, expected torch.int32")
    if lens.dim() != 1 or lens.shape[0] != B:
        raise ValueError(f"{name} must have shape [B] = [{B}], got {tuple(lens.shape)}")


def _check_out(op, out, ref, ref_name, shape):
    if out is None:
        return torch.empty(shape, dtype=ref.dtype, device=ref.device)
    check_operand(op, "out", out, ref.dtype, ref_name, shape=shape)
    _check_aligned(out, "out")
    return out


def _prefill_config(kind: str, D: int) -> tuple:
    """_PREFILL_CONFIGS[(kind, D)], checked: the diagonal loop starts on a key-block edge, so
    BLOCK_M must be a multiple of BLOCK_N (a raise, not an assert: python -O would strip that)."""
    cfg = _PREFILL_CONFIGS[(kind, D)]
    block_m, block_n = cfg[:2]
    if block_m % block_n != 0:
        raise RuntimeError(f"attention config _PREFILL_CONFIGS[{(kind, D)!r}] = {cfg}: BLOCK_M={block_m} is not a "
                           f"multiple of BLOCK_N={block_n}, which the prefill kernel's diagonal loop needs")
    return cfg


def _launch_prefill(q, k, v, k_cache, v_cache, seq_lens, out, scale, write_kv: bool) -> None:
    # q, k, v [B, H, T, D] views; k_cache, v_cache [Bmax, H, Tmax, D] (unused when not write_kv)
    B, H, T, D = q.shape
    block_m, block_n, num_warps, num_stages = _prefill_config(_kind(q.dtype), D)
    grid = (B * H, triton.cdiv(T, block_m))
    _prefill_attn_kernel[grid](
        q, k, v, k_cache, v_cache, seq_lens, out,
        float(scale), T, H,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, WRITE_KV=write_kv, FP32_IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )


def prefill_attention(qkv, k_cache, v_cache, seq_lens, scale, *, out=None) -> torch.Tensor:
    """Causal attention of a right-padded ragged batch; writes its K/V into the cache.

    qkv [B, T, 3*H*D]; k_cache, v_cache [Bmax, H, Tmax, D]; seq_lens [B] int32 (1 <= len <= T, on
    the device, not read on the host). Returns out [B, T, H*D]; rows t >= seq_lens[b] are 0. Cache
    positions t < seq_lens[b] of rows b < B are written, nothing else.
    """
    H, D = _check_cache("prefill_attention", qkv, k_cache, v_cache)
    B, T, _ = qkv.shape
    Tmax = k_cache.shape[2]
    if T > Tmax:
        raise ValueError(f"prompt length T={T} is longer than the cache (Tmax={Tmax}); expected T <= {Tmax}")
    _check_lens(seq_lens, "seq_lens", B)
    check_device("prefill_attention", {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens,
                                       "out": out}, _prefill_attn_kernel)
    out = _check_out("prefill_attention", out, qkv, "qkv", (B, T, H * D))
    if B == 0 or T == 0:
        return out
    q, k, v = split_heads(qkv, H)
    _launch_prefill(q, k, v, k_cache, v_cache, seq_lens, out, scale, write_kv=True)
    return out


def prefill_attention_separate(q, k, v, scale, *, out=None) -> torch.Tensor:
    """Causal attention of S query tokens over the first S keys, reading K/V from tensors the caller
    owns (transformers' cache), writing nothing but out.

    q [B, H, S, D]; k, v [B, H, T, D] with T >= S (keys t >= S are not read: a StaticCache's empty
    slots). Strided views are taken as they are (last dim contiguous). Returns out [B, S, H*D].
    """
    B, H, S, T, D = _check_separate("prefill_attention_separate", q, k, v)
    if T < S:
        raise ValueError(f"prefill over S={S} queries needs at least S keys, k/v hold T={T}")
    check_device("prefill_attention_separate", {"q": q, "k": k, "v": v, "out": out}, _prefill_attn_kernel)
    out = _check_out("prefill_attention_separate", out, q, "q", (B, S, H * D))
    if B == 0 or S == 0:
        return out
    lens = torch.full((B,), S, dtype=torch.int32, device=q.device)
    _launch_prefill(q, k, v, k, v, lens, out, scale, write_kv=False)
    return out


def default_num_splits(H: int, Tmax: int) -> int:
    """How many programs share one (b, h)'s key axis in decode: from static sizes only, never the batch
    (a sequence's key splits, so its result, must not depend on how many sequences decode beside it;
    a batch of B launches B times the programs of one)."""
    by_occupancy = triton.cdiv(_TARGET_PROGRAMS, max(1, H))
    by_length = triton.cdiv(Tmax, _MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def _check_decode_s(S: int) -> None:
    if not 1 <= S <= MAX_DECODE_TOKENS:
        raise ValueError(f"decode takes S new tokens per sequence with 1 <= S <= {MAX_DECODE_TOKENS}, got S={S}")


def _check_cache_room(cache_lens: torch.Tensor, S: int, Tmax: int) -> None:
    # a host read of the lengths (on CUDA a sync): the kernel itself drops new K/V past the cache end
    for b, n in enumerate(cache_lens.tolist()):
        if not 0 <= n <= Tmax - S:
            raise ValueError(f"decode_attention: cache_lens[{b}] = {n} with S={S} new tokens does not fit the cache "
                             f"(Tmax={Tmax}): expected 0 <= cache_lens[b] and cache_lens[b] + S <= Tmax")


@dataclass(frozen=True)
class DecodeWorkspace:
    """The decode kernel's fp32 split partials for B sequences of S new tokens, allocated once (a
    CUDA-graph step makes it before its capture) and reused by every layer of every step. With one
    split the kernel writes its output directly and the three tensors are 1-element placeholders."""

    num_splits: int
    part_m: torch.Tensor  # [B*H, num_splits, S] running max, log2 units
    part_l: torch.Tensor  # [B*H, num_splits, S] running sum
    part_acc: torch.Tensor  # [B*H, num_splits, S, D] unnormalised output
    counters: torch.Tensor  # [B*H] int32 arrivals per (b, h), zero between launches (made zero once)


def _check_num_splits(num_splits) -> None:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")


def _workspace(BH: int, S: int, D: int, num_splits: int, device) -> DecodeWorkspace:
    if num_splits == 1:
        unused = torch.empty(1, dtype=torch.float32, device=device)
        return DecodeWorkspace(1, unused, unused, unused, torch.empty(1, dtype=torch.int32, device=device))
    return DecodeWorkspace(num_splits, torch.empty((BH, num_splits, S), dtype=torch.float32, device=device),
                           torch.empty((BH, num_splits, S), dtype=torch.float32, device=device),
                           torch.empty((BH, num_splits, S, D), dtype=torch.float32, device=device),
                           torch.zeros(BH, dtype=torch.int32, device=device))


def decode_workspace(k_cache: torch.Tensor, B: int, S: int, num_splits: int | None = None) -> DecodeWorkspace:
    """The scratch ``decode_attention`` needs for B sequences of S new tokens over caches shaped like
    k_cache [Bmax, H, Tmax, D]; num_splits defaults to ``default_num_splits(H, Tmax)``, what
    decode_attention picks without one."""
    _, H, Tmax, D = k_cache.shape
    _check_decode_s(S)
    num_splits = default_num_splits(H, Tmax) if num_splits is None else num_splits
    _check_num_splits(num_splits)
    return _workspace(B * H, S, D, num_splits, k_cache.device)


def _launch_decode(q, k_new, v_new, k_cache, v_cache, cache_lens, out, scale, num_splits, write_kv: bool,
                   kv_start=None, workspace: DecodeWorkspace | None = None, pdl: bool = False) -> None:
    # q, k_new, v_new [B, H, S, D] views; k_cache, v_cache [Bmax, H, Tmax, D]; cache_lens, kv_start [B] int32
    _check_num_splits(num_splits)
    launch_options = pdl_launch_options("decode_attention", pdl, q.device, _decode_attn_kernel)
    B, H, S, D = q.shape
    if B == 0:
        return
    Tmax = k_cache.shape[2]
    block_n, num_warps, num_stages = _DECODE_CONFIGS[(_kind(q.dtype), D)]
    write_out = num_splits == 1
    if workspace is None:
        workspace = _workspace(B * H, S, D, num_splits, q.device)
    elif workspace.num_splits != num_splits or (not write_out and (
            tuple(workspace.part_acc.shape) != (B * H, num_splits, S, D) or workspace.part_m.device != q.device)):
        raise ValueError(f"workspace holds partials {tuple(workspace.part_acc.shape)} for {workspace.num_splits} "
                         f"split(s); this call needs {num_splits} split(s) of [B*H, splits, S, D] = "
                         f"[{B * H}, {num_splits}, {S}, {D}] on {q.device}: make it with decode_workspace")
    part_m, part_l, part_acc = workspace.part_m, workspace.part_l, workspace.part_acc
    _decode_attn_kernel[(B * H, num_splits)](
        q, k_new, v_new, k_cache, v_cache, cache_lens, cache_lens if kv_start is None else kv_start, out,
        part_m, part_l, part_acc, workspace.counters,
        float(scale), S, H, Tmax, num_splits,
        *q.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_S=_DECODE_BLOCK_S, BLOCK_N=block_n, WRITE_OUT=write_out, WRITE_KV=write_kv,
        HAS_KV_START=kv_start is not None, FP32_IEEE=q.dtype == torch.float32, USE_PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **launch_options,
    )



def decode_attention(qkv, k_cache, v_cache, cache_lens, scale, *, out=None, num_splits=None,
                     check_lens: bool = False, workspace: DecodeWorkspace | None = None,
                     pdl: bool = False) -> torch.Tensor:
    """Attention of S (1..8) new tokens per sequence over the cache plus themselves; writes their K/V.

    qkv [B, S, 3*H*D]; k_cache, v_cache [Bmax, H, Tmax, D]; cache_lens [B] int32 on the device
    (tokens cached before this step; read only in-kernel, so the launch is CUDA-graph safe; the
    caller guarantees cache_lens[b] + S <= Tmax and updates cache_lens afterwards).
    Returns out [B, S, H*D].

    check_lens: read cache_lens on the host and raise ValueError on a row with cache_lens[b] < 0
    or cache_lens[b] + S > Tmax (the kernel would drop the writes past the cache end). Off by
    default: on CUDA it costs a host sync and cannot run inside a CUDA-graph capture. Tensors on
    the CPU (Triton's interpreter) are always checked.

    workspace: the split partials from ``decode_workspace`` (its num_splits is used when num_splits
    is None); without one they are allocated here, per call (never inside a CUDA-graph capture:
    the decode step passes its own).

    pdl: launch with programmatic dependent launch (CUDA, compute capability 9.0+; a ValueError
    elsewhere), as ``linear.linear``'s pdl.
    """
    H, D = _check_cache("decode_attention", qkv, k_cache, v_cache)
    B, S, _ = qkv.shape
    _check_decode_s(S)
    _check_lens(cache_lens, "cache_lens", B)
    check_device("decode_attention", {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache, "cache_lens": cache_lens,
                                      "out": out}, _decode_attn_kernel)
    if check_lens or cache_lens.device.type == "cpu":
        _check_cache_room(cache_lens, S, k_cache.shape[2])
    out = _check_out("decode_attention", out, qkv, "qkv", (B, S, H * D))
    if num_splits is None:
        num_splits = workspace.num_splits if workspace is not None else default_num_splits(H, k_cache.shape[2])
    q, k, v = split_heads(qkv, H)
    _launch_decode(q, k, v, k_cache, v_cache, cache_lens, out, scale, num_splits, write_kv=True, workspace=workspace,
                   pdl=pdl)
    return out


def decode_attention_separate(q, k, v, past_len: int, scale, *, kv_start=None, out=None,
                              num_splits=None) -> torch.Tensor:
    """Attention of S (1..8) new tokens over K/V the caller already holds, new ones included
    (transformers' cache after its update), writing nothing but out.

    q [B, H, S, D]; k, v [B, H, T, D] with the past at positions [0, past_len) and the S new
    tokens at [past_len, past_len + S) of every sequence (T >= past_len + S; later positions are
    not read). Query s sees keys 0 .. past_len + s; with kv_start [B] int32 (on the device,
    0 <= kv_start[b] <= past_len: a left-padded batch), keys kv_start[b] .. past_len + s, and the
    padding before kv_start[b] is not read. Returns out [B, S, H*D].
    """
    B, H, S, T, D = _check_separate("decode_attention_separate", q, k, v)
    _check_decode_s(S)
    if isinstance(past_len, bool) or not isinstance(past_len, int) or past_len < 0 or past_len + S > T:
        raise ValueError(f"past_len must be an int with 0 <= past_len and past_len + S <= T "
                         f"(S={S}, T={T}), got {past_len!r}")
    if kv_start is not None:
        _check_lens(kv_start, "kv_start", B)
    check_device("decode_attention_separate", {"q": q, "k": k, "v": v, "kv_start": kv_start, "out": out},
                 _decode_attn_kernel)
    out = _check_out("decode_attention_separate", out, q, "q", (B, S, H * D))
    if num_splits is None:
        num_splits = default_num_splits(H, past_len + S)
    lens = torch.full((B,), past_len, dtype=torch.int32, device=q.device)
    new = slice(past_len, past_len + S)
    _launch_decode(q, k[:, :, new], v[:, :, new], k, v, lens, out, scale, num_splits, write_kv=False,
                   kv_start=kv_start)
    return out


# --------------------------------------------------------------------------------------------
# References (plain PyTorch, computed in the input dtype)
# --------------------------------------------------------------------------------------------
def _causal_softmax_av(q, k, v, scale, q_pos0):
    # q [H, Sq, D], k/v [H, Sk, D]; query i sits at position q_pos0 + i and sees keys 0..q_pos0+i
    Sq, Sk = q.shape[1], k.shape[1]
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, Sq, Sk]
    visible = causal_visible(Sk, q_pos0 + torch.arange(Sq, device=q.device))  # [Sq, Sk]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # [H, Sq, D]


def prefill_attention_ref(qkv, seq_lens, scale, H) -> torch.Tensor:
    """qkv [B, T, 3*H*D] -> [B, T, H*D]: causal attention over each sequence's first seq_lens[b]
    tokens, rows t >= seq_lens[b] zero. Plain torch in qkv's dtype."""
    B, T, C = qkv.shape
    D = C // (3 * H)
    out = torch.zeros((B, T, H * D), dtype=qkv.dtype, device=qkv.device)
    for b, n in enumerate(seq_lens.tolist()):
        q, k, v = (t[0] for t in split_heads(qkv[b : b + 1, :n], H))  # [H, n, D]
        o = _causal_softmax_av(q, k, v, scale, 0)  # [H, n, D]
        out[b, :n] = o.transpose(0, 1).reshape(n, H * D)
    return out


def decode_attention_ref(qkv, k_cache, v_cache, cache_lens, scale) -> torch.Tensor:
    """qkv [B, S, 3*H*D] over cache[b, :, :cache_lens[b]] plus the S new tokens (causal among
    them) -> [B, S, H*D]. Plain torch in qkv's dtype; the cache is not modified."""
    B, S, C = qkv.shape
    H, D = k_cache.shape[1], k_cache.shape[3]
    out = torch.empty((B, S, H * D), dtype=qkv.dtype, device=qkv.device)
    for b, n in enumerate(cache_lens.tolist()):
        q, k_new, v_new = (t[0] for t in split_heads(qkv[b : b + 1], H))  # [H, S, D]
        k = torch.cat([k_cache[b, :, :n].to(qkv.dtype), k_new], dim=1)  # [H, n+S, D]
        v = torch.cat([v_cache[b, :, :n].to(qkv.dtype), v_new], dim=1)
        o = _causal_softmax_av(q, k, v, scale, n)  # [H, S, D]
        out[b] = o.transpose(0, 1).reshape(S, H * D)
    return out


def separate_attention_ref(q, k, v, past_len: int, scale, kv_start=None) -> torch.Tensor:
    """q [B, H, S, D] at positions past_len .. past_len+S-1 over k, v [B, H, T, D] (keys beyond
    past_len + S ignored, and keys before kv_start[b] when given) -> [B, S, H*D]: the *_separate
    launchers' result. Plain torch in q's dtype."""
    B, H, S, D = q.shape
    n = past_len + S
    starts = [0] * B if kv_start is None else kv_start.tolist()
    out = torch.stack([_causal_softmax_av(q[b], k[b, :, k0:n], v[b, :, k0:n], scale, past_len - k0)
                       for b, k0 in enumerate(starts)])
    return out.transpose(1, 2).reshape(B, S, H * D)  # [B, H, S, D] -> [B, S, H*D]


# --------------------------------------------------------------------------------------------
# Compile specs: every (kernel, config) the launchers can pick
# --------------------------------------------------------------------------------------------
def compile_specs(dtype: str) -> list[CompileSpec]:
    """One CompileSpec per (kernel, config) the launchers can choose for `dtype` ("fp16" or
    "bf16"), over head_dim 32, 64, 128. "fp32" is also accepted: its dots are IEEE fp32, which
    has no tensor-core path, so those specs say uses_dot=False."""
    check_spec_dtype(dtype)
    kind = "fp32" if dtype == "fp32" else "half"
    ieee = dtype == "fp32"
    p = "*" + dtype
    lens, part = "*i32", "*fp32"  # [B] int32 lengths; fp32 split partials
    prefill_sig = kernel_signature(_prefill_attn_kernel, p, {"seq_lens_ptr": lens})
    decode_sig = kernel_signature(_decode_attn_kernel, p, {
        "cache_lens_ptr": lens, "kv_start_ptr": lens, "part_m_ptr": part, "part_l_ptr": part, "part_acc_ptr": part,
        "count_ptr": "*i32"})
    specs = []
    for D in HEAD_DIMS:
        bm, bn, w, st = _prefill_config(kind, D)
        for write_kv in (True, False):  # prefill_attention / prefill_attention_separate
            specs.append(CompileSpec(
                name=f"attention.prefill[{dtype}{'' if write_kv else ',separate'}] D={D} BM={bm} BN={bn}",
                fn=_prefill_attn_kernel, signature=dict(prefill_sig),
                constexprs={"HEAD_DIM": D, "BLOCK_M": bm, "BLOCK_N": bn, "WRITE_KV": write_kv, "FP32_IEEE": ieee},
                num_warps=w, num_stages=st, uses_dot=not ieee))

        bn, w, st = _DECODE_CONFIGS[(kind, D)]
        # decode_attention (writes the cache), decode_attention_separate without and with kv_start
        # and decode_attention's PDL variants (the decode step's launch; sm_90 only)
        for write_kv, has_start, pdl in ((True, False, False), (False, False, False), (False, True, False),
                                         (True, False, True)):
            for write_out in (True, False):
                variant = "" if write_kv else ",separate,kv_start" if has_start else ",separate"
                specs.append(CompileSpec(
                    name=f"attention.decode[{dtype}{',direct' if write_out else ',split'}"
                         f"{variant}] D={D} BS={_DECODE_BLOCK_S} BN={bn}" + (" pdl" if pdl else ""),
                    fn=_decode_attn_kernel, signature=dict(decode_sig),
                    constexprs={"HEAD_DIM": D, "BLOCK_S": _DECODE_BLOCK_S, "BLOCK_N": bn,
                                "WRITE_OUT": write_out, "WRITE_KV": write_kv, "HAS_KV_START": has_start,
                                "FP32_IEEE": ieee, "USE_PDL": pdl},
                    num_warps=w, num_stages=st, uses_dot=not ieee, launch_pdl=pdl))

    return specs
