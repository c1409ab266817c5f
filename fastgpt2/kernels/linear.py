"""GEMM + fused epilogue: ``y = act(x @ w + b) (+ residual)``, optionally followed by a layernorm of
the result, one kernel for every linear of GPT-2.

Weights are in GPT-2's Conv1D layout, ``w`` [K, N] = (in, out) row-major, so ``y = x @ w + b``; the
lm_head reads the embedding table [V, E] = [N, K] as it is (``w_layout="nk"``, no bias). The same
kernel serves the QKV projection (no activation), the MLP up projection (activation epilogue), the
attention output and MLP down projections (residual epilogue, then the layernorm that follows them:
``linear_norm``) and the lm_head.

Accumulation is fp32; bias, activation and residual are applied in fp32 and the result is rounded
once to the output dtype; ``linear_norm``'s layernorm reads that rounded result (fp32 statistics).
fp32 inputs use ``input_precision="ieee"`` (never tf32).

Tiles and splits come from a fixed plan (``plan``: no autotuning, so the compile check can enumerate
every config and a CUDA graph replays exactly what was checked):

- decode (M = batch, a handful of rows): the weight read dominates, so 16-row tiles, and the grid is
  made at least ``2 x`` the GPU's SM count (``MIN_WAVES``) by narrowing BLOCK_N (64, then 32) and
  splitting K (split-K). Each split writes an fp32 partial; the last program of a tile to finish
  (an atomic counter per tile) sums the partials in a fixed order and runs the epilogue, so the
  reduction is no extra kernel. With a layernorm, the last tile of a row block to finish normalises
  the block's rows (a second counter), so ``linear_norm`` is one kernel as well.
- prefill (M = tokens): 64x128 output tiles, no split.

With ``pdl=True`` (programmatic dependent launch, sm_90+: the decode step's option) a program may
start while the previous kernel on the stream is still running: a split-K or [N, K] launch (every
layer GEMM of the gpt2 sizes at small batch, and the lm_head) prefetches its weight slab into L2
(the weights depend on no kernel), then every launch waits for the previous kernel
(``griddepcontrol.wait``) before it reads anything else or writes, so the weight stream overlaps
the previous kernel's tail.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .contract import ACTIVATIONS, DTYPES, CompileSpec, check_spec_dtype, kernel_signature
from .launch_checks import check_device, check_dtype, check_operand, pdl_launch_options

# SM counts of the targets the decode plan is built for; a CUDA device's own count is read from it
TARGET_SMS = {"sm_90": 132, "sm_80": 108}  # H100 / H200 SXM, A100
MIN_WAVES = 2  # a decode GEMM launches at least MIN_WAVES x SMs programs where K allows it


@dataclass(frozen=True)
class GemmConfig:
    name: str
    max_m: int | None  # the config serves M <= max_m (None: any M)
    block_m: int
    block_ns: tuple  # BLOCK_N candidates, widest first (the plan narrows until the grid is full)
    block_k: int  # fp16 / bf16
    num_warps: int
    num_stages: int  # fp16 / bf16
    # fp32 (the ieee dot runs on FMA units, operands in registers): a shorter K tile or fewer stages
    # keep registers and shared memory in bounds (a 64x128x64 fp32 tile spills on sm_80)
    block_k_fp32: int
    num_stages_fp32: int
    splits: bool  # whether the plan may split K
    norm_chunk: int  # columns per step of linear_norm's layernorm epilogue ([BLOCK_M, norm_chunk] tiles)

    def tiles(self, dtype: str) -> tuple[int, int]:
        """-> (BLOCK_K, num_stages) for "fp32", "fp16" or "bf16"."""
        return (self.block_k_fp32, self.num_stages_fp32) if dtype == "fp32" else (self.block_k, self.num_stages)


# Picked by M, first match. Shared memory per stage (16-bit) = (BM*BK + BK*BN) * 2 bytes; Triton
# keeps num_stages - 1 stages in flight.
CONFIGS = (
    # M = batch (1..64): 16-row tiles; 64- or 32-wide N slabs and split-K fill the GPU (see plan). BK=64
    # so that K=768 still splits 12 ways. M in 17..64 runs ceil(M/16) row blocks side by side
    # (axis 0), which re-read each weight slab from L2, not DRAM.
    GemmConfig("decode", max_m=64, block_m=16, block_ns=(64, 32), block_k=64, num_warps=4, num_stages=4,
               block_k_fp32=64, num_stages_fp32=2, splits=True, norm_chunk=64),
    # M = tokens: 64x128 tiles; 8 warps keep the fp32 accumulator plus the residual tile out of
    # local memory when the operands are not 16-byte aligned (4 warps spill there)
    GemmConfig("prefill", max_m=None, block_m=64, block_ns=(128,), block_k=64, num_warps=8, num_stages=3,
               block_k_fp32=32, num_stages_fp32=3, splits=False, norm_chunk=32),
)


def pick_config(m: int) -> GemmConfig:
    for cfg in CONFIGS:
        if cfg.max_m is None or m <= cfg.max_m:
            return cfg
    raise AssertionError("the last config takes any M")


@dataclass(frozen=True)
class GemmPlan:
    """How one GEMM [M, K] @ [K, N] is launched: its config, BLOCK_N, BLOCK_K and K split."""

    config: GemmConfig
    block_n: int
    block_k: int
    num_stages: int
    split_k: int
    k_per_split: int  # a multiple of block_k; split s covers K columns [s*k_per_split, (s+1)*k_per_split)

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return (triton.cdiv(m, self.config.block_m), triton.cdiv(n, self.block_n), self.split_k)

    def programs(self, m: int, n: int) -> int:
        gm, gn, gk = self.grid(m, n)
        return gm * gn * gk

    def counters(self, m: int, n: int) -> int:
        """int32 counters the launch uses: one per tile, then one per row block."""
        gm, gn, _ = self.grid(m, n)
        return gm * gn + gm


def plan(m: int, n: int, k: int, dtype: str, sms: int) -> GemmPlan:
    """The launch of an [M, K] @ [K, N] GEMM in dtype ("fp32" / "fp16" / "bf16") on a GPU of `sms`
    SMs. Decode (M <= 64): the widest BLOCK_N whose tiles of one row block, split over K (at least one
    K tile per split), reach MIN_WAVES * sms programs (so the plan is the same for every M <= 64); if none does, the narrowest with every K tile its own
    split (K too short to fill the GPU). Prefill: one program per output tile."""
    cfg = pick_config(m)
    block_k, num_stages = cfg.tiles(dtype)
    k_tiles = max(1, triton.cdiv(k, block_k))
    if not cfg.splits:
        return GemmPlan(cfg, cfg.block_ns[0], block_k, num_stages, 1, k_tiles * block_k)
    want = MIN_WAVES * sms
    # the split is chosen as for one block of rows, whatever M: a row's sums (their K split) must not
    # depend on how many rows run beside it (the engine steps 1 to 64 slots; more rows: more programs)
    rows = 1
    for block_n in cfg.block_ns:
        splits_wanted = triton.cdiv(want, rows * triton.cdiv(n, block_n))
        if splits_wanted <= k_tiles:
            break
    splits_wanted = min(splits_wanted, k_tiles)
    per_split = k_tiles // splits_wanted  # K tiles per split, >= 1; every split is non-empty
    return GemmPlan(cfg, block_n, block_k, num_stages, triton.cdiv(k_tiles, per_split), per_split * block_k)


@lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """SMs the plan fills on `device`: a CUDA device's own count; in the interpreter (CPU) the sm_90
    target's, so that the CPU tests run the splits an H100 / H200 runs."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return TARGET_SMS["sm_90"]


