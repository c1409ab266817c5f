"""The decode step with static shapes, and its CUDA-graph capture and replay.

A `DecodeStep` owns static buffers: `tokens` [B] (the last chosen tokens: the step's input, and
its output, overwritten in place) and the cache (K/V written in place, `lengths` [B] on the device,
incremented in place). One call runs embed -> layers -> ln_f -> lm_head -> next-token choice with
no host sync. On CUDA the step is captured once (after one warm-up run on a side stream, which
compiles the Triton kernels) into a CUDA graph with a private memory pool and replayed; on the CPU
(or with use_cuda_graph=False) the same body runs eagerly. The next-token choice is
runtime/sampling.py's.
"""
from __future__ import annotations

import torch

from ..errors import FastGPT2Error
from .kv_cache import KVCache
from .sampling import Sampling, TokenChooser


class GraphError(FastGPT2Error):
    """A CUDA-graph request that cannot be served."""


def resolve_use_cuda_graph(use_cuda_graph: bool | None, device: torch.device) -> bool:
    """None: graphed on CUDA, eager elsewhere; True where there is no CUDA device is an error."""
    if use_cuda_graph is None:
        return device.type == "cuda"
    if use_cuda_graph and device.type != "cuda":
        raise GraphError(f"use_cuda_graph=True needs a CUDA device; this model is on {device}")
    return use_cuda_graph


class DecodeStep:
    def __init__(self, model, cache: KVCache, sampling: Sampling = Sampling(), seed: int | None = None,
                 use_cuda_graph: bool | None = None, batch: int | None = None, pdl: bool | None = None):
        """pdl: launch the step's GEMM and attention kernels with programmatic dependent launch
        (sm_90+; see ``GPT2Network``); None: the model's own setting (``model.pdl``)."""
        device = model.device
        use_cuda_graph = resolve_use_cuda_graph(use_cuda_graph, device)
        self.model, self.cache, self.sampling = model, cache, sampling
        self.batch = batch or cache.batch
        self.use_cuda_graph = use_cuda_graph
        self.pdl = model.pdl if pdl is None else pdl
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=device)  # [B] in and out
        self.logits = None  # [B, V] of the last step (a static buffer once graphed)
        self.choose = TokenChooser(sampling, self.batch, device, seed)
        # the kernels' scratch (split partials, arrival counters), made here: nothing is allocated inside a capture
        self.workspace = model.decode_workspace(cache, self.batch, 1, pdl=self.pdl)
        self.graph = None
        self.pool = None

    def _body(self) -> torch.Tensor:
        # On CUDA, eager or graphed, the step is static: the whole cache (kv_len = max_len), lengths read
        # on the device, no host-side shortcut; so a graph replays exactly the work of the eager step and
        # the two agree bit for bit by construction. On the CPU the eager step slices the cache to the
        # host's length bound (and takes the uniform-length path): the same math over fewer keys, faster.
        if self.use_cuda_graph or self.cache.k.device.type == "cuda":
            logits = self.model._decode_logits(self.tokens[:, None], self.cache, self.cache.max_len,
                                               workspace=self.workspace)
        else:
            cache = self.cache
            logits = self.model._decode_logits(self.tokens[:, None], cache, cache.host_max_len + 1, cache.host_uniform_len,
                                               self.workspace)
        self.choose(logits, self.tokens)
        return logits

    # -- host side --------------------------------------------------------------------------
    def reseed(self, seed: int | None) -> None:
        self.choose.reseed(seed)

    def start(self, prefill_logits: torch.Tensor) -> torch.Tensor:
        """Choose the first new tokens from the prefill's last-token logits [B, V]."""
        self.choose(prefill_logits, self.tokens)
        self.logits = prefill_logits
        return self.tokens

    def __call__(self) -> torch.Tensor:
        """One decode step: feeds self.tokens, leaves the next tokens in self.tokens."""
        self.cache.reserve(1, self.batch)
        if not self.use_cuda_graph:
            self.logits = self._body()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.cache.advance(1)
        return self.tokens

    def _capture(self) -> None:
        device = self.model.device
        generator = self.choose.generator
        saved_lengths, saved_tokens = self.cache.lengths.clone(), self.tokens.clone()
        saved_rng = generator.get_state() if generator is not None else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles here, never inside the capture
            self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        # undo the warm-up (its K/V writes sit at positions the real step overwrites before reading)
        self.cache.lengths.copy_(saved_lengths)
        self.tokens.copy_(saved_tokens)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise GraphError("this torch cannot capture a seeded generator in a CUDA graph; "
                                 "pass use_cuda_graph=False to sample eagerly")
            generator.set_state(saved_rng)
            graph.register_generator_state(generator)
        self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits = self._body()
        torch.cuda.synchronize(device)
        self.graph = graph


def graph_cache_len(needed: int, n_positions: int) -> int:
    """Cache length of a graphed step: the next power of two >= needed (so graphs are reused
    across prompt lengths), at most n_positions."""
    length = 16
    while length < needed:
        length *= 2
    return min(length, n_positions)


class GraphPool:
    """A model's decode steps, each with its own cache, token buffer and (graphed) CUDA graph, by
    bucket: (batch, cache length, sampling, graphed, dtype, device). A step is leased to one stream
    at a time: ``lease`` hands out an idle step of the bucket, or builds a new one when none is idle
    (so a second concurrent stream of the same bucket gets its own step, never a shared one);
    ``release`` returns it. At most `max_idle` idle steps are kept (the least recently used is
    dropped); leased steps are the streams' own and are not counted."""

    def __init__(self, model, max_idle: int = 8):
        self.model = model
        self.max_idle = max_idle
        self.idle: dict[tuple, list[DecodeStep]] = {}  # bucket -> idle steps; most recently used bucket last
        self.leased: dict[int, tuple] = {}  # id(step) -> its bucket

    def bucket(self, batch: int, needed_len: int, sampling: Sampling, use_cuda_graph: bool) -> tuple:
        return (batch, graph_cache_len(needed_len, self.model.config.n_positions), sampling, use_cuda_graph,
                self.model.dtype, str(self.model.device))

    def lease(self, batch: int, needed_len: int, sampling: Sampling, seed: int | None,
              use_cuda_graph: bool = True) -> DecodeStep:
        key = self.bucket(batch, needed_len, sampling, use_cuda_graph)
        free = self.idle.pop(key, [])
        if free:
            step = free.pop()
            step.reseed(seed)
            if free:
                self.idle[key] = free
        else:
            cache = KVCache(self.model.config, batch, key[1], self.model.dtype, self.model.device)
            step = DecodeStep(self.model, cache, sampling, seed, use_cuda_graph=use_cuda_graph)
        self.leased[id(step)] = key
        return step

    def release(self, step: DecodeStep) -> None:
        """Return a leased step to its bucket's idle list."""
        key = self.leased.pop(id(step), None)
        if key is None:
            raise GraphError("this decode step is not leased from this pool (released twice?)")
        self.idle.setdefault(key, []).append(step)
        self.idle[key] = self.idle.pop(key)  # most recently used bucket last
        while sum(len(v) for v in self.idle.values()) > self.max_idle:
            oldest = next(iter(self.idle))
            self.idle[oldest].pop(0)
            if not self.idle[oldest]:
                del self.idle[oldest]
