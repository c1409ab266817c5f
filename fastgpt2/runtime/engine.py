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
a slot is free; ``step`` first decodes one token for every running request, then prefills waiting
requests into free slots (those that land in neighbouring slots as one ragged batch) and emits their
first token. A request that stops (a stop token, its max_new_tokens, or ``cancel``) frees its slot at
once, for the next step. ``reserve`` grows the slots or their length in place (running requests keep
their cache); ``GPT2.generate`` / ``stream`` run on their model's one engine (``GPT2.engine``).

The decode step runs over the slots 0 .. n-1, n the highest occupied slot + 1 (requests take the
lowest free slot), not over every slot: a lone request costs a batch-1 step. On CUDA n is rounded
up to a power of two (a slot-count bucket) and the step (embed -> layers -> lm_head -> each slot's
next token -> idle slots emptied) is captured in a CUDA graph after a warm-up run, one graph per
bucket and sampling variant (all greedy; some sampled; some sampled with top-k/top-p:
``RowSampler.variant``), never per setting: the settings are device tensors the graph reads. Replay
equals the eager step. A row's result does not depend on the rows beside it or on n (the kernels
and the CPU's GEMMs compute each row alone; tested by tests/runtime/test_engine.py).
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .graphs import GraphError, graph_cache_len, resolve_use_cuda_graph
from .kv_cache import CacheError, KVCache
from .model import GPT2Network, InputError
from .ops import resolve_pdl
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
    logprobs: int | None = None  # None: none; N >= 0: each new token's log-probability and the top N
    tokens: list[int] = field(default_factory=list)  # the new tokens, in order
    token_logprobs: list[float] = field(default_factory=list)  # log p(token) under the model (with logprobs)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # the N likeliest (token, log p)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    slot: int | None = None  # the cache slot while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in its cache slot once its last token is decoded: prompt + new tokens."""
        return len(self.prompt) + len(self.tokens)


def slot_bucket(n: int, max_batch: int) -> int:
    """The slot count a graphed step runs over for n occupied slots: the next power of two, at most
    max_batch (so a few graphs cover every n)."""
    bucket = 1
    while bucket < n:
        bucket *= 2
    return min(bucket, max_batch)