@dataclass(frozen=True)
class GemmWorkspace:
    """Scratch of the split / layernorm epilogues, allocated once (a CUDA-graph decode step makes it
    before its capture) and shared by every GEMM of a step (they run one after another)."""

    partials: torch.Tensor  # fp32, flat: [split_k, M, N] of the largest split GEMM
    counters: torch.Tensor  # int32, flat, all zero between launches (every launch zeroes what it used)


def gemm_workspace(shapes, dtype: torch.dtype, device, sms: int | None = None) -> GemmWorkspace:
    """The workspace for GEMMs of `shapes` [(M, N, K), ...] in `dtype` on `device`, planned for `sms`
    SMs (default: the device's, as the launchers plan)."""
    device = torch.device(device)
    sms = device_sms(device) if sms is None else sms
    parts, counters = 1, 1
    for m, n, k in shapes:
        p = plan(m, n, k, DTYPES[dtype], sms)
        if p.split_k > 1:
            parts = max(parts, p.split_k * m * n)
        counters = max(counters, p.counters(m, n))
    return GemmWorkspace(torch.empty(parts, dtype=torch.float32, device=device),
                         torch.zeros(counters, dtype=torch.int32, device=device))


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
    w_ptr,  # [K, N] (Conv1D layout, W_NK False) or [N, K] (W_NK: the lm_head / tied embedding), row stride stride_w
    b_ptr,  # [N] (read when HAS_BIAS)
    r_ptr,  # [M, N] residual, row stride stride_rm (read when HAS_RESIDUAL)
    y_ptr,  # [M, N] out, row stride stride_ym
    part_ptr,  # [SPLIT_K, M, N] fp32 split-K partials, contiguous (IS_SPLIT)
    count_ptr,  # int32 [tiles + row blocks], zero before and after every launch (IS_SPLIT or HAS_NORM)
    nw_ptr,  # [N] layernorm weight (HAS_NORM)
    nb_ptr,  # [N] layernorm bias (HAS_NORM)
    ny_ptr,  # [M, N] layernorm out, row stride stride_nym (HAS_NORM)
    M: "tl.int32",
    N: "tl.int32",
    K: "tl.int32",
    K_PER_SPLIT: "tl.int32",  # columns of K per split, a multiple of BLOCK_K (>= K without a split)
    stride_xm: "tl.int32",
    stride_w: "tl.int32",
    stride_rm: "tl.int32",
    stride_ym: "tl.int32",
    stride_nym: "tl.int32",
    eps: "tl.float32",
    ACTIVATION: tl.constexpr,  # one of ACTIVATIONS
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    W_NK: tl.constexpr,
    IS_SPLIT: tl.constexpr,  # grid axis 2 splits K; the last program of a tile to finish reduces it
    HAS_NORM: tl.constexpr,  # the last tile of a row block to finish layernorms its rows (needs N <= stride_ym)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM_CHUNK: tl.constexpr,  # columns per step of the layernorm epilogue
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (sm_90+)
):
    # With USE_PDL the program may start before the previous kernel has finished: until the wait
    # below it only computes offsets and prefetches its weight slab (read-only) into L2.
    # grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K): axis 0 (fastest) runs over M, so programs
    # launched together share a weight slab (read once from DRAM, then from L2); axis 2 is the split
    # of K: program (m, n, k) reduces x[:, k*K_PER_SPLIT : (k+1)*K_PER_SPLIT] @ w[that, n-tile].
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] int64
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    mask_m = offs_m < M
    mask_n = offs_n < N
    stride_w64 = tl.cast(stride_w, tl.int64)  # (stride_w may be a constexpr 1)
    if IS_SPLIT:
        k_base = pid_k * K_PER_SPLIT  # int64: this split's first column of K, added to the scalar bases
    else:
        k_base = 0
    x_ptrs = (x_ptr + k_base) + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs, w_step = _w_block_ptrs(w_ptr, k_base, offs_k, offs_n, stride_w64, W_NK, BLOCK_K)  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    if IS_SPLIT:
        k_len = K_PER_SPLIT  # the last split runs past K, masked
    else:
        k_len = K
    if USE_PDL:
        if IS_SPLIT or W_NK:
            # the weights depend on no kernel: stream them into L2 while the previous kernel finishes
            # (not in an unsplit [K, N] launch: there the extra loop costs stack when K is unaligned)
            _prefetch_w_slab(w_ptr, k_base, k_len, K, pid_n * BLOCK_N, N, stride_w64, W_NK, BLOCK_N, BLOCK_K)
        tl.extra.cuda.gdc_wait()  # the previous kernel has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled now (it waits in turn)
    for k0 in range(0, k_len, BLOCK_K):
        mask_k = offs_k < K - k_base - k0  # [BK]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        # ieee: exact fp32 products for fp32 inputs (no tf32); fp16/bf16 products are exact anyway
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += w_step

    mask_mn = mask_m[:, None] & mask_n[None, :]  # [BM, BN]
    if IS_SPLIT:
        tile = pid_m * tl.num_programs(1) + pid_n  # this tile's counter
        # fp32 partial of this split; the last split of the tile to arrive sums all of them in order
        # 0..SPLIT_K-1 (the same order whichever arrives last: deterministic) and runs the epilogue
        part_tile = offs_m[:, None] * N + offs_n[None, :]  # [BM, BN] within one split's [M, N]
        split_size = tl.cast(M, tl.int64) * N
        tl.store(part_ptr + pid_k * split_size + part_tile, acc, mask=mask_mn)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        finish = arrived == tl.num_programs(2) - 1
    else:
        finish = True
    if finish:
        if IS_SPLIT:
            tl.store(count_ptr + tile, 0)  # zero again for the next launch (no other program touches it now)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sp in range(0, tl.num_programs(2)):
                # .cg: from L2, where the other programs' partials are (never a stale L1 line)
                acc += tl.load(part_ptr + sp * split_size + part_tile, mask=mask_mn, other=0.0, cache_modifier=".cg")
        # epilogue, all fp32: bias, activation, residual, then one rounding
        y = acc
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = _activation(y, ACTIVATION)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_mn, other=0.0)
            y += r.to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_mn)
        if HAS_NORM:
            # the last tile of this row block to be stored layernorms the block's rows from the stored
            # (rounded) y, as PyTorch's layer_norm(x + residual) does
            tl.debug_barrier()
            row_counter = count_ptr + tl.num_programs(0) * tl.num_programs(1) + pid_m
            done = tl.atomic_add(row_counter, 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(1) - 1:
                tl.store(row_counter, 0)
                _norm_rows(y_ptr, nw_ptr, nb_ptr, ny_ptr, pid_m * BLOCK_M, M, N, stride_ym, stride_nym, eps,
                           BLOCK_M, NORM_CHUNK)


@triton.jit
def _prefetch_l2(ptrs, mask, safe_ptr):
    # prefetch.global.L2 of every lane's line (masked lanes: safe_ptr, an address of the slab): a hint
    # with no result (the dummy output keeps it from being dropped); compiled only (no interpreter)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [tl.where(mask, ptrs, safe_ptr)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _w_block_ptrs(w_ptr, k_base, offs_k, offs_n, stride_w64, W_NK: tl.constexpr, BLOCK_K: tl.constexpr):
    # pointers of w[k_base + offs_k, offs_n] as [len(offs_k), len(offs_n)], whichever layout w is
    # stored in ([K, N], or [N, K] with W_NK), and the pointer step of BLOCK_K rows of K
    if W_NK:
        ptrs = (w_ptr + k_base) + offs_n[None, :] * stride_w64 + offs_k[:, None]
        step = BLOCK_K
    else:
        ptrs = (w_ptr + k_base * stride_w64) + offs_k.to(tl.int64)[:, None] * stride_w64 + offs_n[None, :]
        step = BLOCK_K * stride_w64
    return ptrs, step


@triton.jit
def _prefetch_w_slab(w_ptr, k_base, k_len, K, n0, N, stride_w64, W_NK: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # the program's weight slab, rows k_base .. k_base + k_len (< K) x columns n0 .. n0 + BLOCK_N (< N),
    # one prefetch per 32 elements (64 B in fp16) along the contiguous dimension: [BK, BN/32] lanes
    # per step of K for [K, N], [BK/32, BN] for [N, K]; pointers formed and stepped as the main loop's
    if W_NK:
        offs_k = tl.arange(0, BLOCK_K // 32) * 32
        offs_n = n0 + tl.arange(0, BLOCK_N)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = n0 + tl.arange(0, BLOCK_N // 32) * 32
    ptrs, step = _w_block_ptrs(w_ptr, k_base, offs_k, offs_n, stride_w64, W_NK, BLOCK_K)
    # [1, 1]: the slab's first element, always in bounds (the masked lanes' address)
    first, _ = _w_block_ptrs(w_ptr, k_base, tl.arange(0, 1), n0 + tl.arange(0, 1), stride_w64, W_NK, BLOCK_K)
    for k0 in range(0, k_len, BLOCK_K):
        _prefetch_l2(ptrs, (offs_k < K - k_base - k0)[:, None] & (offs_n < N)[None, :], first)
        ptrs += step


@triton.jit
def _norm_rows(y_ptr, nw_ptr, nb_ptr, ny_ptr, row0, M, N, stride_ym, stride_nym, eps,
               BLOCK_M: tl.constexpr, NORM_CHUNK: tl.constexpr):
    # rows row0 .. row0+BLOCK_M-1 (< M) of y [M, N]: ny = (y - mean) * rstd * weight + bias; fp32
    # statistics in three passes over [BLOCK_M, NORM_CHUNK] tiles (mean, biased variance, normalise),
    # read from L2 (.cg: other programs stored most of these rows)
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM] int64
    row_ok = rows < M
    cols = tl.arange(0, NORM_CHUNK)  # [NC]
    y_rows = y_ptr + rows[:, None] * stride_ym  # [BM, 1]
    total = tl.zeros([BLOCK_M, NORM_CHUNK], dtype=tl.float32)
    for c0 in range(0, N, NORM_CHUNK):
        mask = row_ok[:, None] & (c0 + cols < N)[None, :]  # [BM, NC]
        total += tl.load(y_rows + (c0 + cols)[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    mean = tl.sum(total, axis=1) / N  # [BM]
    sq = tl.zeros([BLOCK_M, NORM_CHUNK], dtype=tl.float32)
    for c0 in range(0, N, NORM_CHUNK):
        mask = row_ok[:, None] & (c0 + cols < N)[None, :]
        v = tl.load(y_rows + (c0 + cols)[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        d = tl.where(mask, v - mean[:, None], 0.0)
        sq += d * d
    rstd = tl.rsqrt(tl.sum(sq, axis=1) / N + eps)  # [BM]
    for c0 in range(0, N, NORM_CHUNK):
        col_ok = c0 + cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        v = tl.load(y_rows + (c0 + cols)[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        w = tl.load(nw_ptr + c0 + cols, mask=col_ok, other=0.0).to(tl.float32)  # [NC]
        b = tl.load(nb_ptr + c0 + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = (v - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(ny_ptr + rows[:, None] * stride_nym + (c0 + cols)[None, :], out.to(ny_ptr.dtype.element_ty), mask=mask)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that t's elements occupy."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def _check_workspace(op, workspace, p: GemmPlan, m, n, device):
    if workspace is None:
        return
    need_parts = p.split_k * m * n if p.split_k > 1 else 0
    if (workspace.partials.numel() < need_parts or workspace.counters.numel() < p.counters(m, n)
            or workspace.partials.device != device or workspace.counters.device != device):
        raise ValueError(f"{op}: the workspace holds {workspace.partials.numel()} partials and "
                         f"{workspace.counters.numel()} counters on {workspace.partials.device}; this call needs "
                         f"{need_parts} and {p.counters(m, n)} on {device}: make it with gemm_workspace for this shape")


def _launch(op, x, w, b, *, activation, residual, out, w_layout, norm, workspace, sms, pdl):
    """Checks and launches _linear_kernel. norm: (weight, bias, eps, norm_out | None) or None.
    -> (out [M, N], norm_out [M, N] or None without a norm); None outputs are allocated here."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"{op}: w_layout must be 'kn' (Conv1D [K, N]) or 'nk' ([N, K]), got {w_layout!r}")
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    check_dtype(op, "x", x)
    m, k = x.shape
    n = w.shape[1] if w_layout == "kn" else w.shape[0]
    if (w.shape[0] if w_layout == "kn" else w.shape[1]) != k:
        layout = f"[K={k}, N] (Conv1D layout" if w_layout == "kn" else f"[N, K={k}] (w_layout='nk'"
        raise ValueError(f"{op}: w has shape {tuple(w.shape)}, expected {layout}, x is {tuple(x.shape)})")
    tensors = {"x": x, "w": w}
    check_operand(op, "x", x, x.dtype)
    check_operand(op, "w", w, x.dtype)
    if b is not None:
        check_operand(op, "b", b, x.dtype, shape=(n,))
        tensors["b"] = b
    if residual is not None:
        check_operand(op, "residual", residual, x.dtype, shape=(m, n))
        tensors["residual"] = residual
    if out is not None:
        check_operand(op, "out", out, x.dtype, shape=(m, n))
        tensors["out"] = out
    if norm is not None:
        nw, nb, eps, norm_out = norm
        if norm_out is None:
            norm_out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        norm = (nw, nb, eps, norm_out)
        for name, t, shape in (("norm_weight", nw, (n,)), ("norm_bias", nb, (n,)), ("norm_out", norm_out, (m, n))):
            check_operand(op, name, t, x.dtype, shape=shape)
        tensors.update(norm_weight=nw, norm_bias=nb, norm_out=norm_out)
    device = check_device(op, tensors, _linear_kernel)
    launch_options = pdl_launch_options(op, pdl, device, _linear_kernel)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif _overlap(out, x) or _overlap(out, w):
        raise ValueError(f"{op}: out overlaps x or w (other programs still read them)")
    if norm is not None and any(_overlap(norm[3], t) for t in (x, w, out) + ((residual,) if residual is not None else ())):
        raise ValueError(f"{op}: norm_out overlaps x, w, residual or out")
    if m == 0 or n == 0:
        return out, (norm[3] if norm is not None else None)

    sms = device_sms(device) if sms is None else sms
    p = plan(m, n, k, DTYPES[x.dtype], sms)
    _check_workspace(op, workspace, p, m, n, device)
    if p.split_k > 1 or norm is not None:
        if workspace is None:  # eager calls: per call (a CUDA-graph step passes its own, made before capture)
            workspace = gemm_workspace([(m, n, k)], x.dtype, device, sms)
        parts = workspace.partials if p.split_k > 1 else out  # out: a placeholder, never touched without IS_SPLIT
        counters = workspace.counters
    else:
        parts, counters = out, out  # placeholders, never touched without IS_SPLIT / HAS_NORM
    r = residual if residual is not None else out  # placeholder, never read without HAS_RESIDUAL
    nw, nb, eps, ny = norm if norm is not None else (out, out, 0.0, out)
    _linear_kernel[p.grid(m, n)](
        x, w, b if b is not None else out, r, out, parts, counters, nw, nb, ny,
        m, n, k, p.k_per_split,
        x.stride(0), w.stride(0), r.stride(0), out.stride(0), ny.stride(0), float(eps),
        ACTIVATION=activation,
        HAS_BIAS=b is not None,
        HAS_RESIDUAL=residual is not None,
        W_NK=w_layout == "nk",
        IS_SPLIT=p.split_k > 1,
        HAS_NORM=norm is not None,
        BLOCK_M=p.config.block_m,
        BLOCK_N=p.block_n,
        BLOCK_K=p.block_k,
        NORM_CHUNK=p.config.norm_chunk,
        USE_PDL=pdl,
        num_warps=p.config.num_warps,
        num_stages=p.num_stages,
        **launch_options,
    )
    return out, (norm[3] if norm is not None else None)


def linear(x, w, b, *, activation="none", residual=None, out=None, w_layout="kn", workspace=None, sms=None,
           pdl=False):
    """y = act(x @ w + b) (+ residual) -> out [M, N].

    x: [M, K]; w: [K, N] (Conv1D layout, w_layout="kn") or [N, K] (w_layout="nk", e.g. the lm_head's
    [V, E] table); b: [N] or None; residual, out: [M, N]. One dtype (fp32, fp16, bf16) and one device
    for all; last dims contiguous. out may be the residual tensor itself (an in-place residual add)
    but must not overlap x or w. workspace: ``gemm_workspace``'s, for the split-K partials (None:
    allocated per call when the plan splits). sms: the SM count the plan fills (default: the device's;
    tests use it to pick splits). pdl: launch with programmatic dependent launch (CUDA, compute
    capability 9.0+; a ValueError elsewhere): the kernel may be scheduled before the previous one on
    the stream finishes and waits for it on the GPU (the decode step's option, ``Engine(pdl=)``).
    """
    return _launch("linear", x, w, b, activation=activation, residual=residual, out=out, w_layout=w_layout,
                   norm=None, workspace=workspace, sms=sms, pdl=pdl)[0]


def linear_norm(x, w, b, residual, norm_weight, norm_bias, eps, *, out=None, norm_out=None, workspace=None, sms=None,
                pdl=False):
    """s = x @ w + b + residual, y = layer_norm(s) with norm_weight, norm_bias, eps -> (y, s), both [M, N].

    One kernel: GPT-2's attention output and MLP down projections with the residual add and the
    layernorm that follows them. x [M, K]; w [K, N] (Conv1D); b, norm_weight, norm_bias [N];
    residual, out, norm_out [M, N]; s is rounded to the dtype once and y computed from the rounded s.
    out may be the residual itself. workspace / sms / pdl: as ``linear``.
    """
    if residual is None:
        raise ValueError("linear_norm: residual is required (s = x @ w + b + residual)")
    s, y = _launch("linear_norm", x, w, b, activation="none", residual=residual, out=out, w_layout="kn",
                   norm=(norm_weight, norm_bias, eps, norm_out), workspace=workspace, sms=sms, pdl=pdl)
    return y, s


def linear_ref(x, w, b, *, activation="none", residual=None, w_layout="kn"):
    """Plain PyTorch in the input dtype: act(x @ w + b) (+ residual); w [N, K] when w_layout="nk"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_ref: unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    y = x @ (w if w_layout == "kn" else w.t())
    y = ACTIVATIONS[activation](y if b is None else y + b)
    return y if residual is None else y + residual


def linear_norm_ref(x, w, b, residual, norm_weight, norm_bias, eps):
    """Plain PyTorch in the input dtype: (layer_norm(s), s), s = x @ w + b + residual."""
    s = x @ w + b + residual
    return torch.nn.functional.layer_norm(s, s.shape[-1:], norm_weight, norm_bias, eps), s


# the epilogues the launchers produce: (label, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, W_NK, HAS_NORM)
def _epilogues():
    for activation in ACTIVATIONS:
        for has_res in (False, True):
            yield activation + ("+residual" if has_res else ""), activation, True, has_res, False, False
    yield "residual+layernorm", "none", True, True, False, True  # linear_norm
    yield "nk, no bias", "none", False, False, True, False  # the lm_head


def _decode_step_epilogue(activation, has_bias, has_res, w_nk, has_norm) -> bool:
    """Whether the decode step launches this epilogue (so its PDL variant is compiled): the QKV
    projection (bias), the MLP up projection (bias + the model's activation), linear_norm, the lm_head."""
    return has_norm or w_nk or (has_bias and not has_res)


def compile_specs(dtype: str) -> list[CompileSpec]:
    """Every (config, BLOCK_N, split, epilogue) the launchers can produce, for dtype "fp16" or "bf16"
    ("fp32" also works: the fp32 stage counts, and no tensor cores since the dot is ieee); and, for
    sm_90 only, the PDL variant (USE_PDL) of each the decode step launches."""
    check_spec_dtype(dtype)
    specs = []
    for pdl in (False, True):
        for cfg in CONFIGS:
            block_k, num_stages = cfg.tiles(dtype)
            for block_n in cfg.block_ns:
                for split in ((False, True) if cfg.splits else (False,)):
                    for label, activation, has_bias, has_res, w_nk, has_norm in _epilogues():
                        if pdl and not _decode_step_epilogue(activation, has_bias, has_res, w_nk, has_norm):
                            continue
                        needs_scratch = split or has_norm
                        signature = kernel_signature(_linear_kernel, f"*{dtype}", {
                            "part_ptr": "*fp32" if split else f"*{dtype}",
                            "count_ptr": "*i32" if needs_scratch else f"*{dtype}"})
                        specs.append(CompileSpec(
                            name=f"linear.linear[{label}] {cfg.name} BM={cfg.block_m} BN={block_n} BK={block_k}"
                                 + (" split-K" if split else "") + (" pdl" if pdl else ""),
                            fn=_linear_kernel,
                            signature=signature,
                            constexprs={
                                "ACTIVATION": activation, "HAS_BIAS": has_bias, "HAS_RESIDUAL": has_res, "W_NK": w_nk,
                                "IS_SPLIT": split, "HAS_NORM": has_norm, "BLOCK_M": cfg.block_m, "BLOCK_N": block_n,
                                "BLOCK_K": block_k, "NORM_CHUNK": cfg.norm_chunk, "USE_PDL": pdl,
                            },
                            num_warps=cfg.num_warps,
                            num_stages=num_stages,
                            uses_dot=dtype != "fp32",
                            launch_pdl=pdl,
                        ))
    return specs
