"""The ops contract (``Ops``, a Protocol: every op of the model, with its shapes) and its two
implementations: ``TorchOps``, plain PyTorch (the CPU production path, and the fallback a user can
choose), and ``TritonOps``, fastgpt2's Triton kernels. The model (runtime/model.py) and the drop-in
(hf.py) call nothing else.

Shapes: B batch, S new tokens per sequence, T prompt length, M = B*S (or B*T) rows, E = n_embd,
H heads, D = E/H, V vocab, K/N a GEMM's in/out features; caches [Bmax, H, Tmax, D] per layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Union

import torch
import torch.nn.functional as F

from ..errors import BackendError
from ..kernels.contract import ACTIVATIONS, PDL_MIN_CAPABILITY, causal_visible, split_heads
from . import cpu_paths

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class UniformDecode:
    """A decode step's shared context when every sequence holds `length` tokens (known on the host)."""

    length: int
    s: int  # new tokens per sequence


@dataclass(frozen=True)
class RaggedDecode:
    """A decode step's shared context for sequences of different lengths (torch backend)."""

    pos: torch.Tensor  # [B, S] int64: cache positions the new K/V go to
    rows: torch.Tensor  # [B, 1] int64: the batch index of each row
    mask: torch.Tensor  # [B, 1, S, kv_len] bool: what each new token sees
    kv_len: int  # keys sliced from the cache


@dataclass(frozen=True)
class PerRowDecode:
    """A decode step's shared context when each sequence's length is known on the host and every row's
    attention must be computed alone (the engine's: a row's bits must not depend on its neighbours;
    torch's SDPA gives a row other bits in a batch than alone, and over a masked longer key range)."""

    lengths: tuple[int, ...]  # [B] each sequence's length before the step
    pos: torch.Tensor  # [B, S] int64: cache positions the new K/V go to
    rows: torch.Tensor  # [B, 1] int64: the batch index of each row


DecodeContext = Union[UniformDecode, RaggedDecode, PerRowDecode, None]  # None: the op builds (or needs) none


@dataclass(frozen=True)
class StepScratch:
    """The Triton decode step's scratch, made once before a capture (``TritonOps.decode_workspace``)."""

    attention: object  # kernels.attention.DecodeWorkspace: split partials and counters
    gemm: object  # kernels.linear.GemmWorkspace: split-K partials and counters of every GEMM of the step
    pdl: bool = False  # launch the step's GEMMs and attention with programmatic dependent launch (``resolve_pdl``)


