"""The engine: continuous batching over one preallocated cache, each request with its own sampling.

    engine = Engine(model, max_batch=8)
    a = engine.add([464, 3290], max_new_tokens=32)                         # greedy
    b = engine.add(ids, max_new_tokens=64, sampling=Sampling(True, 0.8, 50, 0.95), seed=1,
                   stop_token_ids=[50256])
    while engine.busy:
        for request, token in engine.step():                             # one new token per running request
            ...
    a.tokens, a.finish_reason                                            # [ids], "length" | "stop" | "cancelled"

The engine owns the KV cache as `max_batch` slots of `max_len` positions, the per-slot lengths on
the device, the decode step's scratch and each slot's sampling parameters (``RowSampler``: device
tensors, so a step serves any mix of greedy and sampled requests). A request waits in a queue until
a slot is free; ``step`` first decodes one token for every running request (one step over all
slots: a fixed shape, so a request's tokens are the same whatever runs beside it), then prefills
waiting requests into free slots (each prompt alone) and emits their first token. A request that
stops (a stop token, its max_new_tokens, or ``cancel``) frees its slot at once, for the next step.

On CUDA the decode step (embed -> layers -> lm_head -> every slot's next token -> idle slots
emptied) is captured in a CUDA graph after a warm-up run, one graph per sampling variant (all greedy;
some sampled; some sampled with top-k/top-p: ``RowSampler.variant``), never per setting: the settings
are device tensors the graph reads. Replay equals the eager step. ``GPT2.generate`` / ``stream``
still run on the graphed decode steps of runtime/graphs.py.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .graphs import GraphError, graph_cache_len, resolve_use_cuda_graph
from .kv_cache import CacheError
from .model import GPT2Network, InputError
from .sampling import RowSampler, Sampling


@dataclass(eq=False)
class Request:
    """A request's handle: its prompt, its new tokens so far and, once finished, why."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    stop_token_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # the new tokens, in order
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    slot: int | None = None  # the cache slot while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, model: GPT2Network, max_batch: int = 8, max_len: int | None = None,
                 use_cuda_graph: bool | None = None):
        """max_batch: slots (requests decoding at once); max_len: positions per slot (prompt + new
        tokens), at most the model's n_positions (default); use_cuda_graph: replay the decode step
        from CUDA graphs (default: True on CUDA; an error elsewhere)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model
        self.cache = model.new_cache(max_batch, max_len)  # [L, slots, H, max_len, D]; CacheError past n_positions
        self.max_batch, self.max_len = max_batch, self.cache.max_len
        device = model.device
        self.sampler = RowSampler(max_batch, model.config.vocab_size, device)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=device)  # [slots] each slot's last token
        self.active = torch.zeros(max_batch, dtype=torch.bool, device=device)  # [slots] decoding now
        self.workspace = model.decode_workspace(self.cache, max_batch, 1)  # the kernels' scratch, made once
        self.use_cuda_graph = resolve_use_cuda_graph(use_cuda_graph, device)
        self.graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}  # sampling variant -> its captured step
        self._pool = None  # the graphs' shared memory pool
        self.slots: list[Request | None] = [None] * max_batch
        self.queue: deque[Request] = deque()
        self._ids = itertools.count()

    # -- requests ----------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
            seed: int | None = None, stop_token_ids: Sequence[int] = ()) -> Request:
        """Queue a request; its first token comes from the step that admits it. seed: a sampled
        request's seed (None: a fresh one); the same seed and settings give the same tokens."""
        prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise InputError("a request needs at least one prompt token")
        if any(not 0 <= t < vocab for t in prompt) or any(not 0 <= int(t) < vocab for t in stop_token_ids):
            raise InputError(f"token ids must be in this model's vocabulary [0, {vocab})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.max_len:
            raise CacheError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) is "
                f"{len(prompt) + max_new_tokens}, past the engine's {self.max_len} positions per slot; shorten the "
                f"prompt, generate fewer tokens or build the engine with a larger max_len (at most n_positions)")
        sampling.check()
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        request = Request(next(self._ids), prompt, max_new_tokens, sampling, int(seed), frozenset(map(int, stop_token_ids)))
        self.queue.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now: its slot (or its place in the queue) is free for the next step."""
        if request.finished:
            return
        if request.slot is None:
            self.queue.remove(request)
            request.finish_reason = "cancelled"
        else:
            self._finish(request, "cancelled")

    @property
    def busy(self) -> bool:
        """Whether a step has work: running or waiting requests."""
        return bool(self.queue) or any(r is not None for r in self.slots)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, int]]:
        """One token for every running request (a decode step over all slots), then the first token of
        each waiting request that a free slot admits (its prompt prefilled alone). Returns (request,
        token) in that order; finished requests have left their slots."""
        out: list[tuple[Request, int]] = []
        running = [r for r in self.slots if r is not None]
        if running:
            if self.use_cuda_graph:
                variant = self.sampler.variant()
                graph = self.graphs.get(variant) or self._capture(variant)
                graph.replay()
            else:  # eager: attend over a power-of-two bound of the longest running sequence, not the whole cache
                longest = max(len(r.prompt) + len(r.tokens) for r in running)  # its length after this step
                self._decode(graph_cache_len(longest, self.max_len))
            chosen = self.tokens.tolist()  # the step's one host sync
            for request in running:
                out.append((request, chosen[request.slot]))
                self._emit(request, chosen[request.slot])
        while self.queue and None in self.slots:
            request = self.queue.popleft()
            slot = self.slots.index(None)
            token = self._prefill(request, slot)
            out.append((request, token))
            self._emit(request, token)
        return out

    def _decode(self, kv_len: int | None = None) -> None:
        """The device work of a decode step over every slot, no host sync (what a graph captures, over
        the whole cache: kv_len None). kv_len: a bound >= every slot's length after the step (the torch
        backend attends over that many positions; the kernels read the lengths on the device)."""
        kv_len = self.max_len if kv_len is None else kv_len
        logits = self.model._decode_logits(self.tokens[:, None], self.cache, kv_len, None, self.workspace)
        self.sampler(logits, self.tokens)  # [slots]: every slot's next token (idle slots' are ignored)
        self.cache.lengths.masked_fill_(~self.active, 0)  # idle slots stay empty, never past their end

    def _capture(self, variant: tuple[bool, bool]):
        """Capture the decode step of this sampling variant, after a warm-up run on a side stream (Triton
        compiles there, never inside the capture) whose effects are undone."""
        device = self.model.device
        state = [t.clone() for t in (self.cache.lengths, self.tokens, self.sampler.draws)]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._decode()
        torch.cuda.current_stream(device).wait_stream(side)
        for live, saved in zip((self.cache.lengths, self.tokens, self.sampler.draws), state):
            live.copy_(saved)  # (its K/V writes sit where the real step writes before it reads)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self._decode()
        except RuntimeError as exc:
            raise GraphError(f"capturing the engine's decode step failed ({exc}); Engine(..., use_cuda_graph=False) "
                             f"runs it eagerly") from exc
        torch.cuda.synchronize(device)
        self.graphs[variant] = graph
        return graph

    def _prefill(self, request: Request, slot: int) -> int:
        """Prefill the request's prompt into `slot` (alone: [1, T]) and choose its first token."""
        self.slots[slot], request.slot = request, slot
        self.sampler.set_row(slot, request.sampling, request.seed)
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.model.device)  # [1, T]
        lens = torch.tensor([len(request.prompt)], dtype=torch.int32, device=self.model.device)
        logits = self.model.prefill(ids, lens, self.cache.rows(slot, slot + 1))  # [1, V]
        rows = slice(slot, slot + 1)
        self.sampler(logits, self.tokens[rows], rows)
        self.active[slot] = True
        return int(self.tokens[slot])

    def _emit(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        if token in request.stop_token_ids:
            self._finish(request, "stop")
        elif len(request.tokens) == request.max_new_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        slot = request.slot
        request.finish_reason, request.slot = reason, None
        self.slots[slot] = None
        self.active[slot] = False
        self.cache.lengths[slot] = 0
        self.sampler.set_row(slot, Sampling(), 0)  # an idle slot draws nothing
