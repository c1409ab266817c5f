"""The preallocated KV cache: allocated once, written in place, per-sequence lengths on the device."""
from __future__ import annotations

from ..errors import FastGPT2Error

import torch

from .config import GPT2Config


class CacheError(FastGPT2Error):
    """A cache request that cannot be served (too long, too wide), raised before any compute."""


class KVCache:
    """K and V for every layer: ``k``/``v`` are [n_layer, batch, n_head, max_len, head_dim] in the
    model dtype. ``lengths`` [batch] int32 on the device counts the tokens stored per sequence;
    sequence b's tokens sit at positions 0..lengths[b]-1 (its positions count from 0, whatever
    padding the caller's batch had); every other position holds zeros or K/V written earlier,
    always finite values. ``host_max_len`` is a host-side upper bound on lengths, kept
    so that overflow is caught before compute without reading the device."""

    def __init__(self, cfg: GPT2Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        if batch < 1:
            raise CacheError(f"cache batch must be >= 1, got {batch}")
        if not 1 <= max_len <= cfg.n_positions:
            raise CacheError(
                f"cache length {max_len} is out of range: it must be between 1 and the model's "
                f"n_positions ({cfg.n_positions}), the longest sequence GPT-2's position table covers"
            )
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        # zeros, not empty: the torch backend's ragged decode reads every position up to the longest
        # sequence and masks the rest, and a masked position still meets the math (0 * NaN = NaN in
        # P @ V, NaN scores): what no sequence has written yet must be finite, never stale heap bytes
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, T_max, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, T_max, D]
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)  # [B]
        self.batch = batch
        self.max_len = max_len
        self.host_max_len = 0
        self.host_uniform_len = None  # when every sequence is known (on the host) to hold this many tokens

    def rows(self, start: int, stop: int) -> "KVCache":
        """Sequences start..stop-1 as a cache of their own: the same memory (K/V and lengths are
        views), its own host bookkeeping. The engine prefills a request into its slot through it."""
        if not 0 <= start < stop <= self.batch:
            raise CacheError(f"rows {start}..{stop - 1} are not rows of this cache of batch {self.batch}")
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]  # [L, stop-start, H, T_max, D]
        view.lengths = self.lengths[start:stop]
        view.batch, view.max_len = stop - start, self.max_len
        view.host_max_len, view.host_uniform_len = 0, None
        return view

    def reset(self) -> None:
        """Forget every sequence (the memory is kept)."""
        self.lengths.zero_()
        self.host_max_len = 0
        self.host_uniform_len = None

    def reserve(self, new_tokens: int, batch: int) -> None:
        """Check that `new_tokens` more per sequence fit, before any compute touches the cache."""
        if batch > self.batch:
            raise CacheError(f"batch {batch} is larger than the cache's batch {self.batch}; allocate a larger cache")
        if self.host_max_len + new_tokens > self.max_len:
            raise CacheError(
                f"the cache holds up to {self.max_len} tokens per sequence; {self.host_max_len} are used and "
                f"{new_tokens} more were asked for. Allocate a longer cache (at most n_positions) or generate fewer tokens"
            )

    def advance(self, new_tokens: int) -> None:
        """Record (on the host) that each sequence grew by `new_tokens`; lengths are updated by the model."""
        self.host_max_len += new_tokens
        if self.host_uniform_len is not None:
            self.host_uniform_len += new_tokens