class Engine:
    def __init__(self, model: GPT2Network, max_batch: int = 8, max_len: int | None = None,
                 use_cuda_graph: bool | None = None, pdl: bool | None = None):
        """max_batch: slots (requests decoding at once); max_len: positions per slot (prompt + new
        tokens), at most the model's n_positions (default); use_cuda_graph: replay the decode step
        from CUDA graphs (default: True on CUDA; an error elsewhere); pdl: launch the step's GEMM and
        attention kernels with programmatic dependent launch (None: the model's own ``pdl``)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model
        self.use_cuda_graph = resolve_use_cuda_graph(use_cuda_graph, model.device)
        self.pdl = model.pdl if pdl is None else resolve_pdl(pdl, model.backend, model.device)  # refused here
        self.slots: list[Request | None] = []
        self.queue: deque[Request] = deque()
        self._ids = itertools.count()
        self.lock = threading.RLock()  # add, cancel, step and reserve hold it: threads may share an engine
        self.max_batch = self.max_len = 0
        self._allocate(max_batch, max_len or model.config.n_positions)

    def _allocate(self, max_batch: int, max_len: int) -> None:
        """(Re)build the slots' state at this size, keeping what the old state held (running requests
        keep their cache rows, lengths, last tokens and sampling)."""
        model, device = self.model, self.model.device
        cache = KVCache(model.config, max_batch, max_len, model.dtype, device)  # CacheError past n_positions
        sampler = RowSampler(max_batch, model.config.vocab_size, device)
        tokens = torch.zeros(max_batch, dtype=torch.long, device=device)  # [slots] each slot's last token
        active = torch.zeros(max_batch, dtype=torch.int32, device=device)  # [slots] 1: decoding now, 0: idle
        if self.max_batch:  # growing: copy the old slots into the first rows and positions
            b, t = self.max_batch, self.max_len
            cache.k[:, :b, :, :t].copy_(self.cache.k)
            cache.v[:, :b, :, :t].copy_(self.cache.v)
            cache.lengths[:b].copy_(self.cache.lengths)
            sampler.copy_rows(self.sampler)
            tokens[:b].copy_(self.tokens)
            active[:b].copy_(self.active)
        self.cache, self.sampler, self.tokens, self.active = cache, sampler, tokens, active
        self.slots += [None] * (max_batch - len(self.slots))
        self.max_batch, self.max_len = max_batch, max_len
        self.workspaces: dict[int, object] = {}  # slot count -> the kernels' scratch for a step over that many
        self.graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # (slot count, sampling variant) -> its captured step and that step's logits (a static buffer)
        self._pool = None  # the graphs' shared memory pool
        self.logits: torch.Tensor | None = None  # [n, V] the last decode step's logits of slots 0 .. n-1

    def reserve(self, max_batch: int, max_len: int) -> None:
        """Grow to at least `max_batch` slots of `max_len` positions (never shrinks; a no-op when both
        fit). Running and waiting requests carry on; the CUDA graphs are captured again."""
        if max_len > self.model.config.n_positions:
            raise CacheError(f"{max_len} positions per slot is past this model's n_positions "
                             f"({self.model.config.n_positions})")
        with self.lock:
            if max_batch > self.max_batch or max_len > self.max_len:
                self._allocate(max(max_batch, self.max_batch), max(max_len, self.max_len))

    # -- requests ----------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
            seed: int | None = None, stop_token_ids: Sequence[int] = (), logprobs: int | None = None) -> Request:
        """Queue a request; its first token comes from the step that admits it. seed: a sampled
        request's seed (None: a fresh one); the same seed and settings give the same tokens. logprobs:
        record each new token's log-probability under the model (log-softmax of its logits, before
        any sampling warper) and the `logprobs` likeliest tokens' (0: the chosen token's only)."""
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise InputError(f"logprobs must be an integer >= 0 (or None), got {logprobs!r}")
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
        with self.lock:
            request = Request(next(self._ids), prompt, max_new_tokens, sampling, int(seed),
                              frozenset(map(int, stop_token_ids)), logprobs)
            self.queue.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now: its slot (or its place in the queue) is free for the next step."""
        with self.lock:
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
    def step(self, use_cuda_graph: bool | None = None) -> list[tuple[Request, int]]:
        """One token for every running request (a decode step over the occupied slots), then the first
        token of each waiting request that a free slot admits. Returns (request, token) in that order;
        finished requests have left their slots. use_cuda_graph: this step's choice (None: the
        engine's; graphed and eager steps give the same tokens)."""
        graphed = self.use_cuda_graph if use_cuda_graph is None else resolve_use_cuda_graph(use_cuda_graph,
                                                                                             self.model.device)
        with self.lock:
            return self._step(graphed)

    def _step(self, graphed: bool) -> list[tuple[Request, int]]:
        out: list[tuple[Request, int]] = []
        running = [r for r in self.slots if r is not None]
        if running:
            n = max(r.slot for r in running) + 1
            if self.model.device.type == "cuda":  # static: a bucket of slots over the whole cache, graphed or not
                n = slot_bucket(n, self.max_batch)
                if graphed:
                    variant = (n, *self.sampler.variant(slice(0, n)))
                    graph, self.logits = self.graphs.get(variant) or self._capture(variant)
                    graph.replay()
                else:
                    self._decode(n)
            else:  # the CPU: the host knows each slot's length (the torch backend attends each row over
                # exactly its keys: a row's result must not depend on its neighbours, which one batched or
                # masked attention would let it; kv_len bounds them for the kernels)
                lengths = [0] * n  # each slot's length before this step (idle slots hold none)
                for r in running:
                    lengths[r.slot] = r.length - 1
                self._decode(n, graph_cache_len(max(lengths) + 1, self.max_len), tuple(lengths))
            chosen = self.tokens[:n].tolist()  # the step's one host sync
            self._record_logprobs(running, self.logits, 0, chosen)
            for request in running:
                out.append((request, chosen[request.slot]))
                self._emit(request, chosen[request.slot])
        self._admit(out)
        return out

    def _workspace(self, n: int):
        if n not in self.workspaces:  # made before any capture that uses it
            self.workspaces[n] = self.model.decode_workspace(self.cache, n, 1, pdl=self.pdl)
        return self.workspaces[n]

    def _decode(self, n: int, kv_len: int | None = None, row_lens: tuple[int, ...] | None = None) -> torch.Tensor:
        """The device work of a decode step over slots 0 .. n-1, no host sync (what a graph captures, over
        the whole cache: kv_len None). kv_len: a bound >= every slot's length after the step (the torch
        backend attends over that many positions; the kernels read the lengths on the device); row_lens:
        each slot's length before the step, when the host knows them (the CPU step)."""
        kv_len = self.max_len if kv_len is None else kv_len
        rows = slice(0, n)
        # a running slot's length grows by 1, an idle one's by 0: it stays empty, never past its end
        logits = self.model._decode_logits(self.tokens[rows, None], self.cache, kv_len, None, self._workspace(n),
                                           advance=self.active[rows], row_lens=row_lens)
        self.sampler(logits, self.tokens[rows], rows)  # [n, V] -> each slot's next token (idle slots' are ignored)
        self.logits = logits
        return logits

    def _capture(self, variant: tuple[int, bool, bool]):
        """Capture the decode step over `variant[0]` slots of this sampling variant, after a warm-up run
        on a side stream (Triton compiles there, never inside the capture) whose effects are undone."""
        n, device = variant[0], self.model.device
        self._workspace(n)
        live = (self.cache.lengths, self.tokens, self.sampler.draws)
        state = [t.clone() for t in live]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._decode(n)
        torch.cuda.current_stream(device).wait_stream(side)
        for tensor, saved in zip(live, state):
            tensor.copy_(saved)  # (its K/V writes sit where the real step writes before it reads)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._decode(n)
        except RuntimeError as exc:
            raise GraphError(f"capturing the engine's decode step failed ({exc}); use_cuda_graph=False "
                             f"runs it eagerly") from exc
        torch.cuda.synchronize(device)
        self.graphs[variant] = (graph, logits)
        return graph, logits

    def _admit(self, out: list[tuple[Request, int]]) -> None:
        """Prefill waiting requests into the free slots (lowest first), neighbouring slots as one ragged
        batch, and emit each one's first token."""
        admitted: list[Request] = []
        while self.queue and None in self.slots:
            request = self.queue.popleft()
            slot = self.slots.index(None)
            self.slots[slot], request.slot = request, slot
            self.sampler.set_row(slot, request.sampling, request.seed)
            admitted.append(request)
        runs: list[list[Request]] = []
        for request in sorted(admitted, key=lambda r: r.slot):
            if runs and runs[-1][-1].slot + 1 == request.slot:
                runs[-1].append(request)
            else:
                runs.append([request])
        first = {request.id: token for run in runs for request, token in zip(run, self._prefill(run))}
        for request in admitted:  # in arrival order
            out.append((request, first[request.id]))
            self._emit(request, first[request.id])

    def _prefill(self, run: list[Request]) -> list[int]:
        """Prefill the requests of neighbouring slots as one batch [R, T] (right-padded) and choose
        each one's first token."""
        a, b = run[0].slot, run[-1].slot + 1
        device = self.model.device
        width = max(len(r.prompt) for r in run)
        ids = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in run], dtype=torch.long,
                           device=device)  # [R, T]
        lens = torch.tensor([len(r.prompt) for r in run], dtype=torch.int32, device=device)  # [R]
        logits = self.model.prefill(ids, lens, self.cache.rows(a, b))  # [R, V]
        rows = slice(a, b)
        self.sampler(logits, self.tokens[rows], rows)
        self.active[rows] = 1
        chosen = self.tokens[rows].tolist()
        self._record_logprobs(run, logits, a, chosen, offset=a)
        return chosen

    @staticmethod
    def _record_logprobs(requests: list[Request], logits: torch.Tensor, first_row: int, chosen: list[int],
                         offset: int = 0) -> None:
        """Each request that asked for logprobs: its chosen token's log-probability and its top N, from
        logits [rows, V] whose row r is slot first_row + r (chosen: indexed by slot - offset)."""
        want = [r for r in requests if r.logprobs is not None]
        if not want:
            return
        rows = torch.tensor([r.slot - first_row for r in want], device=logits.device)
        lp = torch.log_softmax(logits[rows].float(), -1)  # [W, V]
        picked = torch.tensor([chosen[r.slot - offset] for r in want], device=logits.device)
        token_lp = lp.gather(1, picked[:, None])[:, 0].tolist()
        k = max(r.logprobs for r in want)
        top = torch.topk(lp, k, -1) if k else None
        for i, r in enumerate(want):
            r.token_logprobs.append(token_lp[i])
            if top is not None:
                r.top_logprobs.append(list(zip(top.indices[i, :r.logprobs].tolist(), top.values[i, :r.logprobs].tolist())))
            else:
                r.top_logprobs.append([])

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
        self.active[slot] = 0
        self.cache.lengths[slot] = 0
        self.sampler.set_row(slot, Sampling(), 0)  # an idle slot draws nothing