class Ops(Protocol):
    """What every backend implements. A backend never holds the model's state beyond prepared weights."""

    name: str  # "torch" | "triton"
    n_head: int | None  # set by make_ops

    def prepare_linear(self, w: torch.Tensor):
        """w [K, N] (Conv1D's (in, out)) -> the form ``linear`` takes it in; done once, at construction."""

    def prepare_lm_head(self, w: torch.Tensor) -> torch.Tensor:
        """w [V, E] -> the same values in the layout ``lm_head`` reads best; done once, at construction
        (a tied head is also the embedding table, so ``embed_layer_norm`` gathers from it)."""

    def embed_layer_norm(self, ids, start, wte, wpe, weight, bias, eps):
        """ids [B, S], start [B] int32 | None, wte [V, E], wpe [P, E], weight/bias [E] -> (y [M, E], h [M, E]):
        h = wte[ids] + wpe[start[b] + s] (positions s when start is None), y = layernorm(h)."""

    def layer_norm(self, x, residual, weight, bias, eps):
        """x [M, E], residual [M, E] | None -> (y [M, E], s [M, E]), s = x + residual, y = layernorm(s).
        With a residual, x is scratch the op may overwrite (the torch path adds into it in place)."""

    def linear(self, x, w, b, activation: str = "none", residual=None, workspace=None) -> torch.Tensor:
        """x [M, K], w (prepared), b [N], residual [M, N] | None -> act(x @ w + b) (+ residual) [M, N];
        activation one of kernels.contract.ACTIVATIONS. workspace: ``decode_workspace``'s (None: the op
        allocates what it needs)."""

    def linear_norm(self, x, w, b, residual, weight, bias, eps, workspace=None):
        """x [M, K], w (prepared), b [N], residual [M, N], weight/bias [N] -> (y [M, N], s [M, N]):
        s = x @ w + b + residual, y = layernorm(s) (GPT-2's output projections and the layernorm
        that follows each). residual is the caller's scratch the op may overwrite."""

    def lm_head(self, y, w, workspace=None) -> torch.Tensor:
        """y [N, E], w [V, E] (prepared) -> logits [N, V], contiguous."""

    def prefill_attention(self, qkv, k_cache, v_cache, seq_lens, scale, upcast) -> torch.Tensor:
        """qkv [B, T, 3E], k_cache/v_cache [Bmax, H, Tmax, D], seq_lens [B] int32 -> [B, T, E]. Writes
        the K/V of t < seq_lens[b] at cache positions t; rows t >= seq_lens[b] are 0."""

    def decode_context(self, cache_lens, s: int, kv_len: int, uniform_len: int | None = None,
                       row_lens: tuple[int, ...] | None = None) -> DecodeContext:
        """What every layer's decode attention shares in one step, built once per step. row_lens: each
        sequence's length, known on the host, when each row must be attended alone (the engine)."""

    def decode_workspace(self, k_cache, batch: int, s: int, gemm_shapes, pdl: bool = False):
        """The scratch a decode step needs for `batch` sequences of s new tokens over caches shaped
        like k_cache [Bmax, H, Tmax, D], whose GEMMs are gemm_shapes [(M, N, K), ...] (the Triton
        kernels' split partials and arrival counters, a ``StepScratch``; None when none), allocated
        once by the caller, before a CUDA-graph capture, and shared by every op of a step. pdl: the
        step's kernels launch with programmatic dependent launch (checked by ``resolve_pdl``)."""

    def decode_attention(self, qkv, k_cache, v_cache, cache_lens, scale, upcast, kv_len: int,
                         ctx: DecodeContext = None, workspace=None) -> torch.Tensor:
        """qkv [B, S, 3E], caches [Bmax, H, Tmax, D], cache_lens [B] int32 -> [B, S, E]. Writes the S new
        K/V at cache_lens[b] + s; query s sees keys 0 .. cache_lens[b] + s. kv_len (a host int >= every
        cache_lens[b] + S) lets the torch path slice the cache; the Triton kernel reads the lengths on
        the device and ignores it. ctx: this step's ``decode_context`` (None: built per call);
        workspace: ``decode_workspace``'s (None: allocated per call)."""

    def prefill_attention_separate(self, q, k, v, scale, upcast) -> torch.Tensor:
        """q [B, H, S, D], k/v [B, H, T, D] (T >= S; a caller's cache, read and never written) -> [B, S, E]:
        causal over the first S keys."""

    def decode_attention_separate(self, q, k, v, past_len: int, scale, upcast, kv_start=None) -> torch.Tensor:
        """q [B, H, S, D], k/v [B, H, T, D] -> [B, S, E]: the S (<= 8) new tokens sit at past_len ..
        past_len+S-1 of k/v; query s sees keys 0 .. past_len+s, or kv_start[b] .. past_len+s with
        kv_start [B] int32 (left padding, each <= past_len). k/v are read, never written."""


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu":
            raise BackendError(f"backend='triton' runs on CUDA devices (or the CPU under Triton's interpreter), not {device}")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(
                "backend='triton' on the CPU runs only in Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before Python starts (slow, meant for testing the kernels), or use backend='torch', "
                "the CPU path"
            )
    return backend


