"""The GPT-2 network: embeddings, n_layer pre-LN blocks, ln_f and the tied lm_head, with every op
going through one backend (runtime/ops.py). Prefill, decode and the full forward; no generation
(runtime/generate.py builds ``fastgpt2.GPT2`` on top of this class).

The ops a step runs, in order, with their GEMMs, weights and fusions, are the step's plan
(runtime/plan.py); ``_blocks`` runs them (tests/runtime/test_plan.py checks that it runs exactly those).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FastGPT2Error
from ..kernels.contract import DTYPE_NAMES
from . import plan
from .config import GPT2Config
from .kv_cache import KVCache
from .loader import BLOCK_WEIGHTS, expected_shapes, load_checkpoint, read_hf_model
from .ops import make_ops, resolve_backend, resolve_pdl



class InputError(FastGPT2Error):
    """Bad input ids, masks or generation arguments, named with the fix."""


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this torch build sees no CUDA device")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        dtype = DTYPE_NAMES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


@dataclass(frozen=True)
class LayerWeights:
    ln_1_w: torch.Tensor  # [E]
    ln_1_b: torch.Tensor  # [E]
    qkv_w: torch.Tensor  # [E, 3E] Conv1D (in, out), as ops.prepare_linear made it
    qkv_b: torch.Tensor  # [3E]
    attn_proj_w: torch.Tensor  # [E, E]
    attn_proj_b: torch.Tensor  # [E]
    ln_2_w: torch.Tensor  # [E]
    ln_2_b: torch.Tensor  # [E]
    fc_w: torch.Tensor  # [E, I]
    fc_b: torch.Tensor  # [I]
    mlp_proj_w: torch.Tensor  # [I, E]
    mlp_proj_b: torch.Tensor  # [E]
    scale: float  # softmax scale of this layer


# LayerWeights field -> checkpoint key under h.{i}. (loader.BLOCK_WEIGHTS); the GEMM weights go through
# ops.prepare_linear
_LAYER_KEYS = {bw.field: bw.key for bw in BLOCK_WEIGHTS}
_GEMM_FIELDS = tuple(bw.field for bw in BLOCK_WEIGHTS if bw.gemm)


class GPT2Network:
    """The GPT-2 network on fastgpt2's backends. Inference only; weights are plain tensors.
    ``fastgpt2.GPT2`` (runtime/generate.py) is this class plus generation."""

    def __init__(self, cfg: GPT2Config, weights: dict[str, torch.Tensor], device=None, dtype=None, backend="auto",
                 pack_weights: bool = True, pdl: bool = False):
        """pack_weights=False: the backend uses `weights` as they are, never a repacked copy (for
        weights shared with another live model, whose in-place updates must be seen). pdl: the
        decode steps (the engine's, so generate/stream) launch their GEMM and attention kernels
        with programmatic dependent launch (Triton backend on a CUDA GPU of compute capability
        9.0+, else a BackendError): each may be scheduled while the kernel before it finishes."""
        self.config = cfg
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.backend = resolve_backend(backend, self.device)
        self.pdl = resolve_pdl(pdl, self.backend, self.device)
        self.ops = make_ops(self.backend, self.device, self.dtype, cfg.n_head, pack_weights)
        self.weights = {k: w.to(device=self.device, dtype=self.dtype) for k, w in weights.items()}
        w = self.weights
        head = "wte.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        w[head] = self.ops.prepare_lm_head(w[head])  # [V, E], maybe column-major; tied: the embedding too
        self.wte, self.wpe = w["wte.weight"], w["wpe.weight"]  # [V, E], [P, E]
        self.ln_f = (w["ln_f.weight"], w["ln_f.bias"])
        self.lm_head = w[head]  # [V, E]
        self.layers = [
            LayerWeights(**{field: self.ops.prepare_linear(w[f"h.{i}.{key}"]) if field in _GEMM_FIELDS
                            else w[f"h.{i}.{key}"] for field, key in _LAYER_KEYS.items()},
                         scale=cfg.attn_scale(i))
            for i in range(cfg.n_layer)
        ]
        # nothing held twice: a GEMM weight the backend prepared into storage of its own replaces the plain
        # tensor (a column-major [K, N] view holds the same values; a oneDNN-packed one is no [K, N] tensor:
        # plain_weights() recovers its values)
        for i, lw in enumerate(self.layers):
            for field in _GEMM_FIELDS:
                key, prepared = f"h.{i}.{_LAYER_KEYS[field]}", getattr(lw, field)
                if prepared is not w[key]:
                    if prepared.is_mkldnn:
                        del w[key]
                    else:
                        w[key] = prepared
        # the layernorm that follows layer i's MLP: layer i+1's ln_1, ln_f after the last
        self.next_norm = [(lw.ln_1_w, lw.ln_1_b) for lw in self.layers[1:]] + [self.ln_f]

    def plain_weights(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor by its key (without ``transformer.``), GEMM weights as [K, N] tensors:
        ``weights``, plus the values of each oneDNN-packed GEMM weight recovered by one product with the
        identity (exact: every term but one is a zero). For another model or transformers on the same
        values; the packed ones are copies."""
        out, shapes = dict(self.weights), expected_shapes(self.config)
        for i, lw in enumerate(self.layers):
            for field in _GEMM_FIELDS:
                key = f"h.{i}.{_LAYER_KEYS[field]}"
                if key not in out:
                    k, n = shapes[key]  # [K, N]
                    eye = torch.eye(k, dtype=self.dtype, device=self.device)
                    out[key] = self.ops.linear(eye, getattr(lw, field), torch.zeros(n, dtype=self.dtype,
                                                                                     device=self.device))
        return out

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: GPT2Config, device=None, dtype=None, backend="auto", seed: int = 0, pdl: bool = False):
        """Seeded random weights (N(0, 0.02), layernorm gains near 1): for benchmarks and tests."""
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for key, shape in expected_shapes(cfg).items():
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            value = torch.randn(shape, generator=gen) * 0.02
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                value += 1.0
            elif key.endswith("c_proj.weight"):
                value /= math.sqrt(2 * cfg.n_layer)
            weights[key] = value
        return cls(cfg, weights, device=device, dtype=dtype, backend=backend, pdl=pdl)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device=None, dtype=None, backend="auto", revision=None,
                        pdl: bool = False):
        """A transformers GPT-2 checkpoint: a local directory or a hub id (through the hub cache)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        resolve_pdl(pdl, resolve_backend(backend, device), device)  # fail before reading gigabytes
        cfg, weights, directory = load_checkpoint(name_or_path, dtype=dtype, device=device, revision=revision)
        model = cls(cfg, weights, device=device, dtype=dtype, backend=backend, pdl=pdl)
        model.source_dir = directory
        return model

    @classmethod
    def from_hf(cls, hf_model, backend="auto", pdl: bool = False):
        """A fastgpt2 model (its own cache, generation, CUDA graphs) sharing the weights of a live
        transformers GPT2LMHeadModel or GPT2Model: no parameter is copied (same storage; the model
        runs on the parameters' device and dtype, and never packs a copy, so that in-place updates
        of the transformers model are seen)."""
        cfg, weights = read_hf_model(hf_model)
        first = weights["wte.weight"]
        return cls(cfg, weights, device=first.device, dtype=first.dtype, backend=backend, pack_weights=False, pdl=pdl)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.n_positions, self.dtype, self.device)

    # -- the network ---------------------------------------------------------------------------
    def _blocks(self, ids: torch.Tensor, start: torch.Tensor | None, attend, workspace=None) -> torch.Tensor:
        """ids [B, S] -> ln_f(final residual stream) [B*S, E]. Row b's positions are start[b] + s
        (start [B] int32 on the device), or s when start is None. attend(layer, scale, qkv [B, S, 3E])
        -> [B, S, E]. workspace: a decode step's ``decode_workspace`` (None: each op allocates its own).
        Five ops per layer: QKV, attention, attention-out + residual + ln_2, MLP up + activation,
        MLP down + residual + the next layernorm (layer i+1's ln_1, or ln_f)."""
        ops, eps, b, s = self.ops, self.config.layer_norm_epsilon, *ids.shape
        first = self.layers[0]
        a, h = ops.embed_layer_norm(ids, start, self.wte, self.wpe, first.ln_1_w, first.ln_1_b, eps)  # [M, E]
        for i, lw in enumerate(self.layers):
            qkv = ops.linear(a, lw.qkv_w, lw.qkv_b, workspace=workspace)  # [M, 3E]
            att = attend(i, lw.scale, qkv.view(b, s, -1)).view(b * s, -1)  # [M, E]
            m, h = ops.linear_norm(att, lw.attn_proj_w, lw.attn_proj_b, h, lw.ln_2_w, lw.ln_2_b, eps, workspace)
            f = ops.linear(m, lw.fc_w, lw.fc_b, activation=self.config.activation, workspace=workspace)  # [M, I]
            norm_w, norm_b = self.next_norm[i]
            a, h = ops.linear_norm(f, lw.mlp_proj_w, lw.mlp_proj_b, h, norm_w, norm_b, eps, workspace)  # [M, E]
        return a

    def _logits(self, y: torch.Tensor, workspace=None) -> torch.Tensor:
        """y [N, E] (after ln_f) -> logits [N, V] through the (tied) lm_head."""
        return self.ops.lm_head(y, self.lm_head, workspace)

    def decode_gemm_shapes(self, batch: int, s: int) -> list[tuple[int, int, int]]:
        """(M, N, K) of every GEMM of a decode step of `batch` sequences of s new tokens, from the step's
        plan (runtime/plan.py): QKV, attention out, MLP up, MLP down, the lm_head."""
        return plan.gemm_shapes(self.config, batch, s)

    def decode_workspace(self, cache: KVCache, batch: int, s: int, pdl: bool = False):
        """The scratch of a decode step (``ops.decode_workspace``), made once, before a capture; pdl: its
        kernels launch with programmatic dependent launch (checked against this model by ``resolve_pdl``)."""
        if pdl is not self.pdl:  # self.pdl was checked when the model was made
            pdl = resolve_pdl(pdl, self.backend, self.device)
        return self.ops.decode_workspace(cache.k[0], batch, s, self.decode_gemm_shapes(batch, s), pdl)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, seq_lens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Start sequences in `cache`: ids [B, T] right-padded (row b's tokens are ids[b, :seq_lens[b]],
        positions 0..len-1); seq_lens [B] int32 on the device. Returns the logits of each row's last
        token [B, V] and sets cache.lengths to seq_lens."""
        b, t = ids.shape
        cache.reset()
        cache.reserve(t, b)
        upcast = self.config.reorder_and_upcast_attn

        def attend(i, scale, qkv):
            return self.ops.prefill_attention(qkv, cache.k[i], cache.v[i], seq_lens, scale, upcast)

        h = self._blocks(ids, None, attend)  # [B*T, E], after ln_f
        last = torch.arange(b, device=self.device) * t + seq_lens.long() - 1  # [B]
        cache.lengths[:b].copy_(seq_lens)
        cache.advance(t)
        if self.device.type == "cpu" and b == cache.batch and bool((seq_lens == t).all()):
            cache.host_uniform_len = t  # (read on the CPU only: on CUDA it would cost a sync)
        return self._logits(h[last])

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: ids [B, S] (S new tokens per sequence, S <= 8) appended at each sequence's
        length. Returns the logits of the last new token [B, V]; cache.lengths grows by S in place."""
        s = ids.shape[1]
        cache.reserve(s, ids.shape[0])
        logits = self._decode_logits(ids, cache, cache.host_max_len + s, cache.host_uniform_len)  # scratch per call
        cache.advance(s)
        return logits

    def _decode_logits(self, ids: torch.Tensor, cache: KVCache, kv_len: int, uniform_len: int | None = None,
                       workspace=None, advance: torch.Tensor | None = None, row_lens: tuple[int, ...] | None = None):
        """The device work of a decode step, no host bookkeeping and no host sync (a CUDA graph
        captures exactly this). kv_len: a host bound >= every length + S (the torch path slices the
        cache to it; a captured step passes the cache's max_len). uniform_len: every sequence's
        length when they are known to be equal (None in a captured step). workspace: the attention's
        scratch from ``decode_workspace`` (a captured step allocates it before the capture; None:
        allocated per call). advance: what each length grows by, [B] int32 on the device (the engine's
        S for a running slot, 0 for an idle one, which so stays empty); None: S for every sequence.
        row_lens: every sequence's length, known on the host, to attend each row alone (the engine's CPU
        step: a row's bits must not depend on its neighbours; ``ops.decode_context``)."""
        b, s = ids.shape
        lengths = cache.lengths[:b]
        upcast = self.config.reorder_and_upcast_attn
        ctx = self.ops.decode_context(lengths, s, kv_len, uniform_len, row_lens)  # once per step, for every layer

        def attend(i, scale, qkv):
            return self.ops.decode_attention(qkv, cache.k[i], cache.v[i], lengths, scale, upcast, kv_len, ctx,
                                             workspace)

        with torch.inference_mode():
            h = self._blocks(ids, lengths, attend, workspace)  # [B*S, E], after ln_f; positions from lengths
            lengths += s if advance is None else advance
            return self._logits(h.view(b, s, -1)[:, -1], workspace)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward without a cache: logits [B, T, V]. attention_mask (1 = token, 0 = padding)
        may pad on the left or the right; each row's tokens take positions from 0, and the logits
        of padding positions are 0."""
        ids, starts, lens = prepare_batch(self, input_ids, attention_mask)
        b, t = ids.shape
        seq_lens = lens.to(device=self.device, dtype=torch.int32)
        # one layer's K/V scratch, reused by every layer: [B, H, T, D]
        scratch = torch.empty(2, b, self.config.n_head, t, self.config.head_dim, dtype=self.dtype, device=self.device)
        upcast = self.config.reorder_and_upcast_attn

        def attend(i, scale, qkv):
            return self.ops.prefill_attention(qkv, scratch[0], scratch[1], seq_lens, scale, upcast)

        aligned = self._logits(self._blocks(ids, None, attend)).view(b, t, -1)  # [B, T, V], row b at 0..len-1
        if bool((starts == 0).all()):
            return aligned.masked_fill_(~_valid(lens, t, self.device)[:, :, None], 0)
        out = torch.zeros_like(aligned)
        src = torch.arange(t)[None, :]
        valid = _valid(lens, t, "cpu")  # [B, T] host
        rows = torch.arange(b)[:, None].expand(b, t)[valid]
        out[rows, (starts[:, None] + src)[valid]] = aligned[rows, src.expand(b, t)[valid]]
        return out

    __call__ = forward

    def __repr__(self) -> str:
        c = self.config
        cpu_path = getattr(self.ops, "cpu_path", None)  # the torch backend's CPU GEMM path, e.g. "bf16: addmm (AVX2)"
        return (
            f"GPT2(n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, vocab={c.vocab_size}, "
            f"device={self.device}, dtype={self.dtype}, backend={self.backend!r}" + (", pdl=True" if self.pdl else "")
            + (f", cpu_path={cpu_path.name!r})" if cpu_path is not None else ")")
        )


def _valid(lens: torch.Tensor, t: int, device) -> torch.Tensor:
    """[B, T] bool on `device`: position t of row b holds one of its lens[b] tokens (lens: host)."""
    return (torch.arange(t)[None, :] < lens[:, None]).to(device)


def prepare_batch(model: GPT2Network, input_ids, attention_mask, *, require_left_padding: bool = False):
    """Check a batch and align each row's tokens to start at 0 (right padding), as the cache keeps them.

    Returns (ids [B, T] on the model's device, right-padded with token 0; starts [B] and lens [B]
    as host int64 tensors: row b's tokens were input_ids[b, starts[b] : starts[b] + lens[b]])."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    b, t = input_ids.shape
    if b == 0 or t == 0:
        raise InputError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token per row")
    if t > model.config.n_positions:
        raise InputError(f"input_ids has {t} positions; this model covers at most n_positions={model.config.n_positions}")
    ids_host = input_ids.detach().to("cpu", torch.int64)
    if attention_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool)
    else:
        mask = torch.as_tensor(attention_mask).detach().to("cpu")
        if tuple(mask.shape) != (b, t):
            raise InputError(f"attention_mask has shape {tuple(mask.shape)}, expected {(b, t)} like input_ids")
        if not ((mask == 0) | (mask == 1)).all():
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = mask.bool()
    lens = mask.sum(1)
    if (lens == 0).any():
        row = int((lens == 0).nonzero()[0])
        raise InputError(f"empty prompt: row {row} of attention_mask has no tokens; give at least one token per row")
    starts = mask.int().argmax(1)
    # one run: the lens positions from the first 1 on hold all of the row's 1s
    contiguous = mask.int().cumsum(1).gather(1, (starts + lens - 1)[:, None]).squeeze(1) == lens
    if not contiguous.all():
        raise InputError("attention_mask must be one run of 1s per row (padding only on the left or the right)")
    if require_left_padding and not (starts + lens == t).all():
        row = int((starts + lens != t).nonzero()[0])
        raise InputError(
            f"attention_mask row {row} is padded on the right; generation needs left padding "
            "(tokenizer.padding_side = 'left'), so that every prompt ends at the last column"
        )
    src = (starts[:, None] + torch.arange(t)).clamp(max=t - 1)
    aligned = ids_host.gather(1, src)
    valid = _valid(lens, t, "cpu")
    bad = valid & ((aligned < 0) | (aligned >= model.config.vocab_size))
    if bad.any():
        value = int(aligned[bad][0])
        raise InputError(
            f"input_ids hold token id {value}, outside the vocabulary [0, {model.config.vocab_size}) of this model"
        )
    aligned = aligned.masked_fill(~valid, 0)
    return aligned.to(model.device), starts, lens