def resolve_pdl(pdl: bool, backend: str, device: torch.device) -> bool:
    """pdl=True (programmatic dependent launch of the decode step's kernels: each may be scheduled
    while the previous one finishes, and waits for it on the GPU) needs the Triton backend on a CUDA
    GPU, of compute capability 9.0 or newer (the kernels' rule, ``launch_checks.check_pdl``);
    anything else asking for it is a BackendError."""
    if pdl is False:
        return False
    if pdl is True and (backend != "triton" or device.type != "cuda"):
        raise BackendError(f"pdl=True (programmatic dependent launch) needs backend='triton' on a CUDA GPU of compute "
                           f"capability {'.'.join(map(str, PDL_MIN_CAPABILITY))} or newer; this model is "
                           f"backend={backend!r} on {device}: pass pdl=False")
    # here pdl=True on a Triton model on CUDA (or a flag that is not a bool, which the check refuses)
    # lazy: launch_checks imports triton, whose mode a torch model must not fix
    from ..kernels.launch_checks import check_pdl

    return check_pdl(pdl, device, error=BackendError)


def make_ops(backend: str, device: torch.device, dtype: torch.dtype, n_head: int, pack_weights: bool = True,
             _cpu_path: str | None = None) -> Ops:
    """The ops of `backend` for a model of `n_head` heads. pack_weights=False: linear() takes the
    plain [K, N] weights and the lm_head keeps its layout (for callers that hand over other modules'
    live weights each call, as patch_hf does). _cpu_path: private, for tests (see ``TorchOps``)."""
    ops = TritonOps() if backend == "triton" else TorchOps(device, dtype, pack_weights, _cpu_path=_cpu_path)
    ops.n_head = n_head
    return ops


class TorchOps:
    """Plain PyTorch, with the CPU's GEMMs chosen at construction by what this CPU runs
    (``choose_cpu_path``: torch's CPU capability and a one-time probe of oneDNN's packed op; the
    choice is ``cpu_path``) and by measurement (the figures: README, "CPU (measured)"):

    - bfloat16 on AVX-512 where oneDNN runs bf16: the GEMM weights are prepacked once for oneDNN
      (AMX), which reads them faster than addmm at batch 1 and 8; the packed form replaces the plain
      one (one row runs as ONE_ROW_AS rows, as float32's below). Elsewhere (AVX2: oneDNN refuses bf16 without avx_ne_convert or AVX-512 BW/VL/DQ, and
      torch's addmm then runs its own kernels, a scalar loop on the [K, N] Conv1D layout), and for
      float16: addmm on weights stored [N, K] once at construction.
    - float32 on an AVX-512 or AVX2 CPU where oneDNN runs fp32: the GEMM weights are prepacked once
      for oneDNN, the packed form replacing the plain one (one copy of each weight), for every row
      count. The engine decodes only its occupied slots, so a row's result must not depend on how
      many rows share its GEMM: oneDNN's packed op gives a row the same bits at every row count from
      2 on (measured to 1024 rows under AVX-512, to 16 under AVX2), but one row alone other bits where
      K is long (AVX-512, K >= 1536: GPT-2's MLP down-projection), so one row runs as ONE_ROW_AS rows,
      the row repeated (as fast as one row alone; 2 rows are slower). MKL's addmm is not row-count
      invariant (its rows change from 4 rows on) and no faster: GPT-2 small's 48 GEMMs (340 MB), AMD
      EPYC (AVX-512), 2 threads: addmm 23 ms at 1 row vs oneDNN's 14, 49 at 8 rows vs oneDNN's 15.
      Elsewhere: MKL's addmm for every row count.
    - the lm_head, float32 on oneDNN: oneDNN's matmul over the plain row-major [V, E] table (the tied
      embedding's own, no copy) up to 64 rows, one row run as HEAD_ONE_ROW_AS rows: a row's bits are
      then the same at every row count (from 2 rows on they agree; one row alone differs). GPT-2
      small's head on the AMD EPYC: 8.0 ms at 1 row (as 2), 9.4 at 8; over a column-major table 8.1-9.2
      and 10.3-10.8; a packed copy (the table twice) 6.3 at 8; MKL's GEMV over a column-major table
      6.7 at 1 row, its w @ y^T 131 ms at 8 (and neither row-count invariant). float32 on addmm (the
      fallback): the table stored column-major (a [V, E] view of [E, V] storage, no second copy),
      which MKL's GEMV streams faster than row-major; the tied embedding then gathers strided rows;
      the GEMV for one row, w @ y^T up to 64 rows. bfloat16 with AMX: wte @ y^T up to 64 rows (the large
      matrix on the left: faster than y @ wte^T, as fast as a packed copy, no copy of wte); bfloat16
      without AMX and float16: y @ wte^T (``CpuPath.head``). Above 64 rows (a forward() over long
      sequences): y @ wte^T."""

    ONE_ROW_AS = 4  # oneDNN's packed op: a 1-row GEMM runs as this many rows, the row repeated (see above)
    HEAD_ONE_ROW_AS = 2  # float32's oneDNN lm_head: a 1-row head runs as this many rows (see above)

    name = "torch"

    def __init__(self, device: torch.device | None = None, dtype: torch.dtype | None = None, pack_weights: bool = True,
                 *, _cpu_path: str | None = None):
        """_cpu_path (private, for tests; default: cpu_paths._FORCE_CPU_PATH): force a CPU path by
        its ``CpuPath.gemm`` name; one this CPU cannot run is a BackendError. pack_weights=False
        always runs addmm (the caller's live weights are never packed)."""
        self.n_head = None  # set by make_ops
        cpu = device is not None and device.type == "cpu"
        self.cpu = cpu
        # CpuPath on the CPU (None elsewhere); pack_weights=False: plain addmm, nothing probed
        self.cpu_path = cpu_paths.cpu_path_for(dtype, pack_weights, _cpu_path) if cpu else None
        gemm = self.cpu_path.gemm if cpu else "addmm"
        self.packed = gemm == "onednn_packed"
        # the packed op (float32, bfloat16): one row runs as ONE_ROW_AS rows (see the class), so every row
        # count sums alike
        self.pad_one_row = self.packed
        self.store_nk = gemm == "addmm_nk"
        self.head_y_wt = cpu and self.cpu_path.head == "y @ w^T"
        self.head_onednn = cpu and self.cpu_path.head == "oneDNN y @ w^T"
        self.head_column_major = pack_weights and cpu and dtype == torch.float32 and not self.head_onednn

    def prepare_linear(self, w: torch.Tensor):
        """The form linear() takes w [K, N] in: w itself, its values stored [N, K] (a column-major
        [K, N] view, for addmm_nk), or its oneDNN prepacked [N, K] form."""
        if self.store_nk:
            return w.t().contiguous().t()
        if not self.packed:
            return w
        return cpu_paths.onednn_pack(w.t().contiguous())

    def prepare_lm_head(self, w: torch.Tensor):
        """w [V, E], column-major for CPU float32 on addmm (see the class), else as it is."""
        return w.t().contiguous().t() if self.head_column_major else w

    def embed_layer_norm(self, ids, start, wte, wpe, weight, bias, eps):
        b, s = ids.shape
        positions = torch.arange(s, device=ids.device)
        positions = positions.expand(b, s) if start is None else start[:, None].long() + positions  # [B, S]
        h = (F.embedding(ids, wte) + F.embedding(positions, wpe)).view(b * s, -1)
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps), h

    def layer_norm(self, x, residual, weight, bias, eps):
        s = x if residual is None else x.add_(residual)  # in place: x is the caller's scratch (see the contract)
        return torch.layer_norm(s, s.shape[-1:], weight, bias, eps), s

    def linear(self, x, w, b, activation="none", residual=None, workspace=None):
        if self.packed:
            if self.pad_one_row and x.shape[0] == 1:  # the row repeated, the copies discarded (see the class)
                y = torch.ops.mkldnn._linear_pointwise(x.expand(self.ONE_ROW_AS, -1), w, b, "none", [], "")[:1]
            else:
                y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # [M, N] = b + x @ w
        else:
            y = torch.addmm(b, x, w)  # [M, N] = b + x @ w (Conv1D layout, as transformers computes it)
        if activation != "none":
            y = ACTIVATIONS[activation](y)
        if residual is not None:
            y += residual
        return y

    def linear_norm(self, x, w, b, residual, weight, bias, eps, workspace=None):
        return self.layer_norm(self.linear(x, w, b), residual, weight, bias, eps)  # s = (x @ w + b) + residual

    def lm_head(self, y, w, workspace=None):
        """y [N, E] @ w [V, E]^T -> logits [N, V], contiguous. On the CPU (see the class and
        ``CpuPath.head``): oneDNN's matmul over the row-major table up to 64 rows (fp32 on oneDNN),
        y @ w^T where the path's head says so, else a GEMV for one row, w @ y^T up to 64 rows; y @ w^T
        above 64 rows (a forward() over long sequences)."""
        n = y.shape[0]
        if not self.cpu or self.head_y_wt:
            return y @ w.t()
        if self.head_onednn and n <= 64:  # the same bits per row at every row count (see the class)
            x = y.expand(self.HEAD_ONE_ROW_AS, -1) if n == 1 else y
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")[:n]
        if n == 1:
            return torch.mv(w, y[0])[None]
        if n > 64:
            return y @ w.t()
        return torch.mm(w, y.t()).t().contiguous()

    def prefill_attention(self, qkv, k_cache, v_cache, seq_lens, scale, upcast):
        b, t, _ = qkv.shape
        q, k, v = split_heads(qkv, self.n_head)  # [B, H, T, D]
        k_cache[:b, :, :t].copy_(k)  # positions >= seq_lens[b] hold padding; decode overwrites them before reading
        v_cache[:b, :, :t].copy_(v)
        if b == 1:  # right padding + causal: a real query t < len only ever sees keys <= t, all real
            out = self.prefill_attention_separate(q, k, v, scale, upcast)  # [1, T, E]
            return out.masked_fill_((torch.arange(t, device=qkv.device) >= seq_lens[0])[None, :, None], 0)
        # each row alone over exactly its own tokens (torch's SDPA gives a row other bits in a batch or
        # over a padded length than alone, and the engine prefills neighbours together), the padding rows 0
        lens = seq_lens.tolist()  # (a host read; on the CPU, where this backend runs, free)
        out = qkv.new_zeros(b, t, qkv.shape[-1] // 3)
        for r, n in enumerate(lens):
            out[r, :n] = self.prefill_attention_separate(q[r:r + 1, :, :n], k[r:r + 1, :, :n], v[r:r + 1, :, :n],
                                                         scale, upcast)[0]
        return out

    def decode_context(self, cache_lens, s, kv_len, uniform_len=None, row_lens=None):
        """The write positions [B, S], the row index [B, 1] and the visibility mask [B, 1, S, kv_len];
        or, when every sequence holds `uniform_len` tokens (known on the host), just that length; or,
        with row_lens, each row's own length (each row attended alone, over exactly its keys)."""
        b, device = cache_lens.shape[0], cache_lens.device
        if row_lens is not None:
            pos = torch.tensor(row_lens, device=device)[:, None] + torch.arange(s, device=device)  # [B, S]
            return PerRowDecode(tuple(row_lens), pos, torch.arange(b, device=device)[:, None])
        if uniform_len is not None:
            return UniformDecode(uniform_len, s)
        pos = cache_lens[:, None].long() + torch.arange(s, device=device)  # [B, S]
        rows = torch.arange(b, device=device)[:, None]  # [B, 1]
        return RaggedDecode(pos, rows, causal_visible(kv_len, pos)[:, None], kv_len)  # mask [B, 1, S, kv_len]

    def decode_workspace(self, k_cache, batch, s, gemm_shapes, pdl=False):
        if pdl:
            raise BackendError("pdl=True (programmatic dependent launch) is for the Triton backend's kernels; "
                               "the torch backend has none: pass pdl=False")
        return None  # plain torch ops: no scratch of their own

    def decode_attention(self, qkv, k_cache, v_cache, cache_lens, scale, upcast, kv_len, ctx=None, workspace=None):
        b, s, three_e = qkv.shape
        q, k, v = split_heads(qkv, self.n_head)  # [B, H, S, D]
        if ctx is None:
            ctx = self.decode_context(cache_lens, s, kv_len)
        if isinstance(ctx, UniformDecode):  # every sequence at the same length: slices (decode_attention_separate)
            length = ctx.length
            k_cache[:b, :, length : length + s].copy_(k)  # in place at the sequences' length
            v_cache[:b, :, length : length + s].copy_(v)
            return self.decode_attention_separate(q, k_cache[:b], v_cache[:b], length, scale, upcast)
        k_cache[ctx.rows, :, ctx.pos] = k.transpose(1, 2)  # in place at each sequence's own length
        v_cache[ctx.rows, :, ctx.pos] = v.transpose(1, 2)
        if isinstance(ctx, PerRowDecode):  # each row over exactly its keys, neighbours of one length together
            out = torch.empty(b, s, three_e // 3, dtype=qkv.dtype, device=qkv.device)
            start = 0
            for r in range(1, b + 1):  # runs of neighbouring rows of one length: [n, H, S, length + S] each
                if r == b or ctx.lengths[r] != ctx.lengths[start]:
                    rows = slice(start, r)
                    out[rows] = self._exact_attention(q[rows], k_cache[rows], v_cache[rows], ctx.lengths[start],
                                                      scale, upcast)
                    start = r
            return out
        mask, kv_len = ctx.mask, ctx.kv_len
        keys, values = k_cache[:b, :, :kv_len], v_cache[:b, :, :kv_len]  # [B, H, kv_len, D]
        if upcast and q.dtype != torch.float32:
            q, keys, values = q.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        return out.to(qkv.dtype).transpose(1, 2).reshape(b, s, three_e // 3)

    @staticmethod
    def _exact_attention(q, k, v, past_len, scale, upcast):
        """q [n, H, S, D] over keys/values k/v [n, H, >= past+S, D] sliced to exactly past+S: [n, S, E], as
        plain matmuls and softmax, whose rows do not depend on n (torch's fused SDPA gives a row other bits
        in a batch than alone, and over a masked longer range: measured, float32)."""
        n, h, s, d = q.shape
        keys, values = k[:, :, : past_len + s], v[:, :, : past_len + s]
        if upcast and q.dtype != torch.float32:
            q, keys, values = q.float(), keys.float(), values.float()
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale)  # [n, H, S, past+S]
        if s > 1:  # new token j sees the past and new tokens <= j
            scores.masked_fill_(~causal_visible(past_len + s, past_len + torch.arange(s, device=q.device)),
                                float("-inf"))
        out = torch.matmul(scores.softmax(-1), values)  # [n, H, S, D]
        return out.to(k.dtype).transpose(1, 2).reshape(n, s, h * d)

    def prefill_attention_separate(self, q, k, v, scale, upcast):
        b, h, s, d = q.shape
        keys, values = k[:, :, :s], v[:, :, :s]  # a StaticCache's empty slots t >= S are not read
        if upcast and q.dtype != torch.float32:
            q, keys, values = q.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale)  # [B, H, S, D]
        return out.to(k.dtype).transpose(1, 2).reshape(b, s, h * d)

    def decode_attention_separate(self, q, k, v, past_len, scale, upcast, kv_start=None):
        b, h, s, d = q.shape
        keys, values = k[:, :, : past_len + s], v[:, :, : past_len + s]  # [B, H, past+S, D]
        mask = None
        if s > 1:  # new token j sees the past and new tokens <= j
            mask = causal_visible(past_len + s, past_len + torch.arange(s, device=q.device))  # [S, past+S]
        if kv_start is not None:  # and none of the left padding before kv_start[b]
            real = torch.arange(past_len + s, device=q.device)[None, :] >= kv_start[:, None]  # [B, past+S]
            mask = real[:, None, None, :] if mask is None else mask & real[:, None, None, :]  # [B, 1, S, past+S]
        if upcast and q.dtype != torch.float32:
            q, keys, values = q.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # [B, H, S, D]
        return out.to(k.dtype).transpose(1, 2).reshape(b, s, h * d)


def _pdl(workspace) -> bool:
    """Whether a Triton op of a decode step launches with programmatic dependent launch (its
    StepScratch says; no workspace: an eager call, plain launches)."""
    return workspace is not None and workspace.pdl


class TritonOps:
    """The Triton kernels. Imported lazily: whether triton interprets or compiles is fixed when the
    kernel modules are first imported (TRITON_INTERPRET), and importing fastgpt2 must not do it."""

    name = "triton"

    def __init__(self):
        # lazy: importing the kernels fixes triton's mode (TRITON_INTERPRET); only a Triton backend may do it
        from ..kernels import attention, layernorm, linear

        self._attention, self._layernorm, self._linear = attention, layernorm, linear
        self.n_head = None

    def embed_layer_norm(self, ids, start, wte, wpe, weight, bias, eps):
        # the step's first kernel (after a torch op or the graph's start): a plain launch, with or without pdl
        return self._layernorm.embed_layer_norm(ids, start, wte, wpe, weight, bias, eps)

    def layer_norm(self, x, residual, weight, bias, eps):
        return self._layernorm.add_layer_norm(x, residual, weight, bias, eps)

    def prepare_linear(self, w):
        return w

    def prepare_lm_head(self, w):
        """w [V, E] row-major: the embedding kernel gathers whole rows (a column-major table from a
        CPU float32 torch model is copied once, here)."""
        return w.contiguous()

    def linear(self, x, w, b, activation="none", residual=None, workspace=None):
        return self._linear.linear(x, w, b, activation=activation, residual=residual,
                                   workspace=workspace.gemm if workspace is not None else None, pdl=_pdl(workspace))

    def linear_norm(self, x, w, b, residual, weight, bias, eps, workspace=None):
        # one kernel: the GEMM, its residual epilogue, then the layernorm of the rows (linear.linear_norm)
        return self._linear.linear_norm(x, w, b, residual, weight, bias, eps,
                                        workspace=workspace.gemm if workspace is not None else None,
                                        pdl=_pdl(workspace))

    def lm_head(self, y, w, workspace=None):
        # [N, V]: the GEMM kernel reads the [V, E] table as it is ([N, K] layout, no bias)
        return self._linear.linear(y, w, None, w_layout="nk", workspace=workspace.gemm if workspace is not None else None,
                                   pdl=_pdl(workspace))

    def prefill_attention(self, qkv, k_cache, v_cache, seq_lens, scale, upcast):
        # scores and softmax are always fp32 in the kernel, which is what upcast asks for
        return self._attention.prefill_attention(qkv, k_cache, v_cache, seq_lens, scale)

    def decode_context(self, cache_lens, s, kv_len, uniform_len=None, row_lens=None):
        return None  # the kernel reads the lengths on the device (each row's programs its own)

    def decode_workspace(self, k_cache, batch, s, gemm_shapes, pdl=False):
        return StepScratch(self._attention.decode_workspace(k_cache, batch, s),
                           self._linear.gemm_workspace(gemm_shapes, k_cache.dtype, k_cache.device), pdl)

    def decode_attention(self, qkv, k_cache, v_cache, cache_lens, scale, upcast, kv_len, ctx=None, workspace=None):
        return self._attention.decode_attention(qkv, k_cache, v_cache, cache_lens, scale,
                                                workspace=workspace.attention if workspace is not None else None,
                                                pdl=_pdl(workspace))

    def prefill_attention_separate(self, q, k, v, scale, upcast):
        return self._attention.prefill_attention_separate(q, k, v, scale)

    def decode_attention_separate(self, q, k, v, past_len, scale, upcast, kv_start=None):
        return self._attention.decode_attention_separate(q, k, v, past_len, scale, kv_start=kv_start)
